"""`honeybee-publish` (hub/publish.py): checks a Hub folder, then create_repo + upload_folder. Nothing here can
reach the Hub: huggingface_hub's HfApi methods are replaced by recorders (or by tripwires for --dry-run).
"""

import json
import os

import huggingface_hub
import pytest

from honeybee_hf.convert import convert_official_checkpoint
from honeybee_hf.hub.publish import PublishError, check_hub_folder, main, publish
from utils import OFFICIAL_CKPT as FIXTURE


@pytest.fixture(scope="module")
def sharded_folder(tmp_path_factory):
    """The official tiny archive converted into several safetensors shards."""
    out = tmp_path_factory.mktemp("publish") / "hb_publish"
    convert_official_checkpoint(
        FIXTURE / "tiny_cabs_m16.tar.gz", out, FIXTURE / "tokenizer", max_shard_size="100KB", progress=False
    )
    return out


@pytest.fixture
def folder(sharded_folder, tmp_path):
    """A private copy each test may damage."""
    import shutil

    copy = tmp_path / "hb_copy"
    shutil.copytree(sharded_folder, copy)
    return copy


@pytest.fixture
def hub_calls(monkeypatch):
    """Record every HfApi call publishing makes instead of sending it."""
    calls = []

    def recorder(name):
        def method(self, *args, **kwargs):
            calls.append((name, args, kwargs, self.token))
            return f"https://huggingface.co/fake/commit/{len(calls)}" if name == "upload_folder" else None

        return method

    for name in ("create_repo", "create_branch", "upload_folder", "create_commit", "upload_file"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, recorder(name))
    return calls


def files_on_disk(folder):
    return sorted(
        os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/")
        for root, _, names in os.walk(folder)
        for f in names
    )


def test_dry_run_lists_exactly_the_files_of_the_folder(folder, hub_calls, capsys):
    assert len(list(folder.glob("model-*.safetensors"))) > 1, "the fixture should be sharded"
    assert main([str(folder), "me/honeybee-tiny", "--dry-run", "--private"]) == 0
    out = capsys.readouterr().out
    listed = [line.split("  (")[0].strip() for line in out.splitlines()[1:]]
    assert listed == files_on_disk(folder)
    assert "private model repo me/honeybee-tiny" in out and f"upload {len(listed)} files" in out
    assert hub_calls == [], "a dry run must not call the Hub"
    assert publish(folder, "me/honeybee-tiny", dry_run=True, log=lambda *_: None) == files_on_disk(folder)


def test_upload_calls_create_repo_then_upload_folder(folder, hub_calls):
    argv = [
        str(folder),
        "me/honeybee-tiny",
        "--private",
        "--revision",
        "bf16",
        "--commit-message",
        "Add weights",
        "--token",
        "hf_test",
    ]
    assert main(argv) == 0
    assert [c[0] for c in hub_calls] == ["create_repo", "create_branch", "upload_folder"]
    (_, args, kwargs, token), (_, b_args, b_kwargs, _), (_, u_args, u_kwargs, _) = hub_calls
    assert token == "hf_test"
    assert args == ("me/honeybee-tiny",) and kwargs["private"] is True and kwargs["exist_ok"] is True
    assert b_args == ("me/honeybee-tiny",) and b_kwargs["branch"] == "bf16" and b_kwargs["exist_ok"] is True
    assert u_kwargs["repo_id"] == "me/honeybee-tiny" and u_kwargs["folder_path"] == str(folder)
    assert u_kwargs["revision"] == "bf16" and u_kwargs["commit_message"] == "Add weights"
    assert u_kwargs["repo_type"] == "model"


def test_upload_to_main_creates_no_branch(folder, hub_calls):
    assert publish(folder, "me/honeybee-tiny", log=lambda *_: None) == "https://huggingface.co/fake/commit/2"
    assert [c[0] for c in hub_calls] == ["create_repo", "upload_folder"]
    assert hub_calls[0][2]["private"] is False and hub_calls[1][2]["revision"] == "main"


def _remove_shard(folder):
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    return shard.name


def _truncate_shard(folder):
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    return shard.name


def _drop_auto_map(folder):
    config = json.loads((folder / "config.json").read_text())
    del config["auto_map"]
    (folder / "config.json").write_text(json.dumps(config))
    return "auto_map"


@pytest.mark.parametrize(
    "damage, message",
    [
        (_remove_shard, "is missing"),
        (_truncate_shard, "truncated or corrupt"),
        (_drop_auto_map, "no auto_map entry"),
        (lambda f: (f / "modeling_honeybee.py").unlink() or "modeling_honeybee.py", "lacks"),
        (lambda f: (f / "tokenizer.json").unlink() or "tokenizer.json", "lacks"),
        (
            lambda f: (f / "model-99999-of-99999.safetensors").write_bytes(b"") or "model-99999-of-99999.safetensors",
            "does not use",
        ),
        (lambda f: (f / "pytorch_model.bin").write_bytes(b"") or "pytorch_model.bin", "pickled files"),
    ],
    ids=["missing-shard", "truncated-shard", "no-auto-map", "no-code", "no-tokenizer", "stray-shard", "pickle"],
)
def test_incomplete_folders_are_refused_before_any_hub_call(folder, hub_calls, capsys, damage, message):
    culprit = damage(folder)
    with pytest.raises(PublishError, match=message):
        check_hub_folder(folder)
    assert main([str(folder), "me/honeybee-tiny"]) == 1
    assert culprit in capsys.readouterr().err
    assert hub_calls == []


def test_bad_repo_ids_and_folders_are_refused(folder, tmp_path, hub_calls):
    for repo_id in ("honeybee-tiny", "me/honey bee", "me/a/b"):
        with pytest.raises(PublishError):
            publish(folder, repo_id, dry_run=True, log=lambda *_: None)
    with pytest.raises(PublishError, match="not a folder"):
        publish(tmp_path / "nowhere", "me/honeybee-tiny", dry_run=True)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(PublishError, match="model_type 'llama'"):
        publish(tmp_path / "plain", "me/honeybee-tiny", dry_run=True)
    assert hub_calls == []


def test_a_folder_from_save_hub_folder_publishes(tiny_folder, hub_calls, capsys):
    folder, _, _ = tiny_folder("d-abs")
    assert main([str(folder), "me/honeybee-dabs", "--dry-run"]) == 0
    listed = [line.split("  (")[0].strip() for line in capsys.readouterr().out.splitlines()[1:]]
    assert listed == files_on_disk(folder) and "model.safetensors" in listed
    assert hub_calls == []
