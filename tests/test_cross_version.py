"""A checkpoint saved under one transformers major version loads under the other with identical outputs.

Runs the other version's test environment (.venvs/tf4 or .venvs/tf5) in a subprocess; CI creates both.
"""

import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import TESTS, other_python, run_script

sys.path.insert(0, str(TESTS))
from load_and_run import load, run  # noqa: E402

OTHER = other_python()
if OTHER is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI must create both test environments (scripts/setup_envs.sh)")
    pytest.skip("the other transformers version's environment is missing", allow_module_level=True)


def assert_same_outputs(a, b):
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    torch.testing.assert_close(a["logits"], b["logits"], atol=1e-5, rtol=1e-5)
    assert a["tokens"].tolist() == b["tokens"].tolist()


@pytest.mark.parametrize("projector_type", ["c-abs", "d-abs"])
def test_saved_here_loads_there(tiny_folder, tmp_path, projector_type):
    folder, model, processor = tiny_folder(projector_type, seed=8)
    run_script(OTHER, TESTS / "load_and_run.py", folder, tmp_path / "there.safetensors")
    assert_same_outputs(load_file(tmp_path / "there.safetensors"), run(model, processor))


@pytest.mark.parametrize("projector_type", ["c-abs", "d-abs"])
def test_saved_there_loads_here(tmp_path, projector_type):
    folder = tmp_path / f"saved_by_other_{projector_type.replace('-', '')}_{tmp_path.name[-10:]}"
    run_script(OTHER, TESTS / "save_tiny.py", folder, projector_type, tmp_path / "there.safetensors")
    assert_same_outputs(run(*load(folder)), load_file(tmp_path / "there.safetensors"))
