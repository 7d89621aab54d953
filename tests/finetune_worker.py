"""`honeybee-finetune` as launched by torchrun / accelerate in tests/test_finetune_distributed.py, plus two probes:

    --crash_at N   die (like a preempted job) right after checkpoint N is on disk, on every rank
    --dump DIR     write each rank's trainable weights to DIR/rank{R}.safetensors at the end of training

Every other argument goes to the command unchanged.
"""

import os
import sys
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


class Probe(TrainerCallback):
    def __init__(self, crash_at, dump):
        self.crash_at, self.dump = crash_at, dump

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


if __name__ == "__main__":
    argv = sys.argv[1:]
    crash_at, dump = _pop(argv, "--crash_at"), _pop(argv, "--dump")
    finetune.run(argv, callbacks=[Probe(int(crash_at) if crash_at else None, dump)])
