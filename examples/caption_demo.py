"""Build a tiny random Honeybee, save it as a Hub-style folder, load it back through `trust_remote_code` and
caption the photos in assets/images with `pipeline("image-to-text")`: the whole path a Hub user takes, offline.

    python examples/caption_demo.py [--out DIR] [--projector c-abs|d-abs]

The weights are random, so the captions are gibberish; convert a real checkpoint with `honeybee-convert`.
"""

import argparse
import tempfile
from pathlib import Path

import transformers

from honeybee_hf.export.tiny import ASSETS, save_tiny_hub_folder


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="where to write the Hub folder (default: a temporary folder)")
    parser.add_argument("--projector", choices=["c-abs", "d-abs"], default="c-abs")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp()) / "honeybee-tiny"
    save_tiny_hub_folder(out, args.projector, force=True)
    print(f"transformers {transformers.__version__}: wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    captioner = transformers.pipeline("image-to-text", model=str(out), trust_remote_code=True)
    for photo in sorted((ASSETS / "images").glob("*.jpeg")):
        caption = captioner(str(photo), max_new_tokens=12)[0]["generated_text"]
        print(f"{photo.name:>16}: {caption!r}")


if __name__ == "__main__":
    main()
