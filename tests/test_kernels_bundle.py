"""kernels_honeybee.py, the flat copy of kernels/ that ships to the Hub, is generated and must not go stale."""

from pathlib import Path

from transformers.dynamic_module_utils import get_imports, get_relative_imports

from honeybee_hf.kernels import bundle

REPO = Path(__file__).resolve().parent.parent


def test_bundle_is_up_to_date():
    assert bundle.BUNDLE_PATH.read_text() == bundle.render(), (
        "kernels_honeybee.py is stale: run `python -m honeybee_hf.kernels.bundle`"
    )


def test_hub_files_import_only_flat_modules_and_guard_triton():
    """transformers' remote-code loader maps `from .x import` to a file x.py next to the model, and refuses to
    load when an unguarded import is missing (CI's transformers 4 environment has no triton)."""
    for name in ("modeling_honeybee.py", "kernels_honeybee.py", "processing_honeybee.py", "configuration_honeybee.py"):
        for module in get_relative_imports(REPO / name):
            assert (REPO / f"{module}.py").exists(), f"{name} imports .{module}, which is no flat file"
        assert "triton" not in get_imports(REPO / name), f"{name} imports triton outside try/except"
