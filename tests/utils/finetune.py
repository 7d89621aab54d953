"""Shared pieces of the fine-tuning tests: a tiny trainable base model and a small data set of the real photos."""

import json
import os
import uuid
from pathlib import Path

import torch

from . import PHOTO_DIR as IMAGES

QUESTION = "What is in the image?"
ANSWERS = json.loads((IMAGES / "captions.json").read_text())  # photo file name -> what it shows
TEXT_ONLY = ("Say hello.", "Hello there.")
MIN_MARGIN = 1.0  # logits by which a trained tiny model's answer tokens must win: CPUs round ~1e-5 apart


def unique_folder(parent, stem):
    """transformers 4.57 caches remote code by the folder's basename: give every saved model its own."""
    return Path(parent) / f"{stem}_{uuid.uuid4().hex[:10]}"


def make_base(folder, projector_type="c-abs", seed=0, **projector):
    """A tiny random Honeybee saved as a Hub folder; returns the folder. `projector`: overrides of its config.

    Its `lm_head` is drawn with std 0.5 instead of 0.02: behind Llama's final RMSNorm, a 0.02 head caps every
    logit near 0.6, and LoRA (which leaves the head and the norm frozen) could never fit anything. Real LLMs have
    large logit ranges; this only gives the toy one.
    """
    from honeybee_hf.hub.folder import save_hub_folder
    from honeybee_hf.testing_utils import tiny_config, tiny_model, tiny_processor

    config = tiny_config(projector_type, **projector)
    model, processor = tiny_model(config, seed), tiny_processor(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        head = model.lm_head.weight
        head.copy_(torch.randn(head.shape, generator=generator) * 0.5)
    save_hub_folder(model, processor, folder)
    return Path(folder)


def small_photos(folder):
    from honeybee_hf.testing_utils import shrink_photos

    return shrink_photos(ANSWERS, folder)


def answer_margins(model, sample):
    """Teacher-forced margins of a training sample's answer (`HoneybeeConversationDataset` item): at each supervised
    token, its logit minus the best other token's (`<image>` excluded: generation suppresses it). All positive means
    greedy decoding writes the answer; a wide minimum means no CPU's rounding can change that."""
    input_ids, labels = torch.tensor([sample["input_ids"]]), torch.tensor(sample["labels"])
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=sample["pixel_values"]).logits[0].float()
    logits[:, model.config.image_token_id] = -torch.inf
    supervised = (labels[1:] != -100).nonzero().flatten()  # logits at t predict token t + 1
    logits, targets = logits[supervised], labels[1:][supervised]
    target = logits.gather(1, targets[:, None])[:, 0]
    return target - logits.scatter(1, targets[:, None], -torch.inf).max(1).values


def image_sample(name, question=QUESTION, answer=None):
    return {
        "image": name,
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": answer or ANSWERS[name]},
        ],
    }


def text_sample(question, answer):
    return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return Path(path)


def training_records():
    """One question per photo (image paths relative to --image_root) and a text-only sample."""
    return [image_sample(name) for name in ANSWERS] + [text_sample(*TEXT_ONLY)]


def load_model(folder, dtype=torch.float32):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=dtype).eval()


def load_processor(folder):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(folder, trust_remote_code=True)


def probe_batch(processor):
    """A fixed two-sample batch (one image each) for logit comparisons."""
    names = ["ca.jpeg", "titanic.jpeg"]
    return processor(
        text=[QUESTION, QUESTION],
        images=[[str(IMAGES / n)] for n in names],
        return_tensors="pt",
        padding_side="left",
    )


def venv_bin(name):
    """A console script of the running interpreter's venv (torchrun, accelerate)."""
    import sys

    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else None


def clean_env(**extra):
    """Subprocess environment: offline, one thread per process, no inherited distributed variables."""
    distributed = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in distributed}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.update({k: str(v) for k, v in extra.items()})
    return env
