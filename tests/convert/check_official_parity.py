"""Compare a converted `tiny_cabs_m16` Hub folder with the outputs the official code recorded for it
(tests/fixtures/official_ckpt/tiny_cabs_m16.expected.*): processor ids, pixel values, logits and greedy tokens.
Loads the folder through the Auto classes with trust_remote_code (tests/utils/load_and_run.py), in fp32. Run by the
tests in-process and, under the other transformers version, as a script:

    python tests/convert/check_official_parity.py FOLDER OUT.json
"""

import json
import sys
from pathlib import Path

import torch
import transformers
from PIL import Image
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared helpers in utils/
from utils import OFFICIAL_CKPT as FIXTURE  # noqa: E402
from utils import PHOTO_DIR as IMAGES  # noqa: E402
from utils.load_and_run import load  # noqa: E402


def _compare_ids(ours, expected, image_token_id):
    official = expected.clone()
    official[official == -1] = image_token_id  # the official placeholder id is -1
    return ours.shape == official.shape and torch.equal(ours, official)


def _max_logit_diff(ours, expected, mask):
    """Max |diff| over the official vocabulary (ours has one more column, <image>) at unpadded positions."""
    rows = mask.bool()
    return (ours[..., : expected.shape[-1]][rows] - expected[rows]).abs().max().item()


def compare(folder):
    meta = json.loads((FIXTURE / "tiny_cabs_m16.expected.json").read_text())
    expected = load_file(FIXTURE / "tiny_cabs_m16.expected.safetensors")
    model, processor = load(folder)  # raises on any missing, unused or re-initialised weight
    image_token_id = model.config.image_token_id
    images = [Image.open(IMAGES / image["file"]) for image in meta["images"]]
    kwargs = meta["generate_kwargs"]
    report = {"transformers": transformers.__version__}

    batch = processor(images=images, text=meta["prompts"], return_tensors="pt")
    report["batch_input_ids_equal"] = _compare_ids(batch["input_ids"], expected["inputs.input_ids"], image_token_id)
    report["batch_attention_mask_equal"] = torch.equal(batch["attention_mask"], expected["inputs.attention_mask"])
    report["pixel_values_max_diff"] = (batch["pixel_values"] - expected["inputs.pixel_values"]).abs().max().item()
    with torch.no_grad():
        logits = model(**batch).logits
        report["batch_logits_max_diff"] = _max_logit_diff(logits, expected["logits"], batch["attention_mask"])
        new = model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1] :]
    report["batch_generate_equal"] = torch.equal(new, expected["generate.batch"])
    report["batch_generate"] = new.tolist()

    for i, (image, prompt) in enumerate(zip(images, meta["prompts"])):
        single = processor(images=[image], text=prompt, return_tensors="pt")
        report[f"single{i}_input_ids_equal"] = _compare_ids(
            single["input_ids"], expected[f"single{i}.input_ids"], image_token_id
        )
        with torch.no_grad():
            logits = model(**single).logits
            report[f"single{i}_logits_max_diff"] = _max_logit_diff(
                logits, expected[f"single{i}.logits"], single["attention_mask"]
            )
            new = model.generate(**single, **kwargs)[:, single["input_ids"].shape[1] :]
        report[f"single{i}_generate_equal"] = torch.equal(new, expected[f"generate.single{i}"])
        report[f"single{i}_generate_text"] = processor.batch_decode(new, skip_special_tokens=True)[0]
    return report


if __name__ == "__main__":
    folder, out = sys.argv[1:3]
    Path(out).write_text(json.dumps(compare(folder), indent=2))
