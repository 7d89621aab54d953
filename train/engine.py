"""Which distributed engine a launch asks for, the one it really got, and the accelerate state that makes FSDP and
DeepSpeed run on CPUs.

A launch asks for an engine through accelerate's environment (`accelerate launch --config_file`: ACCELERATE_USE_FSDP,
ACCELERATE_USE_DEEPSPEED) or through `TrainingArguments` flags under torchrun (`--fsdp`, `--deepspeed`); several
processes without either ask for DDP. What runs is what accelerate's `AcceleratorState` settled on, which can be less
(`check_engine` says so).
"""

import os

import torch

from ..cli import CommandError

FSDP, DEEPSPEED, DDP, SINGLE = "FSDP", "DeepSpeed", "DDP", "single process"


class EngineFallbackError(CommandError):
    """The launch asked for an engine that accelerate or torch replaced by another."""


def _env_flag(name):
    return os.environ.get(name, "false").lower() == "true"


def _flag_value(argv, name):
    """The value of `--name X` / `--name=X` in argv ('' when absent)."""
    value = ""
    for i, arg in enumerate(argv):
        flag, eq, rest = arg.partition("=")
        if flag == f"--{name}":
            value = rest if eq else (argv[i + 1] if i + 1 < len(argv) else "")
    return value


def world_size():
    return int(os.environ.get("WORLD_SIZE", "1"))


def requested_engine(argv):
    """FSDP, DeepSpeed, DDP or single process: what the launcher's environment and the flags ask for."""
    if _env_flag("ACCELERATE_USE_FSDP") or _flag_value(argv, "fsdp").strip():
        return FSDP
    if _env_flag("ACCELERATE_USE_DEEPSPEED") or _flag_value(argv, "deepspeed").strip():
        return DEEPSPEED
    return DDP if world_size() > 1 else SINGLE


def configure_cpu_state(engine):
    """Set up accelerate's process state for FSDP or DeepSpeed on CPUs; returns True when it did.

    accelerate enables FSDP only on top of a GPU-like multi-process state (`AcceleratorState` upgrades MULTI_GPU,
    MULTI_XPU, ... to FSDP, never MULTI_CPU), and DeepSpeed only without `cpu=True`, where it then finds no backend
    and counts one process. So on CPUs both configs silently train without their engine. PyTorch's FSDP2 and
    DeepSpeed's CPU accelerator both run over gloo: this builds the state accelerate would build on GPUs, on the CPU
    device, for `TrainingArguments(accelerator_config={"use_configured_state": True})` to take.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if world_size() < 2 or engine not in (FSDP, DEEPSPEED) or has_accelerator():
        return False
    if engine == FSDP:
        state = PartialState(cpu=True, backend="gloo")
        # The label AcceleratorState looks for before turning FSDP on; the device stays the CPU.
        state.distributed_type = DistributedType.MULTI_GPU
        os.environ.setdefault("FSDP_VERSION", "2")  # transformers 4.57's `--fsdp` otherwise means FSDP1
    else:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")  # deepspeed.init_distributed over gloo, one process per rank counted
    return True


def has_accelerator():
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def engine_in_use(accelerator):
    """(engine, description) of what `accelerator` runs, e.g. (FSDP, "FSDP2, 2 processes, gloo, CPU")."""
    from accelerate.utils import DistributedType

    state = accelerator.state
    kind = state.distributed_type
    if kind == DistributedType.FSDP:
        engine, name = FSDP, f"FSDP{getattr(state.fsdp_plugin, 'fsdp_version', 1)}"
    elif kind == DistributedType.DEEPSPEED:
        engine, name = DEEPSPEED, f"DeepSpeed ZeRO-{state.deepspeed_plugin.zero_stage}"
    elif state.num_processes > 1:
        engine, name = DDP, "DDP"
    else:
        return SINGLE, "single process, " + _device_name(accelerator.device)
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "no process group"
    return engine, f"{name}, {state.num_processes} processes, {backend}, {_device_name(accelerator.device)}"


def _device_name(device):
    return "CPU" if device.type == "cpu" else device.type.upper()


def check_engine(requested, accelerator, allow_fallback=False):
    """The description of the engine in use; raises EngineFallbackError when it is not the one requested."""
    engine, description = engine_in_use(accelerator)
    if engine != requested and not allow_fallback:
        raise EngineFallbackError(
            f"the launch asks for {requested} ({world_size()} processes) but got {description}; fix the launch "
            "(see the README's distributed section) or pass --allow_engine_fallback to train with it anyway"
        )
    return description


def keep_fp32_modules_in_fsdp2(trainer):
    """Give every module the model keeps in fp32 (the D-Abstractor) its own FSDP2 unit with an fp32 policy.

    FSDP2 all-gathers each unit's parameters in the mixed-precision dtype and computes with them; the official
    D-Abstractor always ran in fp32. accelerate's wrapping skips modules that are already sharded, so sharding these
    first, before `Accelerator.prepare`, keeps them fp32 while the rest follows the configured policy.
    """
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if plugin is None or plugin.fsdp_version != 2:
        return []
    policy = plugin.mixed_precision_policy
    if policy is None or policy.param_dtype in (None, torch.float32):
        return []
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_keep_in_fp32_modules_strict", None) or ())
    # The classes of those modules; under PEFT `modules_to_save` wraps them, and both copies are instances.
    kept = {name: getattr(module, "original_module", module) for name, module in base.named_modules()}
    classes = tuple({type(module) for name, module in kept.items() if name.rpartition(".")[2] in names})
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    sharded = []
    for name, module in model.named_modules():
        if classes and isinstance(module, classes):
            fully_shard(
                module,
                mp_policy=fp32,
                reshard_after_forward=plugin.reshard_after_forward,
                offload_policy=plugin.cpu_offload,
            )
            sharded.append(name)
    if sharded and plugin.transformer_cls_names_to_wrap is None:
        # Sharding renamed their class (FSDP<name>): accelerate's auto-wrap must not look for the old name.
        skip = {cls.__name__ for cls in classes}
        plugin.transformer_cls_names_to_wrap = [n for n in base._no_split_modules if n not in skip]
    return sharded
