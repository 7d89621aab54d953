"""Load a Honeybee folder through the Auto classes, save it again with the library's plain calls
(`model.save_pretrained`, `processor.save_pretrained`: what a user's own fine-tuning script does), and record what
the loaded model computes: run by the cross-version processor tests under the other transformers version.

    python tests/hub/resave_plain.py SOURCE FOLDER OUT.safetensors
"""

import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared helpers in utils/
from utils.load_and_run import load, run  # noqa: E402

if __name__ == "__main__":
    source, folder, out = sys.argv[1:4]
    model, processor = load(source)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in run(model, processor).items()}, out)
