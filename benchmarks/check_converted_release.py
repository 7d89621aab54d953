"""Load a release-sized Honeybee converted from benchmarks/write_official_archive.py's archive, as a user would
(`AutoModelForImageTextToText.from_pretrained(OUT, trust_remote_code=True, dtype=torch.bfloat16)`, fresh process),
and check it against the model that was written: every weight bit for bit (each official tensor drawn again from
its name and seed, mapped with `convert.official`, one at a time), the dtypes (CLIP, C-Abstractor and LLM bf16; a
D-Abstractor fp32), the peak resident memory of the load against the weight bytes, and one photo + question:
time to the first token, decode s/token (medians of 3) and greedy tokens.

    python benchmarks/check_converted_release.py /big/converted-7B-C --name 7B-C-Abs-M144
"""

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_e2e import Stamps  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor, StoppingCriteriaList  # noqa: E402
from write_official_archive import OFFICIAL_VOCAB, release_config  # noqa: E402

from honeybee_hf.convert.official import map_official_state_dict  # noqa: E402
from utils.official_format import draw, official_shapes  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())

    load = os.getloadavg()[0]
    start = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(args.folder, trust_remote_code=True, dtype=torch.bfloat16)
    processor = AutoProcessor.from_pretrained(args.folder, trust_remote_code=True)
    load_s = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(f"load {load_s:.0f} s; peak RSS {peak / 2**30:.2f} GiB = {peak / weights:.3f} x the weights' bytes")

    dtypes = {
        part: {p.dtype for p in getattr(model.model, part).parameters()}
        for part in ("vision_tower", "abstractor", "language_model")
    }
    print(f"dtypes: {dtypes}, lm_head {model.lm_head.weight.dtype}")

    ours, checked = model.state_dict(), 0
    for key, shape in official_shapes(release_config(args.name), OFFICIAL_VOCAB):
        for our_key, tensor in map_official_state_dict(
            {key: draw(key, shape, args.seed)}, ours, complete=False
        ).items():
            if not torch.equal(ours[our_key], tensor.to(ours[our_key].dtype)):
                sys.exit(f"{our_key} differs from the written {key}")
            checked += 1
    print(f"{checked} tensors equal to the written ones, bit for bit")

    photo = Image.open(Path(__file__).resolve().parents[1] / "assets" / "images" / "Yao_Ming.jpeg")
    inputs = processor(images=photo, text="What is in the image?", return_tensors="pt")
    with torch.no_grad():
        start = time.perf_counter()
        logits = model(**inputs).logits
        forward_s = time.perf_counter() - start
        first_token, steps, tokens = [], [], None
        for _ in range(3):  # each token time-stamped as it exists, so decode is measured, not a difference of runs
            stamps = Stamps(torch.device("cpu"), ("wall",))
            start = time.perf_counter()
            tokens = model.generate(
                **inputs,
                max_new_tokens=5,
                min_new_tokens=5,
                do_sample=False,
                stopping_criteria=StoppingCriteriaList([stamps]),
            )
            stamps = stamps.times["wall"]
            first_token.append(stamps[0] - start)
            steps.extend(b - a for a, b in zip(stamps, stamps[1:]))
    length = inputs["input_ids"].shape[1]
    print(f"prompt {length} tokens: forward {forward_s:.1f} s, logits finite: {bool(torch.isfinite(logits).all())}")
    print(
        f"generate: first token {statistics.median(first_token):.1f} s, decode {statistics.median(steps):.2f} "
        "s/token (medians of 3 runs of 5 tokens)"
    )
    print(f"greedy tokens {tokens[0, length:].tolist()}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"peak RSS of the run {peak:.2f} GiB; 1-min load average at start {load:.1f}, at end {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
