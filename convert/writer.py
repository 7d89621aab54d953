"""Writing the converted weights: safetensors shards of at most `max_shard_size` bytes."""

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from . import ConversionError


def parse_size(size):
    """`5GB`, `500MB`, `2GiB`, or a number of bytes -> bytes (decimal units as transformers' max_shard_size)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", str(size), flags=re.IGNORECASE)
    if not match:
        raise ConversionError(f"cannot read the size {size!r}; write e.g. 5GB, 500MB or a number of bytes")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    return int(number * base ** "BKMGT".index(unit[0]))


class ShardWriter:
    """Writes mapped tensors as safetensors shards of at most `max_shard_size` bytes (or one tensor), as each
    official file is mapped: a shard never spans two official files, so nothing of a file is held once the next is
    read. The shards get their final names (`model-0000k-of-0000n`) at the end."""

    def __init__(self, folder, max_shard_size, progress):
        self.folder, self.max_shard_size = Path(folder), max_shard_size
        self.written, self.total_size, self.weight_map = [], 0, {}
        self.bar = tqdm(desc="Writing shards", unit="shard", position=1, disable=not progress)

    def add(self, mapped, dtypes):
        """Write every tensor of `mapped` (one official file, mapped), converted to `dtypes[key]`."""
        shard, size = {}, 0
        for key, tensor in mapped.items():
            nbytes = tensor.numel() * torch.empty((), dtype=dtypes[key]).element_size()
            if shard and size + nbytes > self.max_shard_size:
                self._write(shard)
                shard, size = {}, 0
            converted = tensor.to(dtypes[key]).contiguous()
            if dtypes[key] == torch.float16 and not torch.isfinite(converted).all() and torch.isfinite(tensor).all():
                raise ConversionError(f"{key} overflows float16 (its values exceed ±65504); keep bfloat16 or float32")
            shard[key] = converted
            size += nbytes
        if shard:
            self._write(shard)

    def _write(self, shard):
        path = self.folder / f".shard-{len(self.written):05d}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        path.chmod(0o644)  # safetensors writes 0600 (a temporary file renamed); a Hub folder is for sharing
        self.written.append((path, list(shard)))
        self.total_size += sum(t.numel() * t.element_size() for t in shard.values())
        self.bar.update(1)

    def finish(self):
        self.bar.close()
        n = len(self.written)
        for i, (path, keys) in enumerate(self.written):
            name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / name)
            self.weight_map.update(dict.fromkeys(keys, name))
        if n > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
