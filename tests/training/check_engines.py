"""Every distributed engine of `honeybee-finetune` against a single-process run, on CPU with 2 processes (gloo).

For each engine x stage: the 2-process run's logged loss curve against a single process with the same global batch,
a run killed after its checkpoint and resumed against the uninterrupted one (final weights), and the exported result
(stage full: the Hub folder `model/`; stage lora: the adapter merged into its base) loaded with a plain
`from_pretrained` against the single-process result's logits. Too long for the suite (three launches per row);
test_finetune_distributed.py beside it runs one row of each kind. Prints a table:

    python tests/training/check_engines.py [--engines fsdp,fsdp_torchrun,zero2,zero3] [--stages full,lora]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared helpers in utils/

from honeybee_hf.train.finetune import config_path, merge_adapter  # noqa: E402
from utils.finetune import (  # noqa: E402
    ANSWERS,
    clean_env,
    image_sample,
    load_model,
    load_processor,
    make_base,
    probe_batch,
    small_photos,
    unique_folder,
    venv_bin,
    write_jsonl,
)

WORKER = Path(__file__).resolve().parent / "finetune_worker.py"
STEPS, SAVE_EVERY = 4, 2
LOSS_TOLERANCE = 1e-3  # reductions in another order (per-rank means, all-reduce) move fp32 losses ~1e-5
WEIGHT_TOLERANCE = 0.0  # a resumed run restores every rank's state: nothing may differ
LOGIT_TOLERANCE = 1e-3  # the same four optimizer steps, reduced in another order

# engine -> (launcher prefix, extra finetune flags, the banner the run must print)
ENGINES = {
    "fsdp": ("accelerate:fsdp", [], "FSDP2, 2 processes, gloo, CPU"),
    "fsdp_torchrun": ("torchrun", ["--fsdp", "full_shard auto_wrap"], "FSDP2, 2 processes, gloo, CPU"),
    "zero2": ("accelerate:zero2", [], "DeepSpeed ZeRO-2, 2 processes, gloo, CPU"),
    "zero3": ("accelerate:zero3", [], "DeepSpeed ZeRO-3, 2 processes, gloo, CPU"),
    "ddp": ("torchrun", [], "DDP, 2 processes, gloo, CPU"),
}


def launcher(kind):
    if kind == "torchrun":
        return [venv_bin("torchrun"), "--standalone", "--nproc_per_node", "2"]
    name = kind.split(":")[1]
    accelerate = venv_bin("accelerate")
    config = str(config_path(name))
    return [accelerate, "launch", "--config_file", config, "--num_processes", "2", "--mixed_precision", "no"]


def setup(root):
    photos = small_photos(root / "photos")
    # Every sample an image; 4 samples, so every step of both runs sees a full global batch of 2 (with 5, the last
    # batch of an epoch holds one sample in one process, and accelerate wraps around to fill it in two).
    samples = [image_sample(name) for name in sorted(ANSWERS)[:4]]
    data = write_jsonl(photos / "train.jsonl", samples)
    # No dropout anywhere (the D-Abstractor's default is 0.1; LoRA's is off through --lora_dropout 0): one process
    # draws one mask for its batch of 2, each rank its own for a batch of 1, so the gradients would differ by design.
    base = make_base(unique_folder(root, "hb_engines_base"), "d-abs", dropout=0.0)
    return {"root": root, "base": base, "data": data}


def train_args(setup, out, stage, batch):
    return [
        "--model", setup["base"], "--data", setup["data"], "--output_dir", out, "--stage", stage,
        "--max_steps", STEPS, "--save_steps", SAVE_EVERY, "--per_device_train_batch_size", batch,
        "--logging_steps", 1, "--lora_dropout", 0, "--seed", 0, "--data_seed", 0,
        # SGD: Adam's first step divides each gradient by its own size, so reduction-order noise in a near-zero
        # gradient becomes a full learning-rate step and the curves drift apart for no fault of the engine.
        "--optim", "sgd", "--learning_rate", "0.02",
    ]  # fmt: skip


def run(prefix, args, tmp, timeout=600):
    command = [*prefix, str(WORKER), *map(str, args)]
    env = clean_env(HF_MODULES_CACHE=Path(tmp) / "modules")
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def losses(out):
    history = json.loads((Path(out) / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


def result_model(setup, out, stage, tmp):
    """The run's exported result as a plain model: model/ (full), or base + adapter merged (lora)."""
    out = Path(out)
    if stage == "lora":
        merged = unique_folder(tmp, f"merged_{out.name}")
        merge_adapter(setup["base"], out / "adapter", merged)
        return load_model(merged)
    return load_model(out / "model")


def max_weight_diff(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits.float()


def check(setup, engine, stage, reference, tmp):
    """One row: {check: (ok, measurement)}."""
    kind, extra, banner = ENGINES[engine]
    prefix = launcher(kind)
    row = {}
    whole = Path(tmp) / f"{engine}_{stage}_whole"
    result = run(prefix, [*train_args(setup, whole, stage, 1), *extra], tmp)
    if result.returncode != 0:
        return {"runs": (False, result.stderr.strip().splitlines()[-1][:200])}
    row["banner"] = (f"engine: {banner}" in result.stderr, banner)
    curve = losses(whole)
    diff = max(abs(a - b) for a, b in zip(curve, reference["losses"], strict=True))
    row["loss = 1 process"] = (diff <= LOSS_TOLERANCE, f"max |diff| {diff:.1e} over {STEPS} steps {curve}")

    broken = Path(tmp) / f"{engine}_{stage}_broken"
    crashed = run(prefix, [*train_args(setup, broken, stage, 1), *extra, "--crash_at", SAVE_EVERY], tmp)
    resumed = run(prefix, [*train_args(setup, broken, stage, 1), *extra], tmp)
    if crashed.returncode == 0 or resumed.returncode != 0 or "resuming from" not in resumed.stderr:
        row["resume"] = (False, (resumed.stderr.strip().splitlines() or ["?"])[-1][:200])
    else:
        diff = max_weight_diff(result_model(setup, broken, stage, tmp), result_model(setup, whole, stage, tmp))
        row["resume"] = (diff <= WEIGHT_TOLERANCE, f"killed at step {SAVE_EVERY}; weights max |diff| {diff:.1e}")

    model = result_model(setup, whole, stage, tmp)
    diff = (logits(model, reference["batch"]) - reference["logits"]).abs().max().item()
    row["export = 1 process"] = (diff <= LOGIT_TOLERANCE, f"logits max |diff| {diff:.1e}")
    return row


def single_process_reference(setup, stage, tmp):
    out = Path(tmp) / f"single_{stage}"
    result = run([sys.executable], train_args(setup, out, stage, 2), tmp)
    assert result.returncode == 0, result.stderr[-4000:]
    batch = dict(probe_batch(load_processor(setup["base"])))
    return {"losses": losses(out), "batch": batch, "logits": logits(result_model(setup, out, stage, tmp), batch)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="fsdp,fsdp_torchrun,zero2,zero3")
    parser.add_argument("--stages", default="full,lora")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="hb_engines_") as tmp:
        data = setup(Path(tmp))
        for stage in args.stages.split(","):
            reference = single_process_reference(data, stage, tmp)
            print(f"single process, stage {stage}: losses {[round(x, 4) for x in reference['losses']]}", flush=True)
            for engine in args.engines.split(","):
                start = time.perf_counter()
                row = check(data, engine, stage, reference, tmp)
                for name, (ok, measured) in row.items():
                    rows.append((engine, stage, name, "pass" if ok else "FAIL", measured))
                    print(" | ".join(rows[-1]), flush=True)
                print(f"  ({engine} {stage}: {time.perf_counter() - start:.0f} s)", flush=True)
    print("\n| engine | stage | check | outcome | measured |\n|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0 if all(row[3] == "pass" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
