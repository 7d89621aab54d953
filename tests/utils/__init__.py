"""What the tests share: where things are, the transformers version, the photos, and running a script in another
interpreter. Area-specific helpers sit beside this module: `cli` (console scripts and their stderr), `finetune`
(a tiny trainable model and the photo data set), `kernel_check` (kernel against reference), `official_format`
(checkpoints written as the official code writes them) and `load_and_run` (load a Hub folder and run it, also a
script).

Test modules import it as `utils`: pytest puts tests/ (the folder of the root conftest.py) on sys.path. A script the
tests run in a fresh process puts tests/ there itself.
"""

import subprocess
from pathlib import Path

import transformers

import honeybee_hf

TF4 = transformers.__version__.startswith("4.")  # the tests' one name for "running on transformers 4.57"
TESTS = Path(__file__).resolve().parent.parent
REPO = TESTS.parent  # the checkout the tests run from: README, setup.cfg, examples/, its .venvs/
PACKAGE_DIR = Path(honeybee_hf.__file__).resolve().parent  # the package the tests import: its code files and assets
PHOTO_DIR = PACKAGE_DIR / "assets" / "images"
PHOTOS = sorted(PHOTO_DIR.glob("*.jpeg"))
OFFICIAL_FIXTURES = TESTS / "fixtures" / "official"  # tensors the official code computed (shared/fixtures/official)
OFFICIAL_CKPT = TESTS / "fixtures" / "official_ckpt"  # a tiny checkpoint saved as the official release archives


def photo(i=0):
    """One of the repository's real photographs, as a PIL image."""
    from PIL import Image

    return Image.open(PHOTOS[i])


def venv_python(name):
    """The interpreter of the checkout's test environment `name` (.venvs/NAME, scripts/setup_envs.sh), or None."""
    python = REPO / ".venvs" / name / "bin" / "python"
    return python if python.exists() else None


def other_python():
    """The interpreter of the other transformers version's test environment, or None."""
    return venv_python("tf5" if TF4 else "tf4")


def run_script(python, *args, env=None):
    result = subprocess.run([str(python), *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"{python} {args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result
