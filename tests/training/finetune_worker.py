"""`honeybee-finetune` as launched by torchrun / accelerate in test_finetune_distributed.py (beside it), plus probes:

    --crash_at N   die (like a preempted job) right after checkpoint N is on disk, on every rank
    --dump DIR     write each rank's trainable weights to DIR/rank{R}.safetensors at the end of training
                   (plain tensors only: under FSDP / ZeRO-3 the saved model is what the tests compare)
    --memory FILE  write to FILE.rank{R}.json the bytes of parameters, gradients and optimizer state this rank holds
                   after the first step, and its peak resident memory (benchmarks/bench_sharded_memory.py)
    --dtypes FILE  write to FILE.rank{R}.json the dtype of the weights the abstractor's and the LM head's
                   forward computed with in the first step (what FSDP's mixed-precision policy handed them)
    --code_copies FILE
                   write to FILE.rank{R}.json the files this rank copied into transformers' modules cache (the model's
                   remote code); each copy is slowed (half the file, a pause, the rest), so that ranks which copy
                   at the same time all find a file missing or half written, and all copy it

Every other argument goes to the command unchanged.
"""

import json
import os
import shutil
import sys
import time
import types
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import TrainerCallback

from honeybee_hf.train import finetune


def _pop(argv, flag):
    if flag not in argv:
        return None
    i = argv.index(flag)
    value = argv[i + 1]
    del argv[i : i + 2]
    return value


def _local_bytes(tensor):
    """Bytes of `tensor` held by this rank: a DTensor's local shard (FSDP2), a ZeRO-3 partition, or all of it."""
    if tensor is None:
        return 0
    if hasattr(tensor, "ds_tensor"):  # DeepSpeed ZeRO-3 keeps an empty placeholder and the rank's partition
        tensor = tensor.ds_tensor
    if hasattr(tensor, "to_local"):
        tensor = tensor.to_local()
    return tensor.numel() * tensor.element_size()


def _optimizer_bytes(optimizer):
    """Bytes of optimizer state (Adam moments) this rank holds."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer  # accelerate's and transformers' wrappers
    states = [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(_local_bytes(t) for t in states)


class Probe(TrainerCallback):
    def __init__(self, crash_at, dump, dtypes, memory=None):
        self.crash_at, self.dump, self.dtypes, self.seen, self.memory = crash_at, dump, dtypes, {}, memory

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.memory is None or state.global_step != 1:
            return
        import resource

        report = {
            "parameters": sum(_local_bytes(p) for p in model.parameters()),
            "optimizer_state": _optimizer_bytes(optimizer),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
        Path(f"{self.memory}.rank{args.process_index}.json").write_text(json.dumps(report))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.dtypes is None:
            return
        for name, module in model.named_modules():
            # The last Linear of each: its weight is all-gathered while the enclosing unit runs.
            for part, suffix in (("abstractor", "output_proj"), ("lm_head", "lm_head")):
                if part in name and name.endswith(suffix) and isinstance(module, torch.nn.Linear):
                    module.register_forward_pre_hook(self._recorder(part, args.process_index))

    def _recorder(self, part, rank):
        def record(module, inputs):
            if part not in self.seen:
                self.seen[part] = str(module.weight.dtype)
                Path(f"{self.dtypes}.rank{rank}.json").write_text(json.dumps(self.seen))

        return record

    def on_save(self, args, state, control, **kwargs):
        if self.crash_at is not None and state.global_step == self.crash_at:
            if torch.distributed.is_initialized():
                torch.distributed.barrier()  # every rank has written its part of the checkpoint
            print(f"rank {args.process_index}: simulated crash after step {state.global_step}", flush=True)
            os._exit(17)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.dump is not None:
            weights = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
            Path(self.dump).mkdir(parents=True, exist_ok=True)
            save_file(weights, str(Path(self.dump) / f"rank{args.process_index}.safetensors"))


def record_code_copies(report):
    from transformers import dynamic_module_utils

    copied = []

    def copy(source, target, **kwargs):
        copied.append(str(target))
        Path(report).write_text(json.dumps(copied))
        data = Path(source).read_bytes()
        with open(target, "wb") as out:
            out.write(data[: len(data) // 2])
            out.flush()
            time.sleep(0.3)
            out.write(data[len(data) // 2 :])
        return target

    patched = types.ModuleType("shutil")
    patched.__dict__.update(vars(shutil))
    patched.copy = patched.copyfile = copy  # transformers 4.57 calls copy, 5.x copyfile
    dynamic_module_utils.shutil = patched


if __name__ == "__main__":
    argv = sys.argv[1:]
    crash_at, dump, dtypes = _pop(argv, "--crash_at"), _pop(argv, "--dump"), _pop(argv, "--dtypes")
    memory, code_copies = _pop(argv, "--memory"), _pop(argv, "--code_copies")
    if code_copies:
        record_code_copies(f"{code_copies}.rank{os.environ['RANK']}.json")
    finetune.run(argv, callbacks=[Probe(int(crash_at) if crash_at else None, dump, dtypes, memory)])
