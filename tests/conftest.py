import os

# Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before anything imports the
# kernels; without a GPU the interpreter is the only way to run them.
if "TRITON_INTERPRET" not in os.environ:
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:
        pass

import itertools
import subprocess
from pathlib import Path

import pytest
import transformers

TF4 = transformers.__version__.startswith("4.")  # the tests' one name for "running on transformers 4.57"
REPO = Path(__file__).resolve().parent.parent  # the checkout the tests run from
TESTS = Path(__file__).resolve().parent
PHOTO_DIR = REPO / "assets" / "images"
PHOTOS = sorted(PHOTO_DIR.glob("*.jpeg"))
_folder_ids = itertools.count()


def photo(i=0):
    """One of the repository's real photographs, as a PIL image."""
    from PIL import Image

    return Image.open(PHOTOS[i])


@pytest.fixture
def tiny_folder(tmp_path):
    """Factory: save a tiny random Honeybee as a Hub folder with a unique basename (transformers 4.x caches
    remote code by folder basename) and return (folder, in-memory model, processor)."""
    from honeybee_hf.testing_utils import save_tiny_hub_folder

    def make(projector_type="c-abs", seed=0, **projector):
        folder = tmp_path / f"hb_{projector_type.replace('-', '')}_{seed}_{next(_folder_ids)}_{tmp_path.name[-12:]}"
        model, processor = save_tiny_hub_folder(folder, projector_type, seed=seed, **projector)
        return folder, model, processor

    return make


def other_python():
    """The interpreter of the other transformers version's test environment, or None."""
    other = "tf5" if TF4 else "tf4"
    python = REPO / ".venvs" / other / "bin" / "python"
    return python if python.exists() else None


def run_script(python, *args, env=None):
    result = subprocess.run([str(python), *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"{python} {args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result
