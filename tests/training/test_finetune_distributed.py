"""`honeybee-finetune` in two processes on CPU over gloo: DDP launched by torchrun and by accelerate with the shipped
config (ranks end in step, a run killed after a checkpoint resumes to the very same result), FSDP2 and DeepSpeed
ZeRO-3 from the shipped configs, a two-node torchrun rendezvous, and the engine each run says it got.
check_engines.py (beside it) compares every engine x stage with a single process (losses, resume, export)."""

import json
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from honeybee_hf.train.finetune import config_path, merge_adapter
from utils.finetune import (
    ANSWERS,
    clean_env,
    image_sample,
    load_model,
    make_base,
    small_photos,
    text_sample,
    training_records,
    unique_folder,
    venv_bin,
    write_jsonl,
)

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


@pytest.fixture(scope="module")
def images_only(tmp_path_factory):
    """FSDP and ZeRO-3 need an image in every sample; a D-Abstractor model (the fp32 island)."""
    root = tmp_path_factory.mktemp("sharded")
    photos = small_photos(root / "photos")
    return {
        "root": root,
        "base": make_base(unique_folder(root, "hb_ft_sharded_base"), "d-abs"),
        "data": write_jsonl(photos / "train.jsonl", [image_sample(name) for name in ANSWERS]),
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
    command = [*launcher, *([] if "-m" in launcher else [str(WORKER)]), *map(str, args)]
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
    assert "engine: DDP, 2 processes, gloo, CPU" in result.stderr
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


def _sharded_args(setup, out, stage, steps=2):
    return [
        "--model", setup["base"], "--data", setup["data"], "--output_dir", out, "--stage", stage,
        "--max_steps", steps, "--save_steps", 1, "--per_device_train_batch_size", 1, "--logging_steps", 1,
        "--learning_rate", "5e-3", "--seed", 0,
    ]  # fmt: skip


def _accelerate(config, mixed_precision="no"):
    accelerate = venv_bin("accelerate")
    if accelerate is None:
        pytest.skip("accelerate's launcher is not installed next to this interpreter")
    return [accelerate, "launch", "--config_file", str(config_path(config)), "--num_processes", "2",
            "--mixed_precision", mixed_precision]  # fmt: skip


def _assert_trained_export(base, folder):
    """The Hub folder loads with a plain from_pretrained, holds every weight, and training moved the trained ones."""
    before, after = load_model(base).state_dict(), load_model(folder).state_dict()
    assert before.keys() == after.keys()
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])
    assert torch.equal(before["model.vision_tower.vision_model.embeddings.patch_embedding.weight"],
                       after["model.vision_tower.vision_model.embeddings.patch_embedding.weight"])  # fmt: skip


def test_fsdp2_from_the_shipped_config_keeps_the_d_abstractor_fp32(images_only, tmp_path):
    # accelerate resolves its FSDP config to no FSDP at all on CPUs unless honeybee-finetune sets the state up.
    out = tmp_path / "fsdp"
    args = [*_sharded_args(images_only, out, "full"), "--bf16", "--dtypes", tmp_path / "dtypes"]
    result = _launch(_accelerate("fsdp", "bf16"), args, tmp_path)
    assert result.returncode == 0, result.stderr[-6000:]
    assert "engine: FSDP2, 2 processes, gloo, CPU" in result.stderr
    for rank in (0, 1):  # the weights each forward computed with: the policy's bf16, but fp32 for the abstractor
        seen = json.loads((tmp_path / f"dtypes.rank{rank}.json").read_text())
        assert seen == {"abstractor": "torch.float32", "lm_head": "torch.bfloat16"}
    assert (out / "checkpoint-1" / "pytorch_model_fsdp_0").is_dir()  # sharded checkpoint (one file per rank)
    assert len(list((out / "checkpoint-1" / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2
    _assert_trained_export(images_only["base"], out / "model")


def test_deepspeed_zero3_saves_a_consolidated_model(images_only, tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed runs in .venvs/ds (scripts/setup_envs.sh creates it)")
    out = tmp_path / "zero3"
    result = _launch(_accelerate("zero3"), _sharded_args(images_only, out, "full"), tmp_path)
    assert result.returncode == 0, result.stderr[-6000:]
    assert "engine: DeepSpeed ZeRO-3, 2 processes, gloo, CPU" in result.stderr
    checkpoint = out / "checkpoint-1"
    assert (checkpoint / "global_step1").is_dir()  # ZeRO's own sharded states, for resuming
    consolidated = load_file(str(checkpoint / "model.safetensors"))  # the 16-bit copy gathered at save time
    assert consolidated["lm_head.weight"].shape == load_model(images_only["base"]).lm_head.weight.shape
    _assert_trained_export(images_only["base"], out / "model")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_torchrun_rendezvous_fsdp_lora(images_only, tmp_path):
    """Two `torchrun --nnodes 2 --node_rank {0,1}` launches meet at a c10d rendezvous on 127.0.0.1, as on a cluster."""
    torchrun = _torchrun()[0]
    endpoint = f"127.0.0.1:{_free_port()}"
    out = tmp_path / "two_nodes"
    copies = tmp_path / "code_copies"
    args = [*_sharded_args(images_only, out, "lora"), "--fsdp", "full_shard auto_wrap", "--code_copies", copies]
    env = clean_env(HF_MODULES_CACHE=tmp_path / "modules")  # one cache for both nodes, as a shared home gives
    nodes = [
        subprocess.Popen(
            [
                torchrun,
                "--nnodes",
                "2",
                "--node_rank",
                str(rank),
                "--nproc_per_node",
                "1",
                "--rdzv_backend",
                "c10d",
                "--rdzv_endpoint",
                endpoint,
                "--rdzv_id",
                "honeybee-test",
                str(WORKER),
                *map(str, args),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=400) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-4000:] + outputs[1][1][-4000:]
    assert "engine: FSDP2, 2 processes, gloo, CPU" in outputs[0][1]
    # transformers copies remote code into its cache in place: a node copying while the other imports it can
    # import a half-written file (huggingface/transformers#27421). One process must copy it, before the others.
    cache = str(tmp_path / "modules")
    cached = {rank: [path for path in json.loads(Path(f"{copies}.rank{rank}.json").read_text()) if cache in path]
              for rank in (0, 1) if Path(f"{copies}.rank{rank}.json").exists()}  # fmt: skip
    assert cached.get(0) and not cached.get(1), cached
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    merged = merge_adapter(images_only["base"], out / "adapter", tmp_path / "merged").state_dict()
    base = load_model(images_only["base"]).state_dict()
    q_proj = [name for name in base if "language_model" in name and name.endswith("q_proj.weight")]
    assert q_proj and all(not torch.equal(merged[name], base[name]) for name in q_proj)  # the adapter was trained


def test_a_downgraded_engine_stops_with_one_line(images_only, tmp_path):
    """The FSDP config launched as one process gets no FSDP from accelerate: said in one line, or trained on purpose."""
    accelerate = _accelerate("fsdp")
    launcher = [*accelerate[: accelerate.index("--num_processes") + 1], "1", "--mixed_precision", "no"]
    launcher += ["-m", "honeybee_hf.train.finetune"]  # the console script itself, not the test worker
    args = _sharded_args(images_only, tmp_path / "one", "full", steps=1)
    refused = _launch(launcher, args, tmp_path)
    assert refused.returncode != 0
    assert 'finetune.py", line' not in refused.stderr  # no traceback of ours (the launcher may print its own)
    line = next(line for line in refused.stderr.splitlines() if "asks for FSDP" in line)
    assert "got single process, CPU" in line and "--allow_engine_fallback" in line
    allowed = _launch(launcher, [*args, "--allow_engine_fallback"], tmp_path)
    assert allowed.returncode == 0, allowed.stderr[-4000:]
    assert "engine: single process, CPU" in allowed.stderr
