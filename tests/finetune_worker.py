"""`honeybee-finetune` as launched by torchrun / accelerate in tests/test_finetune_distributed.py, plus two probes:

    --crash_at N   die (like a preempted job) right after checkpoint N is on disk, on every rank
    --dump DIR     write each rank's trainable weights to DIR/rank{R}.safetensors at the end of training
                   (plain tensors only: under FSDP / ZeRO-3 the saved model is what the tests compare)
    --dtypes FILE  write to FILE.rank{R}.json the dtype of the weights the abstractor's and the LM head's
                   forward computed with in the first step (what FSDP's mixed-precision policy handed them)

Every other argument goes to the command unchanged.
"""

import json
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
    def __init__(self, crash_at, dump, dtypes):
        self.crash_at, self.dump, self.dtypes, self.seen = crash_at, dump, dtypes, {}

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


if __name__ == "__main__":
    argv = sys.argv[1:]
    crash_at, dump, dtypes = _pop(argv, "--crash_at"), _pop(argv, "--dump"), _pop(argv, "--dtypes")
    finetune.run(argv, callbacks=[Probe(int(crash_at) if crash_at else None, dump, dtypes)])
