"""Load a Honeybee Hub folder (or an offline Hub-cache repo id) through the Auto classes with trust_remote_code,
run it on a fixed photo and prompt, and save logits and greedy tokens: run by tests in a fresh process, often
under the other transformers version. Exits non-zero if loading left any weight missing, unused or re-initialised.

    python tests/utils/load_and_run.py SOURCE OUT.safetensors
"""

import logging
import sys
from pathlib import Path

import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

# Run as a script, this file is no part of the `utils` package: tests/ goes on sys.path as pytest puts it there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared helpers in utils/
from utils import PHOTO_DIR  # noqa: E402

PHOTO = PHOTO_DIR / "Yao_Ming.jpeg"
LOADING_PROBLEMS = ("newly initialized", "were not used", "not initialized", "missing", "unexpected", "mismatch")


class LoadingProblems(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        message = record.getMessage()
        if any(word in message.lower() for word in LOADING_PROBLEMS):
            self.messages.append(message)


def load(source):
    """(model, processor) through the Auto classes; raises if any weight was not loaded exactly."""
    problems = LoadingProblems()
    logging.getLogger("transformers").addHandler(problems)
    try:
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
        model, info = AutoModelForImageTextToText.from_pretrained(
            source, trust_remote_code=True, dtype=torch.float32, output_loading_info=True
        )
    finally:
        logging.getLogger("transformers").removeHandler(problems)
    bad = {k: v for k, v in info.items() if v}
    if bad or problems.messages:
        raise RuntimeError(f"loading {source} with transformers {transformers.__version__}: {bad} {problems.messages}")
    return model.eval(), processor


def run(model, processor):
    inputs = processor(images=Image.open(PHOTO), text="What is in the image?", return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    return {
        "input_ids": inputs["input_ids"],
        "attention_mask": inputs["attention_mask"],
        "pixel_values": inputs["pixel_values"],
        "logits": logits,
        "tokens": tokens,
    }


if __name__ == "__main__":
    source, out = sys.argv[1:3]
    save_file({k: v.contiguous() for k, v in run(*load(source)).items()}, out)
