"""Save a tiny Honeybee Hub folder with this interpreter's transformers and record what the in-memory model
computes on the fixed photo and prompt of utils/load_and_run.py: the other half of the cross-version tests.

    python tests/hub/save_tiny.py FOLDER PROJECTOR_TYPE OUT.safetensors
"""

import sys
from pathlib import Path

from safetensors.torch import save_file

from honeybee_hf.testing_utils import save_tiny_hub_folder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared helpers in utils/
from utils.load_and_run import run  # noqa: E402

if __name__ == "__main__":
    folder, projector_type, out = sys.argv[1:4]
    model, processor = save_tiny_hub_folder(folder, projector_type, seed=7)
    save_file({k: v.contiguous() for k, v in run(model, processor).items()}, out)
