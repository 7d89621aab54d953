"""Memory per rank under DDP, FSDP2 and DeepSpeed ZeRO-3: `honeybee-finetune --stage full`, 2 processes on CPU (gloo).

A Honeybee whose language model is widened to ~26M parameters (enough that sharding shows) trains one step under each
engine (the shipped configs; tests/training/finetune_worker.py --memory). Each rank reports the bytes of parameters it
holds (FSDP2: its DTensor shards; ZeRO-3: its partitions), of optimizer state (Adam moments) and its peak resident
memory. Sharded engines should hold about half of the full parameter bytes per rank with 2 ranks. One run per engine
(bytes held are deterministic; the peak RSS also counts Python, torch and the launcher's imports).

    python benchmarks/bench_sharded_memory.py
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from utils.finetune import ANSWERS, clean_env, image_sample, small_photos, venv_bin, write_jsonl  # noqa: E402

WIDE_TEXT = {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8}
ENGINES = {
    "DDP": ["torchrun", "--standalone", "--nproc_per_node", "2"],
    "FSDP2": ["accelerate", "launch", "--config_file", "fsdp"],
    "ZeRO-3": ["accelerate", "launch", "--config_file", "zero3"],
}


def make_wide_base(folder):
    from honeybee_hf.hub.folder import save_hub_folder
    from honeybee_hf.testing_utils import tiny_config, tiny_model, tiny_processor

    config = tiny_config("c-abs", text=WIDE_TEXT)
    model = tiny_model(config, seed=0)
    save_hub_folder(model, tiny_processor(config), folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def launcher(spec):
    from honeybee_hf.train.finetune import config_path

    if spec[0] == "torchrun":
        return [venv_bin("torchrun"), *spec[1:]]
    return [venv_bin("accelerate"), "launch", "--config_file", str(config_path(spec[3])), "--num_processes", "2",
            "--mixed_precision", "no"]  # fmt: skip


def main():
    rows = []
    with tempfile.TemporaryDirectory(prefix="hb_mem_") as tmp:
        tmp = Path(tmp)
        full = make_wide_base(tmp / "wide_base")
        data = write_jsonl(small_photos(tmp / "photos") / "train.jsonl", [image_sample(n) for n in ANSWERS])
        for engine, spec in ENGINES.items():
            args = ["--model", tmp / "wide_base", "--data", data, "--output_dir", tmp / engine, "--stage", "full",
                    "--max_steps", 1, "--per_device_train_batch_size", 1, "--save_strategy", "no",
                    "--memory", tmp / f"mem_{engine}"]  # fmt: skip
            command = [*launcher(spec), str(REPO / "tests" / "training" / "finetune_worker.py"), *map(str, args)]
            result = subprocess.run(command, capture_output=True, text=True, env=clean_env())
            if result.returncode != 0:
                rows.append((engine, "failed: " + result.stderr.strip().splitlines()[-1][:120]))
                continue
            for rank in (0, 1):
                report = json.loads((tmp / f"mem_{engine}.rank{rank}.json").read_text())
                rows.append((engine, rank, report))
    mib = 1 << 20
    print(f"load average at start {os.getloadavg()[0]:.1f}; full parameter bytes {full / mib:.1f} MiB (fp32)\n")
    print("| engine | rank | parameters held (MiB) | share of full | optimizer state (MiB) | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        if len(row) == 2:
            print(f"| {row[0]} | {row[1]} | | | | |")
            continue
        engine, rank, r = row
        print(f"| {engine} | {rank} | {r['parameters'] / mib:.1f} | {r['parameters'] / full:.2f} | "
              f"{r['optimizer_state'] / mib:.1f} | {r['peak_rss'] / mib:.0f} |")  # fmt: skip
    print(f"\nload average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
