"""`honeybee-convert` (convert/): official Honeybee checkpoints -> Hub folders.

- The tiny official-format archive in fixtures/official_ckpt/ (written by the official code, with its recorded
  outputs) converted with the console command, loaded through the Auto classes on this transformers version and
  on the other one: ids, logits and greedy tokens equal the official ones.
- Hand-made official-format checkpoints for the other cases (Dec-2023 config, legacy pos_emb, eos tokens,
  D-Abstractor, another image size, sharded .bin, stale buffers) convert and give the unconverted weights' outputs.
- Every fault the converter must catch gives a clear error and leaves OUT alone.
"""

import copy
import errno
import io
import json
import os
import re
import tarfile
import uuid
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from check_official_parity import compare
from honeybee_hf.convert import ConversionError, convert_official_checkpoint, weight_files
from honeybee_hf.convert import archive as archive_module
from honeybee_hf.convert import writer as writer_module
from honeybee_hf.convert.cli import main
from honeybee_hf.convert.official import UNUSED_VISION_PREFIX, official_config_to_kwargs, official_key
from honeybee_hf.hub.folder import save_hub_folder
from honeybee_hf.testing_utils import TOY_SPM, tiny_config, tiny_model, tiny_processor
from utils import OFFICIAL_CKPT as FIXTURE
from utils import PHOTO_DIR, other_python, run_script
from utils.load_and_run import load
from utils.official_format import official_config

ARCHIVE = FIXTURE / "tiny_cabs_m16.tar.gz"
TOKENIZER = FIXTURE / "tokenizer"
EXPECTED = json.loads((FIXTURE / "tiny_cabs_m16.expected.json").read_text())
V = 600  # vocabulary of the toy tokenizers (fixture and assets/toy_spm.model); ours adds <image> = 600


def unique(tmp_path, stem):
    """A folder name no other test uses: transformers 4 caches remote code by the folder's basename."""
    return tmp_path / f"hb_{stem}_{uuid.uuid4().hex[:10]}"


def assert_parity(report):
    assert report["batch_input_ids_equal"] and report["single0_input_ids_equal"] and report["single1_input_ids_equal"]
    assert report["batch_attention_mask_equal"]
    assert report["pixel_values_max_diff"] < 1e-6
    for key in ("batch_logits_max_diff", "single0_logits_max_diff", "single1_logits_max_diff"):
        assert report[key] <= 1e-4, (key, report[key])
    assert report["batch_generate_equal"] and report["single0_generate_equal"] and report["single1_generate_equal"], (
        report
    )


# ---------------------------------------------------------------------------------------------------------
# The official tiny checkpoint, end to end
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def official_folder(tmp_path_factory):
    """The fixture archive converted by the command line (`main` is the `honeybee-convert` console script)."""
    out = unique(tmp_path_factory.mktemp("official"), "official")
    assert main([str(ARCHIVE), str(out), "--tokenizer", str(TOKENIZER), "--quiet"]) == 0
    return out


def test_console_scripts_are_declared():
    from importlib.metadata import entry_points

    scripts = {e.name: e for e in entry_points(group="console_scripts") if e.name.startswith("honeybee-")}
    # the installed metadata: an environment installed before a command moved needs `pip install -e .` again
    assert scripts["honeybee-convert"].value == "honeybee_hf.convert.cli:main", "reinstall the package"
    assert scripts["honeybee-publish"].value == "honeybee_hf.hub.publish:main"
    assert scripts["honeybee-convert"].load() is main


def test_official_archive_gives_the_official_outputs(official_folder):
    report = compare(official_folder)  # Auto classes + trust_remote_code, fp32
    assert_parity(report)
    print("max |logits - official|:", report["batch_logits_max_diff"])


def test_official_archive_converted_here_gives_the_official_outputs_on_the_other_version(official_folder, tmp_path):
    python = other_python()
    if python is None:
        pytest.skip("the other transformers version's venv is missing")
    run_script(python, Path(__file__).parent / "check_official_parity.py", official_folder, tmp_path / "report.json")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["transformers"][0] != __import__("transformers").__version__[0]
    assert_parity(report)


def test_official_archive_folder_contents(official_folder, tmp_path):
    files = sorted(p.name for p in official_folder.iterdir())
    assert files == sorted(
        [
            "README.md",
            "chat_template.jinja",
            "config.json",
            "configuration_honeybee.py",
            "generation_config.json",
            "image_loading_honeybee.py",
            "kernels_cabs_adaptive_pool.py",
            "kernels_cabs_dwconv_block.py",
            "kernels_cabs_ln_residual_silu.py",
            "kernels_common.py",
            "kernels_msda.py",
            "model.safetensors",
            "modeling_honeybee.py",
            "preprocessor_config.json",
            "pipeline_honeybee.py",
            "processing_honeybee.py",
            "processor_config.json",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "transformers_compat.py",
        ]
    )
    config = json.loads((official_folder / "config.json").read_text())
    assert set(config["auto_map"]) == {
        "AutoConfig",
        "AutoModel",
        "AutoModelForVision2Seq",
        "AutoModelForImageTextToText",
        "AutoProcessor",
    }
    assert config["custom_pipelines"]["image-to-text"]["impl"] == "pipeline_honeybee.HoneybeeImageToTextPipeline"
    assert config["torch_dtype"] == "bfloat16" and config["image_token_id"] == V
    assert config["text_config"]["vocab_size"] == V + 1
    generation = json.loads((official_folder / "generation_config.json").read_text())
    assert generation["do_sample"] is False and generation["num_beams"] == 1 and generation["suppress_tokens"] == [V]
    card = (official_folder / "README.md").read_text()
    assert "license: cc-by-nc-4.0" in card and "Apache-2.0" in card and "cha2023honeybee" in card
    assert "AutoModelForImageTextToText" in card and "transformers 4.57" in card and "5.x" in card

    # The weights are the official bf16 tensors, bit for bit, plus the <image> rows.
    with tarfile.open(ARCHIVE) as tar:
        data = tar.extractfile("tiny_cabs_m16/last/pytorch_model.bin").read()
    official = torch.load(io.BytesIO(data), weights_only=True)
    ours = {official_key(k): v for k, v in load_file(official_folder / "model.safetensors").items()}
    unused = "vision_model." + UNUSED_VISION_PREFIX  # CLIP's post_layernorm, never read: dropped
    assert ours.keys() == {k for k in official if not k.startswith(unused)} and len(official) > len(ours)
    for key, tensor in ours.items():
        if key.endswith(("embed_tokens.weight", "lm_head.weight")):
            assert torch.equal(tensor[:V], official[key]), key
        else:
            assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, official[key]), key
    embed = official["language_model.model.embed_tokens.weight"]
    assert torch.equal(ours["language_model.model.embed_tokens.weight"][V], embed.float().mean(0).to(torch.bfloat16))
    assert not ours["language_model.lm_head.weight"][V].any()


def test_model_card_carries_the_published_numbers():
    from honeybee_hf.configuration_honeybee import HoneybeeConfig
    from honeybee_hf.hub.model_card import render_model_card

    config = HoneybeeConfig(projector_config={"projector_type": "d-abs", "num_query_tokens": 144})  # D-7B-M144 shapes
    card = render_model_card(config, name="7B-D-Abs-M144", source="7B-D-Abs-M144.tar.gz", dtype="bfloat16")
    assert "# Honeybee-D-7B-M144" in card and "| 70.8 | 1835.5 | 63.8 | 66.3 |" in card
    pretraining = render_model_card(config, name="7B-D-Abs-M144_PT", source="7B-D-Abs-M144_PT.tar.gz")
    assert "1835.5" not in pretraining and "pre-training" in pretraining


# ---------------------------------------------------------------------------------------------------------
# Hand-made official-format checkpoints
# ---------------------------------------------------------------------------------------------------------


def make_official_checkpoint(
    root,
    name,
    projector_type="c-abs",
    fmt="head",
    image_size=32,
    num_eos_tokens=0,
    eos_in_config=True,
    legacy_pos_emb=False,
    stale_buffers=False,
    shards=1,
    vocab=V,
    seed=0,
    **projector,
):
    """Write `root/name/last/` as the official code saves a model, from a random tiny model of ours.

    Returns (reference model, processor): the reference holds the same (bf16-rounded) weights in fp32, with our
    vocabulary (the official one + <image>); its logits over the official vocabulary are the official model's.
    """
    config = tiny_config(projector_type, num_eos_tokens=num_eos_tokens, **projector)
    config.vision_config.image_size = image_size
    config.text_config.vocab_size, config.image_token_id = vocab + 1, vocab
    model = tiny_model(config, seed)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():  # no all-ones / all-zeros tensors: a swapped key must show
            param.add_(torch.randn_like(param) * 0.02)
            param.copy_(param.to(torch.bfloat16).float())
    state = {official_key(k): v.to(torch.bfloat16).clone() for k, v in model.state_dict().items()}
    for suffix in ("weight", "bias"):  # CLIP's post_layernorm: in every official checkpoint, unused
        state["vision_model." + UNUSED_VISION_PREFIX + suffix] = torch.randn(config.vision_config.hidden_size)
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        state[key] = state[key][:vocab].clone()  # the official vocabulary has no <image>
    if legacy_pos_emb:  # Dec-2023: one slot more, for the CLS token, which the official loader drops
        key = "abstractor.pos_emb" if projector_type == "c-abs" else "abstractor.v_pos_emb"
        state[key] = torch.cat([torch.full_like(state[key][:, :1], 7.0), state[key]], dim=1)
    if stale_buffers:  # saved by transformers <= 4.30
        grid = image_size // config.vision_config.patch_size
        state["vision_model.vision_model.embeddings.position_ids"] = torch.arange(grid * grid + 1)[None]
        for i in range(config.text_config.num_hidden_layers):
            state[f"language_model.model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.rand(4)
    folder = root / name / "last"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(official_config(config, fmt, eos_in_config, vocab), indent=2))
    keys = list(state)
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
    else:
        weight_map = {}
        for i in range(shards):
            file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
            part = keys[i * len(keys) // shards : (i + 1) * len(keys) // shards]
            torch.save({k: state[k] for k in part}, folder / file)
            weight_map.update(dict.fromkeys(part, file))
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return model.eval(), tiny_processor(config)


def make_archive(folder, archive):
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


def assert_same_outputs(folder, reference, processor, photo):
    """The converted folder, loaded through the Auto classes, computes what the unconverted weights compute."""
    model, _ = load(folder)  # raises on any missing, unused or re-initialised weight
    inputs = processor(images=[photo, photo], text=["What is in the image?", "Describe it."], return_tensors="pt")
    with torch.no_grad():
        expected = reference(**inputs).logits[..., :V]
        assert torch.equal(model(**inputs).logits[..., :V], expected)
        tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        reference_tokens = reference.generate(**inputs, max_new_tokens=5, do_sample=False, suppress_tokens=[V])
    assert torch.equal(tokens, reference_tokens)
    return model


@pytest.fixture
def photo():
    from PIL import Image

    return Image.open(PHOTO_DIR / "laundry.jpeg")


CASES = {
    # Dec-2023 config, no num_eos_tokens key (default 1, found in the weights), N+1 pos_emb, stale buffers, one
    # .bin, given as the .tar.gz
    "dec2023_cabs_archive": dict(
        fmt="dec2023", num_eos_tokens=1, eos_in_config=False, legacy_pos_emb=True, stale_buffers=True
    ),
    # D-Abstractor, HEAD config, 2 eos tokens, 3 .bin shards + index, given as <name>/, written in several shards
    "head_dabs_sharded": dict(projector_type="d-abs", num_eos_tokens=2, shards=3, stale_buffers=True),
    # "336 px": a 12x12 patch grid pooled to 4x4 (non-integer ratio), Dec-2023 D-Abs with legacy v_pos_emb,
    # given as <name>/last/
    "dec2023_dabs_grid12": dict(
        projector_type="d-abs", fmt="dec2023", image_size=48, num_query_tokens=16, legacy_pos_emb=True, shards=2
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hand_made_official_checkpoints_convert_exactly(case, tmp_path, photo):
    spec = CASES[case]
    reference, processor = make_official_checkpoint(tmp_path / "src", case, **spec)
    src = {
        "dec2023_cabs_archive": make_archive(tmp_path / "src" / case, tmp_path / f"{case}.tar.gz"),
        "head_dabs_sharded": tmp_path / "src" / case,
        "dec2023_dabs_grid12": tmp_path / "src" / case / "last",
    }[case]
    out = unique(tmp_path, case)
    max_shard_size = "60KB" if case == "head_dabs_sharded" else "5GB"
    convert_official_checkpoint(src, out, TOY_SPM, max_shard_size=max_shard_size, progress=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"
    model = assert_same_outputs(out, reference, processor, photo)
    config = json.loads((out / "config.json").read_text())
    assert config["projector_config"]["num_eos_tokens"] == spec.get("num_eos_tokens", 0)
    if case == "head_dabs_sharded":
        index = json.loads((out / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 1 and sorted(p.name for p in out.glob("*.safetensors")) == shards
        with safe_open(str(out / index["weight_map"]["model.abstractor.output_proj.weight"]), "pt") as f:
            assert f.get_tensor("model.abstractor.output_proj.weight").dtype == torch.float32  # D-Abs stays fp32
        with safe_open(str(out / index["weight_map"]["lm_head.weight"]), "pt") as f:
            assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
    if case == "dec2023_dabs_grid12":
        assert model.config.vision_config.image_size == 48 and model.config.vision_grid == 12


def test_dtype_option_and_streaming_shard_by_shard(tmp_path, monkeypatch):
    """Each official shard is read twice: to check it (data.pkl, then every record's presence and size, its data
    skipped) and to convert it (one pass, each tensor built as its storage arrives, never torch.load); output shards
    are written while later official shards are still unread, and while a storage is read no earlier one is alive
    (memory holds one official tensor at a time)."""
    make_official_checkpoint(tmp_path / "src", "stream", shards=3)
    events, alive = [], []
    real_check, real_tensors, real_write, real_read = (
        weight_files.StreamedBin.check,
        weight_files.StreamedBin.tensors,
        writer_module.write_at,
        weight_files._Reader.readinto_exact,
    )

    def spy_tensors(self):
        events.append(("read", self.name))
        for item in real_tensors(self):
            alive.append(weakref.ref(item[1]._base))  # the storage's buffer, which every tensor of it views
            yield item
            del item

    def spy_read(self, view):
        assert all(ref() is None for ref in alive), "an earlier storage is still in memory"
        return real_read(self, view)

    def never_load(*args, **kwargs):
        raise AssertionError("torch.load was called")

    def spy_check(self):
        events.append(("check", self.name))
        return real_check(self)

    def spy_write(*args):
        events.append(("write", None))
        return real_write(*args)

    monkeypatch.setattr(weight_files.StreamedBin, "check", spy_check)
    monkeypatch.setattr(weight_files.StreamedBin, "tensors", spy_tensors)
    monkeypatch.setattr(weight_files._Reader, "readinto_exact", spy_read)
    monkeypatch.setattr(writer_module, "write_at", spy_write)
    monkeypatch.setattr(torch, "load", never_load)
    out = unique(tmp_path, "stream")
    convert_official_checkpoint(
        tmp_path / "src" / "stream", out, TOY_SPM, dtype="float32", max_shard_size="40KB", progress=False
    )
    shards = [f"pytorch_model-{i:05d}-of-00003.bin" for i in (1, 2, 3)]
    assert [name for kind, name in events if kind == "check"] == shards
    assert [name for kind, name in events if kind == "read"] == shards
    assert all(kind == "check" for kind, _ in events[:3])  # the whole folder is checked before anything is written
    streaming = events[3:]
    last_read = max(i for i, (kind, _) in enumerate(streaming) if kind == "read")
    assert any(kind == "write" for kind, _ in streaming[:last_read]), streaming
    assert len(alive) > 3  # several storages per file, each released before the next was read
    assert {t.dtype for t in _all_tensors(out).values()} == {torch.float32}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"


# ---------------------------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------------------------


def _tar_with(path, members):
    """A .tar.gz holding `members`: (TarInfo, bytes or None)."""
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name, data=b"x"):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _link(name, target, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


@pytest.mark.parametrize(
    "members, culprit",
    [
        ([_file("ckpt/last/config.json"), _file("../evil.txt")], "../evil.txt"),
        ([_file("/tmp/evil_honeybee.txt")], "/tmp/evil_honeybee.txt"),
        ([_file("ckpt/last/../../../evil.txt")], "ckpt/last/../../../evil.txt"),
        ([_link("ckpt/last/pytorch_model.bin", "../../../../etc/passwd")], "ckpt/last/pytorch_model.bin"),
        ([_file("ckpt/a"), _link("ckpt/last/config.json", "ckpt/a", tarfile.LNKTYPE)], "ckpt/last/config.json"),
    ],
    ids=["dotdot", "absolute", "nested-dotdot", "symlink-out", "hardlink"],
)
def test_archive_escaping_its_folder_is_refused(tmp_path, members, culprit):
    archive = _tar_with(tmp_path / "evil.tar.gz", members)
    work = tmp_path / "work"
    out = work / "out"
    with pytest.raises(ConversionError, match=re.escape(repr(culprit))):
        convert_official_checkpoint(archive, out, TOKENIZER, progress=False)
    assert not (tmp_path / "evil.txt").exists() and not os.path.exists("/tmp/evil_honeybee.txt")
    assert not out.exists() and list(work.iterdir()) == []  # the unpack folder is gone too


def _archive_in_order(folder, archive, first):
    """`folder` (<name>/last/) as a .tar.gz whose file members come in the order of `first` (names), then the rest."""
    files = sorted(folder.iterdir(), key=lambda p: (first.index(p.name) if p.name in first else len(first), p.name))
    with tarfile.open(archive, "w:gz") as tar:
        for path in files:
            tar.add(path, arcname=f"{folder.parent.name}/last/{path.name}")
    return archive


def _all_tensors(out):
    tensors = {}
    for path in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.mark.parametrize("order", ["config_first_index_last", "shard_before_config"])
def test_streamed_archive_gives_the_folder_conversion(tmp_path, monkeypatch, order):
    """An archive is read as a stream: no weight file goes to disk, except one that precedes config.json (it waits
    there for it); the conversion equals the folder's whatever the member order."""
    make_official_checkpoint(tmp_path / "src", "streamed", fmt="dec2023", shards=3, legacy_pos_emb=True)
    last = tmp_path / "src" / "streamed" / "last"
    shards = [f"pytorch_model-{i:05d}-of-00003.bin" for i in (1, 2, 3)]
    first = {
        "config_first_index_last": ["config.json", *shards],
        "shard_before_config": [shards[1], "config.json", shards[0], "pytorch_model.bin.index.json"],
    }[order]
    archive = _archive_in_order(last, tmp_path / "streamed.tar.gz", first)
    from_folder = unique(tmp_path, "folder")
    convert_official_checkpoint(last, from_folder, TOY_SPM, max_shard_size="60KB", progress=False)

    spooled, streamed, real_spool = [], [], archive_module.ArchiveCheckpoint._spool
    real_init = weight_files.StreamedBin.__init__

    def spy_spool(self, path, *args):
        spooled.append(path.name)
        return real_spool(self, path, *args)

    def spy_init(self, stream, name, seekable=False):
        streamed.append((name, seekable))  # seekable: from a file on disk
        real_init(self, stream, name, seekable)

    monkeypatch.setattr(archive_module.ArchiveCheckpoint, "_spool", spy_spool)
    monkeypatch.setattr(weight_files.StreamedBin, "__init__", spy_init)
    work = tmp_path / "work"
    from_archive = unique(tmp_path, "archive")
    convert_official_checkpoint(archive, from_archive, TOY_SPM, max_shard_size="60KB", work_dir=work, progress=False)
    waited = [shards[1]] if order == "shard_before_config" else []
    assert spooled == waited
    assert sorted(streamed) == sorted((name, name in waited) for name in shards)
    assert list(work.iterdir()) == []  # nothing spooled is left
    ours, theirs = _all_tensors(from_archive), _all_tensors(from_folder)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(ours[k].dtype == theirs[k].dtype for k in ours)
    assert json.loads((from_archive / "config.json").read_text()) == json.loads(
        (from_folder / "config.json").read_text()
    )


@pytest.mark.parametrize("source", ["folder", "archive"])
def test_a_bin_the_stream_reader_cannot_read_is_loaded_whole_saying_so(tmp_path, capsys, source):
    """A legacy (pre-zip) `.bin` cannot be read as a stream: it is loaded whole with torch.load(weights_only=True),
    from a temporary file when it comes from an archive, and one line on stderr names it; the output is the same."""
    make_official_checkpoint(tmp_path / "src", "legacy", shards=2)
    last = tmp_path / "src" / "legacy" / "last"
    reference = unique(tmp_path, "zip")
    convert_official_checkpoint(last, reference, TOY_SPM, progress=False)
    legacy = last / "pytorch_model-00002-of-00002.bin"
    torch.save(torch.load(legacy, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    src = last if source == "folder" else _archive_in_order(last, tmp_path / "legacy.tar.gz", ["config.json"])
    work, out = tmp_path / "work", unique(tmp_path, "legacy")
    capsys.readouterr()
    convert_official_checkpoint(src, out, TOY_SPM, work_dir=work, progress=False)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("honeybee-convert: pytorch_model-00002-of-00002.bin: it is not a zip")
    assert "loading it whole with torch.load" in line and ("temporary file" in line) == (source == "archive")
    assert list(work.iterdir()) == [] if source == "archive" else not work.exists()
    for name in sorted(p.name for p in reference.iterdir()):
        if name != "README.md":  # the model card names the source
            assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def _no_space():
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _no_memory():
    raise MemoryError


def _fail_in_the_second_shard(monkeypatch, shards, fail):
    """`fail()` when a tensor's bytes first go to a second output shard (one tensor at least was written before);
    `shards` collects the shard files written to."""
    real_write = writer_module.write_at

    def failing_write(fd, data, offset):
        if offset > 0 and fd not in shards:  # a tensor (offset 0 is a header)
            shards.append(fd)
            if len(shards) == 2:
                fail()
        return real_write(fd, data, offset)

    monkeypatch.setattr(writer_module, "write_at", failing_write)


@pytest.mark.parametrize("fault", ["disk_full", "out_of_memory", "archive_truncated_after_a_shard"])
def test_a_run_failing_midway_leaves_no_out_and_says_so_in_one_line(tmp_path, monkeypatch, capsys, fault):
    make_official_checkpoint(tmp_path / "src", "midway", shards=3)
    last = tmp_path / "src" / "midway" / "last"
    archive = _archive_in_order(last, tmp_path / "midway.tar.gz", ["config.json"])
    calls = []
    if fault == "archive_truncated_after_a_shard":
        data = archive.read_bytes()
        archive.write_bytes(data[: len(data) * 2 // 3])
    else:
        _fail_in_the_second_shard(monkeypatch, calls, _no_space if fault == "disk_full" else _no_memory)
    out = tmp_path / "out"
    code = main([str(archive), str(out), "--tokenizer", str(TOY_SPM), "--max-shard-size", "60KB", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    expected = {
        "disk_full": f"No space left on device.*{re.escape(str(out))} was not written or changed",
        "out_of_memory": f"out of memory; {re.escape(str(out))} was not written or changed",
        "archive_truncated_after_a_shard": "midway.tar.gz is truncated or corrupt",
    }[fault]
    assert re.search(expected, err), err
    assert fault == "archive_truncated_after_a_shard" or len(calls) == 2  # it failed after writing a shard
    assert sorted(p.name for p in tmp_path.iterdir()) == ["midway.tar.gz", "src"]  # no OUT, no partial, no spool


@pytest.mark.parametrize("packing", ["plain tar", "two gzip members", "bzip2", "corrupt gzip", "corrupt stored gzip"])
def test_archive_packings(official_folder, tmp_path, monkeypatch, packing):
    """A plain .tar, and a .tar.gz of several gzip members (as concatenated or parallel gzip writes it), convert as
    the release's .tar.gz does; other compressions and corrupt data are refused in one line, and OUT is not written:
    the archive is read to its end, so gzip's checksum covers every byte (a byte changed in a level-0 gzip, whose
    stored blocks have no checksum of their own, is caught only there)."""
    import bz2
    import gzip

    tar_bytes = gzip.decompress(ARCHIVE.read_bytes())
    half = len(tar_bytes) // 2
    data = {
        "plain tar": tar_bytes,
        "two gzip members": gzip.compress(tar_bytes[:half]) + b"\0" * 8 + gzip.compress(tar_bytes[half:]),
        "bzip2": bz2.compress(tar_bytes),
        "corrupt gzip": bytearray(ARCHIVE.read_bytes()),
        "corrupt stored gzip": bytearray(gzip.compress(tar_bytes, compresslevel=0)),
    }[packing]
    if packing == "corrupt gzip":
        data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    if packing == "corrupt stored gzip":
        data[len(data) // 2] ^= 0xFF  # inside the weights
    archive = tmp_path / "tiny_cabs_m16.tar.gz"
    archive.write_bytes(bytes(data))
    out = unique(tmp_path, "packing")
    monkeypatch.setattr(archive_module, "_INFLATED_CHUNK", 4096)  # gzip's checksum comes after the last member
    if packing in ("bzip2", "corrupt gzip", "corrupt stored gzip"):
        message = "compressed with bzip2; the releases are .tar.gz" if packing == "bzip2" else "truncated or corrupt"
        with pytest.raises(ConversionError, match=message):
            convert_official_checkpoint(archive, out, TOKENIZER, progress=False)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny_cabs_m16.tar.gz"]
        return
    convert_official_checkpoint(archive, out, TOKENIZER, progress=False)
    assert (out / "model.safetensors").read_bytes() == (official_folder / "model.safetensors").read_bytes()


def test_truncated_archive_is_refused(tmp_path):
    data = ARCHIVE.read_bytes()
    archive = tmp_path / "tiny_cabs_m16.tar.gz"
    archive.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="truncated or corrupt"):
        convert_official_checkpoint(archive, out, TOKENIZER, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny_cabs_m16.tar.gz"]


def test_missing_and_truncated_shards_are_refused(tmp_path):
    make_official_checkpoint(tmp_path / "src", "sharded", shards=3)
    last = tmp_path / "src" / "sharded" / "last"
    second = last / "pytorch_model-00002-of-00003.bin"
    data = second.read_bytes()
    second.unlink()
    with pytest.raises(ConversionError, match=r"shard pytorch_model-00002-of-00003\.bin is missing"):
        convert_official_checkpoint(last, tmp_path / "out", TOY_SPM, progress=False)
    second.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match=r"pytorch_model-00002-of-00003\.bin.*truncated or corrupt"):
        convert_official_checkpoint(last, tmp_path / "out", TOY_SPM, progress=False)
    assert not (tmp_path / "out").exists()


def test_an_unreadable_tokenizer_is_refused_before_the_checkpoint_is_read(tmp_path, monkeypatch):
    make_official_checkpoint(tmp_path / "src", "early")
    archive = make_archive(tmp_path / "src" / "early", tmp_path / "early.tar.gz")
    opened, enter = [], archive_module.ArchiveCheckpoint.__enter__
    monkeypatch.setattr(archive_module.ArchiveCheckpoint, "__enter__", lambda self: opened.append(self) or enter(self))
    with pytest.raises(ConversionError, match="cannot load the tokenizer"):
        convert_official_checkpoint(archive, tmp_path / "out", tmp_path / "nowhere.model", progress=False)
    assert opened == []  # a release archive is 14-27 GB: a wrong tokenizer path must not wait for its stream
    assert not (tmp_path / "out").exists()


def test_wrong_tokenizer_vocabulary_is_refused(tmp_path):
    make_official_checkpoint(tmp_path / "src", "vocab", vocab=640)
    with pytest.raises(ConversionError, match=r"has 600 tokens but the checkpoint's language model has 640"):
        convert_official_checkpoint(tmp_path / "src" / "vocab", tmp_path / "out", TOY_SPM, progress=False)
    with pytest.raises(ConversionError, match="cannot load the tokenizer"):
        convert_official_checkpoint(
            tmp_path / "src" / "vocab", tmp_path / "out", tmp_path / "nowhere.model", progress=False
        )


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda s: s.update({"abstractor.readout.0.weight": s["abstractor.readout.0.weight"].T.clone()}),
            "'abstractor.readout.0.weight' has shape",
        ),
        (
            lambda s: s.update(
                {"language_model.model.norm.weight": s["language_model.model.norm.weight"][:-1].clone()}
            ),
            "'language_model.model.norm.weight' has shape",
        ),
        (lambda s: s.update({"abstractor.mystery": torch.zeros(1)}), "'abstractor.mystery'"),
        (lambda s: s.update({"text_projection.weight": torch.zeros(1)}), "'text_projection.weight'"),
        (
            lambda s: s.pop("vision_model.vision_model.pre_layrnorm.bias"),
            "'vision_model.vision_model.pre_layrnorm.bias'",
        ),
    ],
    ids=["transposed", "short", "unknown-abstractor-key", "unknown-module", "missing"],
)
def test_weights_that_do_not_fit_are_refused_naming_the_key(tmp_path, edit, message):
    make_official_checkpoint(tmp_path / "src", "bad")
    path = tmp_path / "src" / "bad" / "last" / "pytorch_model.bin"
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)
    with pytest.raises(ConversionError, match=re.escape(message)):
        convert_official_checkpoint(tmp_path / "src" / "bad", tmp_path / "out", TOY_SPM, progress=False)


def test_eos_tokens_must_agree_with_the_weights(tmp_path):
    # Dec-2023 config without num_eos_tokens means 1 eos token, but these weights have none
    make_official_checkpoint(tmp_path / "src", "eos", fmt="dec2023", num_eos_tokens=0, eos_in_config=False)
    with pytest.raises(
        ConversionError, match=r"implies 1 eos tokens \(the Dec-2023 default.*no abstractor\.eos_tokens"
    ):
        convert_official_checkpoint(tmp_path / "src" / "eos", tmp_path / "out", TOY_SPM, progress=False)
    config_path = tmp_path / "src" / "eos" / "last" / "config.json"
    config = json.loads(config_path.read_text())
    config["visual_projector_config"]["num_eos_tokens"] = 2
    config_path.write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"implies 2 eos tokens \(visual_projector_config\.num_eos_tokens\)"):
        convert_official_checkpoint(tmp_path / "src" / "eos", tmp_path / "out", TOY_SPM, progress=False)


def test_pickled_objects_are_never_executed(tmp_path):
    make_official_checkpoint(tmp_path / "src", "pickle")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "src" / "pickle" / "last" / "pytorch_model.bin"
    state = torch.load(path, weights_only=True)
    state["payload"] = Payload()
    torch.save(state, path)
    with pytest.raises(ConversionError, match="refusing to load .*pickled objects"):
        convert_official_checkpoint(tmp_path / "src" / "pickle", tmp_path / "out", TOY_SPM, progress=False)
    assert not marker.exists()


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_write_leaves_out_untouched(tmp_path, monkeypatch, existing):
    make_official_checkpoint(tmp_path / "src", "interrupt", shards=2)
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("previous conversion")
    calls = []

    def interrupt():
        raise KeyboardInterrupt  # Ctrl-C while the second shard is written

    _fail_in_the_second_shard(monkeypatch, calls, interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert_official_checkpoint(
            tmp_path / "src" / "interrupt", out, TOY_SPM, max_shard_size="60KB", force=True, progress=False
        )
    assert len(calls) == 2
    if existing:
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    else:
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["src"] + (["out"] if existing else []))


def test_existing_out_is_refused_without_force(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main([str(ARCHIVE), str(out), "--tokenizer", str(TOKENIZER), "--quiet"]) == 1
    assert "exists; pass force=True (--force)" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert main([str(ARCHIVE), str(tmp_path / "other"), "--quiet"]) == 1  # no --tokenizer
    assert "--tokenizer is required" in capsys.readouterr().err


def test_force_replaces_an_existing_out(tmp_path):
    out = unique(tmp_path, "force")
    out.mkdir()
    (out / "stale.txt").write_text("x")
    assert (
        main([str(ARCHIVE), str(out), "--tokenizer", str(TOKENIZER), "--quiet", "--force", "--dtype", "float16"]) == 0
    )
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float16}


# ---------------------------------------------------------------------------------------------------------
# config.json translation
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def head_config():
    return copy.deepcopy(EXPECTED["saved_config_json"])


def test_config_formats_translate_to_the_same_model(head_config):
    config = tiny_config("c-abs", num_query_tokens=16)
    head, _, _ = official_config_to_kwargs(official_config(config, "head"))
    dec2023, _, _ = official_config_to_kwargs(official_config(config, "dec2023"))
    assert head == dec2023
    kwargs, mean, std = official_config_to_kwargs(head_config)
    assert kwargs["projector_config"] == {
        "projector_type": "c-abs",
        "num_eos_tokens": 0,
        "pos_emb": True,
        "feature_layer_index": -1,
        "initializer_range": 0.02,
        "hidden_size": 48,
        "depth": 3,
        "mlp_depth": 2,
        "prenorm": False,
        "num_query_tokens": 16,
    }
    assert kwargs["vision_config"]["image_size"] == 112 and mean == [0.48145466, 0.4578275, 0.40821073]
    assert kwargs["text_config"]["vocab_size"] == V and kwargs["text_config"]["rope_theta"] == 10000.0


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["projector_config"].update(mystery=1), "projector_config.mystery"),
        (lambda c: c["vision_config"].update(mystery=1), "vision_config.mystery"),
        (lambda c: c["text_config"].update(mystery=1), "text_config.mystery"),
        (lambda c: c["lm_config"].update(mystery=1), "lm_config.mystery"),
        (lambda c: c.update(mystery=1), "config.mystery"),
        (lambda c: c["projector_config"].update(feature_layer_index=[-1, -2]), "projector_config.feature_layer_index"),
        (
            lambda c: c["projector_config"].update(projector_type="resampler"),
            "projector_config.projector_type 'resampler'",
        ),
        (
            lambda c: c["projector_config"].update(projector_type="d-abs", num_feature_levels=3),
            "projector_config.num_feature_levels = 3",
        ),
        (lambda c: c["projector_config"].update(num_queries=9), "the number of queries disagrees"),
        (lambda c: c["vision_config"].update(encoder_type="eva"), "vision_config.encoder_type 'eva'"),
        (lambda c: c["text_config"].update(model_type="mistral"), "text_config.model_type 'mistral'"),
        (lambda c: c["projector_config"].pop("depth"), "lacks ['depth']"),
        (lambda c: c.update(model_type="llava"), "model_type 'llava'"),
    ],
)
def test_config_values_we_cannot_represent_are_refused(head_config, edit, message):
    edit(head_config)
    with pytest.raises(ValueError, match=re.escape(message)):
        official_config_to_kwargs(head_config)


def test_unknown_config_keys_can_be_allowed_explicitly(head_config, tmp_path):
    head_config["projector_config"]["mystery"] = 1
    official_config_to_kwargs(head_config, allow_unknown=["projector_config.mystery"])
    make_official_checkpoint(tmp_path / "src", "allow")
    path = tmp_path / "src" / "allow" / "last" / "config.json"
    config = json.loads(path.read_text())
    config["projector_config"]["mystery"] = 1
    path.write_text(json.dumps(config))
    args = [str(tmp_path / "src" / "allow"), str(tmp_path / "out"), "--tokenizer", str(TOY_SPM), "--quiet"]
    assert main(args) == 1
    assert main(args + ["--allow-unknown-config-key", "projector_config.mystery"]) == 0


# ---------------------------------------------------------------------------------------------------------
# Models trained with this package
# ---------------------------------------------------------------------------------------------------------


def test_fine_tuned_model_round_trips_through_save_hub_folder(tiny_folder, tmp_path, photo):
    folder, _, _ = tiny_folder("d-abs")
    model, processor = load(folder)
    with torch.no_grad():  # "fine-tuning": one weight changed
        model.abstractor.layers[0].fc1.weight[0, 0] += 1.0
        model.lm_head.weight[3] *= 2
    out = save_hub_folder(model, processor, unique(tmp_path, "finetuned"))
    reloaded, reloaded_processor = load(out)
    expected = model.state_dict()
    for key, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, expected[key]), key
    inputs = reloaded_processor(images=photo, text="What is in the image?", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)
    # the command line does the same for a folder saved by this package (no --tokenizer needed)
    cli_out = unique(tmp_path, "finetuned_cli")
    assert main([str(out), str(cli_out), "--quiet"]) == 0
    again, _ = load(cli_out)
    for key, tensor in again.state_dict().items():
        assert torch.equal(tensor, expected[key]), key
    assert "fine-tuned" in (cli_out / "README.md").read_text()


def test_a_folder_with_missing_weights_is_not_exported(tiny_folder, tmp_path, capsys):
    from safetensors.torch import save_file

    folder, _, _ = tiny_folder("c-abs")
    weights = load_file(folder / "model.safetensors")
    del weights["model.abstractor.readout.0.bias"]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert main([str(folder), str(tmp_path / "out"), "--quiet"]) == 1
    assert "model.abstractor.readout.0.bias" in capsys.readouterr().err and not (tmp_path / "out").exists()
