"""A converted Honeybee larger than memory (the 13B: 26.7 GB of bf16 weights on a 24 GiB machine), loaded with
`device_map="auto"`, a `max_memory` budget and an `offload_folder`, as accelerate's big-model inference does it.

Each `--cpu-memory` budget is loaded `--repeats` times, each in a fresh process (so that one split's page cache and
allocations do not help the next), budgets interleaved, runs a photo + question, and records its placement, the
first position's logits, greedy tokens, time to the first token, decode s/token and peak RSS; the report then
compares the splits with each other: the same weights split differently between memory and disk must give the same
tokens and logits within bf16 noise.

    python benchmarks/bench_offload.py /big/hb-13b --cpu-memory 14GiB 10GiB --new-tokens 4
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C
import torch
from bench_e2e import Stamps

PHOTO = C.REPO / "assets" / "images" / "Yao_Ming.jpeg"
QUESTION = "What is in the image?"


def run_split(folder, cpu_memory, new_tokens, offload_folder):
    """In this process: load with the budget, generate, return what was measured."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, StoppingCriteriaList

    start = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(
        folder,
        trust_remote_code=True,
        dtype=torch.bfloat16,
        device_map="auto",
        max_memory={"cpu": cpu_memory},
        offload_folder=offload_folder,
    )
    load_s = time.perf_counter() - start
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = processor(images=Image.open(PHOTO), text=QUESTION, return_tensors="pt")
    placement = list(getattr(model, "hf_device_map", {"": "cpu"}).values())  # unset when all fits in memory
    stamps = Stamps(torch.device("cpu"), ("wall",))
    start = time.perf_counter()
    with torch.no_grad():
        generated = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            stopping_criteria=StoppingCriteriaList([stamps]),
            return_dict_in_generate=True,
            output_logits=True,
        )
    logits = generated.logits[0][0].float()  # the prompt's last position, before any processing
    tokens = generated.sequences
    stamps = stamps.times["wall"]
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {
        "cpu_memory": cpu_memory,
        "on_disk": placement.count("disk"),
        "in_memory": placement.count("cpu"),
        "load_s": load_s,
        "ttft_s": stamps[0] - start,
        "decode_s": C.median(steps),
        "tokens": tokens[0, inputs["input_ids"].shape[1] :].tolist(),
        "logits": logits.tolist(),
        "prompt_tokens": inputs["input_ids"].shape[1],
        "peak_rss_gib": C.peak_rss_gib(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--cpu-memory", nargs="+", default=["14GiB", "10GiB"], help="max_memory['cpu'] per split")
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process runs per budget")
    parser.add_argument("--split", help=argparse.SUPPRESS)  # internal: run one split, print its JSON
    parser.add_argument("--out", default=None, help="markdown report (default results/offload_<folder name>.md)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    if args.split:
        with tempfile.TemporaryDirectory(dir=args.folder.parent) as offload:
            print(json.dumps(run_split(args.folder, args.split, args.new_tokens, offload)))
        return

    runs = {budget: [] for budget in args.cpu_memory}
    for repeat in range(args.repeats):  # interleaved: A B, B A, ... so that drift in the machine hits both
        for budget in args.cpu_memory if repeat % 2 == 0 else args.cpu_memory[::-1]:
            command = [sys.executable, __file__, str(args.folder), "--split", budget]
            done = subprocess.run([*command, "--new-tokens", str(args.new_tokens)], capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"the split with --cpu-memory {budget} failed:\n{done.stderr[-3000:]}")
            runs[budget].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print({k: v for k, v in runs[budget][-1].items() if k != "logits"}, flush=True)
    first = runs[args.cpu_memory[0]][0]
    first_logits = torch.tensor(first["logits"])
    rows = []
    for budget, results in runs.items():
        diff = max((torch.tensor(r["logits"]) - first_logits).abs().max().item() for r in results)
        different = [r["tokens"] for r in results if r["tokens"] != first["tokens"]]
        rows.append(
            [
                budget,
                f"{results[0]['in_memory']} / {results[0]['on_disk']}",
                f"{C.median([r['load_s'] for r in results]):.0f}",
                C.median_and_runs([r["ttft_s"] for r in results], 1),
                C.median_and_runs([r["decode_s"] for r in results], 2),
                f"{max(r['peak_rss_gib'] for r in results):.2f}",
                f"{diff:.2e} (of max {first_logits.abs().max().item():.1f})",
                f"NO: {different[0]}" if different else "yes",
            ]
        )
    extra = [
        f"folder: {args.folder.name}; `from_pretrained(dtype=bfloat16, device_map='auto', max_memory={{'cpu': "
        "BUDGET}, offload_folder=...)`, each budget in a fresh process",
        f"one photo ({PHOTO.name}) + '{QUESTION}' = {first['prompt_tokens']} prompt tokens; greedy, "
        f"{args.new_tokens} new tokens; first split's tokens: {first['tokens']}; {args.repeats} runs per budget, "
        "interleaved (A B, B A, ...)",
        "modules: the entries of `hf_device_map` in memory / on disk; load s: median; TTFT and decode s/token (the "
        "median step of a run): median (runs); peak RSS: the highest high-water mark of the runs; logits: the "
        "prompt's last position (generate's first `logits`), largest difference over every run from the first run "
        "of the first budget; tokens: every run's",
    ]
    lines = C.header(
        "Offloaded real-size Honeybee on CPU", torch.device("cpu"), torch.bfloat16, C.command_line(), extra
    )
    lines += C.table(
        [
            "max_memory cpu",
            "modules in memory / on disk",
            "load s",
            "TTFT s (runs)",
            "decode s/token (runs)",
            "peak RSS GiB",
            "logits max |diff| vs first split",
            "same greedy tokens",
        ],
        rows,
    )
    print("\n".join(lines))
    out = args.out or (C.RESULTS / f"offload_{args.folder.name}.md")
    C.write_report(lines, out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
