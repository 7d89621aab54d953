"""A checkpoint saved under one transformers major version loads under the other with identical outputs: our Hub
folder writer's, and the library's plain `save_pretrained` calls (what a user's own fine-tuning script does).

Runs the other version's test environment (.venvs/tf4 or .venvs/tf5) in a subprocess; CI creates both.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from utils import load_and_run, other_python, run_script
from utils.load_and_run import load, run

HERE = Path(__file__).resolve().parent

OTHER = other_python()
if OTHER is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI must create both test environments (scripts/setup_envs.sh)")
    pytest.skip("the other transformers version's environment is missing", allow_module_level=True)


def assert_same_outputs(a, b):
    for key in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(a[key], b[key]), key
    torch.testing.assert_close(a["logits"], b["logits"], atol=1e-5, rtol=1e-5)
    assert a["tokens"].tolist() == b["tokens"].tolist()


@pytest.mark.parametrize("projector_type", ["c-abs", "d-abs"])
def test_saved_here_loads_there(tiny_folder, tmp_path, projector_type):
    folder, model, processor = tiny_folder(projector_type, seed=8)
    run_script(OTHER, load_and_run.__file__, folder, tmp_path / "there.safetensors")
    assert_same_outputs(load_file(tmp_path / "there.safetensors"), run(model, processor))


@pytest.mark.parametrize("projector_type", ["c-abs", "d-abs"])
def test_saved_there_loads_here(tmp_path, projector_type):
    folder = tmp_path / f"saved_by_other_{projector_type.replace('-', '')}_{tmp_path.name[-10:]}"
    run_script(OTHER, HERE / "save_tiny.py", folder, projector_type, tmp_path / "there.safetensors")
    assert_same_outputs(run(*load(folder)), load_file(tmp_path / "there.safetensors"))


PROCESSOR_FILES = [
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "chat_template.jinja",
]


def processor_files(folder):
    read = {name: (folder / name).read_text() for name in PROCESSOR_FILES}
    return {name: json.loads(text) if name.endswith(".json") else text for name, text in read.items()}


def test_plain_save_here_loads_there(tiny_folder, tmp_path):
    folder, _, _ = tiny_folder("c-abs", seed=11)
    model, processor = load(folder)
    resaved = tmp_path / f"plain_here_{tmp_path.name[-10:]}"
    model.save_pretrained(resaved)
    processor.save_pretrained(resaved)
    run_script(OTHER, load_and_run.__file__, resaved, tmp_path / "there.safetensors")
    assert_same_outputs(load_file(tmp_path / "there.safetensors"), run(model, processor))


def test_plain_save_there_loads_here(tiny_folder, tmp_path):
    folder, _, _ = tiny_folder("c-abs", seed=12)
    resaved = tmp_path / f"plain_there_{tmp_path.name[-10:]}"
    run_script(OTHER, HERE / "resave_plain.py", folder, resaved, tmp_path / "there.safetensors")
    assert_same_outputs(run(*load(resaved)), load_file(tmp_path / "there.safetensors"))
    # Either version's plain save writes the same processor files.
    _, processor = load(folder)
    here = tmp_path / f"plain_same_{tmp_path.name[-10:]}"
    processor.save_pretrained(here)
    assert processor_files(here) == processor_files(resaved)
