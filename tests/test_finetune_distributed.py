"""`honeybee-finetune` in two processes on CPU (DDP over gloo): launched by torchrun and by accelerate with the
shipped config, ranks end in step, and a run killed after a checkpoint resumes to the very same result."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from finetune_helpers import (
    clean_env,
    image_sample,
    make_base,
    small_photos,
    text_sample,
    training_records,
    unique_folder,
    venv_bin,
    write_jsonl,
)
from safetensors.torch import load_file

from honeybee_hf.train.finetune import config_path

WORKER = Path(__file__).parent / "finetune_worker.py"
STEPS, SAVE_EVERY = 6, 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    photos = small_photos(root / "photos")
    records = [
        *training_records(),
        image_sample("ca.jpeg", "Where is it?", "On the west coast."),
        text_sample("Count to three.", "One, two, three."),
    ]
    return {
        "root": root,
        "base": make_base(unique_folder(root, "hb_ft_ddp_base")),
        "data": write_jsonl(photos / "train.jsonl", records),  # 8 samples, 2 of them text-only
    }


def _train_args(setup, out, steps=STEPS):
    return [
        "--model",
        setup["base"],
        "--data",
        setup["data"],
        "--output_dir",
        out,
        "--stage",
        "lora",
        "--max_steps",
        steps,
        "--save_steps",
        SAVE_EVERY,
        "--per_device_train_batch_size",
        2,
        "--logging_steps",
        1,
        "--learning_rate",
        "5e-3",
        "--gradient_checkpointing",
        "--seed",
        0,
        "--dump",
        out / "dump",
    ]


def _launch(launcher, args, tmp):
    command = [*launcher, str(WORKER), *map(str, args)]
    env = clean_env(HF_MODULES_CACHE=tmp / "modules")
    return subprocess.run(command, capture_output=True, text=True, timeout=400, env=env)


def _torchrun():
    torchrun = venv_bin("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this interpreter")
    return [torchrun, "--standalone", "--nproc_per_node", "2"]


def _losses(out):
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def _weights(out, rank):
    return load_file(str(out / "dump" / f"rank{rank}.safetensors"))


def _assert_same(a, b):
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_torchrun_two_processes_resume_after_interruption(setup, tmp_path):
    launcher = _torchrun()
    whole = tmp_path / "uninterrupted"
    result = _launch(launcher, _train_args(setup, whole), tmp_path)
    assert result.returncode == 0, result.stderr[-6000:]
    assert "samples_per_second" in result.stderr + result.stdout
    _assert_same(_weights(whole, 0), _weights(whole, 1))  # DDP kept the ranks in step
    assert len(_losses(whole)) == STEPS
    assert (whole / "adapter" / "adapter_model.safetensors").is_file()

    # Killed right after the checkpoint at step 3 (every rank, like a preempted job) ...
    broken = tmp_path / "interrupted"
    crashed = _launch(launcher, [*_train_args(setup, broken), "--crash_at", SAVE_EVERY], tmp_path)
    assert crashed.returncode != 0
    assert (broken / f"checkpoint-{SAVE_EVERY}").is_dir() and not (broken / "adapter").exists()
    # ... and the same command again picks the run up where it stopped.
    resumed = _launch(launcher, _train_args(setup, broken), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    assert f"resuming from {broken / f'checkpoint-{SAVE_EVERY}'}" in resumed.stderr
    assert _losses(broken) == _losses(whole)
    _assert_same(_weights(broken, 0), _weights(whole, 0))
    _assert_same(_weights(broken, 1), _weights(whole, 1))


def test_accelerate_launch_with_shipped_ddp_config(setup, tmp_path):
    accelerate = venv_bin("accelerate")
    if accelerate is None:
        pytest.skip("accelerate's launcher is not installed next to this interpreter")
    # The shipped config is for 8 GPUs in bf16; the flags scale it down to this machine's 2 CPU processes.
    config = str(config_path("ddp"))
    launcher = [accelerate, "launch", "--config_file", config, "--num_processes", "2", "--mixed_precision", "no"]
    out = tmp_path / "accelerate"
    result = _launch(launcher, _train_args(setup, out, steps=2), tmp_path)
    assert result.returncode == 0, result.stderr[-6000:]
    _assert_same(_weights(out, 0), _weights(out, 1))
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert state["log_history"][-1]["epoch"] == pytest.approx(2 * 2 * 2 / 8)  # both processes consumed data
