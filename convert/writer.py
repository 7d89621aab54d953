"""Writing the converted weights: safetensors shards of at most `max_shard_size` bytes, filled as the tensors arrive."""

import json
import math
import os
import re
import struct
from pathlib import Path

import torch
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


# safetensors' name of each dtype, and the order in which its `save_file` lays out a file: by dtype, in the reverse
# of its `Dtype` enum (safetensors/src/tensor.rs), then by name. Following that order makes a shard byte for byte
# what `save_file` writes for the same tensors (tests/convert/test_weight_files.py checks it against the installed
# safetensors).
SAFETENSORS_DTYPES = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.int16: "I16",
    torch.uint16: "U16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.uint32: "U32",
    torch.float32: "F32",
    torch.complex64: "C64",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.uint64: "U64",
}
_DTYPE_ORDER = (
    "BOOL F4 F6_E2M3 F6_E3M2 U8 I8 F8_E5M2 F8_E4M3 F8_E8M0 F8_E4M3FNUZ F8_E5M2FNUZ "
    "I16 U16 F16 BF16 I32 U32 F32 C64 F64 I64 U64"
).split()


def _nbytes(shape, dtype):
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def safetensors_header(layout, metadata):
    """(header bytes, {name: offset of its data in the file}) of a safetensors file holding `layout`, a list of
    (name, shape, dtype): the header's length (8 bytes, little-endian), then its JSON padded with spaces to a
    multiple of 8 bytes, as safetensors writes it."""
    entries = sorted(layout, key=lambda entry: (-_DTYPE_ORDER.index(SAFETENSORS_DTYPES[entry[2]]), entry[0]))
    header, offsets, position = {"__metadata__": metadata}, {}, 0
    for name, shape, dtype in entries:
        end = position + _nbytes(shape, dtype)
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [position, end]}
        offsets[name], position = position, end
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, {name: 8 + len(text) + offset for name, offset in offsets.items()}


def write_at(fd, data, offset):
    """Write all of `data` (bytes-like) at `offset` of the open file `fd`."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


class ShardWriter:
    """Writes the converted tensors as safetensors shards of at most `max_shard_size` bytes (or one tensor) while they
    arrive. The tensors of one official file are laid out first (`add_file`), from the names, shapes and dtypes its
    header gives: that fixes every shard's safetensors header and each tensor's place, so the headers are written at
    once and each tensor's bytes go to their place when it comes, in any order (`write`). A shard never spans two
    official files. The shards get their final names (`model-0000k-of-0000n`) at the end (`finish`)."""

    def __init__(self, folder, max_shard_size, progress):
        self.folder, self.max_shard_size = Path(folder), max_shard_size
        self.written, self.total_size, self.weight_map = [], 0, {}
        self.files, self.places = [], {}  # the current official file's shards; key -> [fd, offset, end, dtype]
        self.bar = tqdm(desc="Writing shards", unit="shard", position=1, disable=not progress)

    def __enter__(self):
        return self

    def __exit__(self, *error):
        for file in self.files:
            file.close()

    def add_file(self, layout):
        """Lay out one official file's converted tensors, `layout` = [(key, shape, dtype)] in order: a new shard
        whenever the next tensor would pass `max_shard_size`; each shard's header is written now."""
        shard, size = [], 0
        for key, shape, dtype in layout:
            nbytes = _nbytes(shape, dtype)
            if shard and size + nbytes > self.max_shard_size:
                self._start_shard(shard)
                shard, size = [], 0
            shard.append((key, shape, dtype))
            size += nbytes
        if shard:
            self._start_shard(shard)

    def _start_shard(self, layout):
        path = self.folder / f".shard-{len(self.written):05d}.safetensors"
        header, offsets = safetensors_header(layout, {"format": "pt"})
        file = open(path, "xb")
        self.files.append(file)
        write_at(file.fileno(), header, 0)
        for key, shape, dtype in layout:
            self.places[key] = [file.fileno(), offsets[key], offsets[key] + _nbytes(shape, dtype), dtype]
        self.written.append((path, [key for key, _, _ in layout]))
        self.total_size += sum(_nbytes(shape, dtype) for _, shape, dtype in layout)

    def write(self, key, parts):
        """Write the tensor `key`, given as `parts` to concatenate along dim 0 (`official.edited_parts`), each
        converted to the dtype laid out for it."""
        fd, offset, end, dtype = self.places.pop(key)
        finite = converted_finite = True
        for part in parts:
            converted = part.to(dtype).contiguous()
            if dtype == torch.float16:  # an overflow to ±inf is an error, an inf already there is not
                finite = finite and bool(torch.isfinite(part).all())
                converted_finite = converted_finite and bool(torch.isfinite(converted).all())
            data = converted.reshape(-1).view(torch.uint8).numpy()
            if offset + len(data) > end:
                raise ConversionError(f"{key} is larger than its place in the shard")
            write_at(fd, data, offset)
            offset += len(data)
        if offset != end:
            raise ConversionError(f"{key} is smaller than its place in the shard")
        if finite and not converted_finite:
            raise ConversionError(f"{key} overflows float16 (its values exceed ±65504); keep bfloat16 or float32")

    def close_file(self):
        """Close the current official file's shards, every tensor laid out for them written."""
        if self.places:
            raise ConversionError(f"{next(iter(self.places))} was laid out but never written")
        for file in self.files:
            file.close()
            os.chmod(file.name, 0o644)  # as the shards of transformers' save_pretrained
        self.bar.update(len(self.files))
        self.files = []

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
