"""Reading one official weight file: its tensors' names, shapes and dtypes first, then the tensors one at a time.

A `.bin` written by `torch.save` (every released checkpoint) is a zip of records stored uncompressed, in this order:
`<root>/data.pkl` (the pickled state dict: each tensor names its storage, dtype, shape, strides and offset), a few
small records (`.format_version`, `.storage_alignment`, `byteorder`), one record per storage (`<root>/data/<key>`),
`version` and `.data/serialization_id`, then the central directory. `StreamedBin` reads those records front to back
from any stream, a file or a member of a `.tar.gz`, in one pass: it unpickles `data.pkl` with an unpickler that
builds nothing but tensor descriptions (see `_StateDictUnpickler`), so every name, shape and dtype is known before
any weight, then builds each tensor when its storage's record arrives. Nothing is spooled to disk, and memory holds
one storage at a time.

torch.save writes every local header with bit 3 set and zero sizes: each record's sizes follow its data, in a data
descriptor (signature, CRC-32, sizes: 16 bytes; 24 once the record starts past 4 GiB, where its local header carries
a ZIP64 field). A stream cannot look ahead, so each record's length comes from elsewhere: `data.pkl` ends where the
unpickler stops, a storage's length is its size in `data.pkl`, and the small records are a few bytes, found by their
descriptor (signature, CRC-32 and sizes must all agree). Every descriptor is checked against the length read; the
storages' CRC-32 is not computed (nor did the memory-mapped `torch.load` this reader replaces; an archive's gzip
checksum covers its bytes). Records whose sizes are in their local header, as other zip writers put them, are
read too.

What this reader does not handle it says so: a file that does not start as torch.save starts one (a legacy,
pre-zip `.bin`, or a zip whose first record is not `data.pkl`) raises `NotStreamable` before any tensor is read, and
the caller loads it whole from disk with `torch.load(weights_only=True)` instead (`load_weight_file`), naming it in
one line on stderr. Anything else that torch.save never writes (a compressed or encrypted record, a storage record
`data.pkl` does not use or that comes twice, a big-endian file, a record that runs past the end) is refused with a
`ConversionError` naming the file: by then part of the file is read, and refusing is clearer than guessing. A
`.safetensors` weight file is always loaded whole from disk (it is not a release format).
"""

import collections
import contextlib
import dataclasses
import math
import pickle
import struct
import sys
import zlib
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import ConversionError

LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # signature .. extra length (APPNOTE 4.3.7)
LOCAL_HEADER_SIGNATURE = b"PK\x03\x04"
DESCRIPTOR_SIGNATURE = b"PK\x07\x08"
CENTRAL_DIRECTORY_SIGNATURES = (b"PK\x01\x02", b"PK\x05\x06", b"PK\x06\x06")  # no more local records after these
FLAG_ENCRYPTED, FLAG_DESCRIPTOR = 0x0001, 0x0008
STORED = 0
ZIP64_FIELD = 0x0001
_MAX_SMALL_RECORD = 1 << 16  # the records between data.pkl and the storages, and after them, hold a few bytes
_MAX_PICKLE = 256 << 20  # data.pkl of a 10 GB shard is ~100 KB; a larger one is not a state dict
_SKIP_CHUNK = 16 << 20

# The storage types torch.save names in data.pkl (`torch.<Name>Storage`, one per dtype; torch.UntypedStorage with
# an explicit dtype for the others) and the dtypes it names for `_rebuild_tensor_v3`.
_TYPED_STORAGES = {
    "BoolStorage": torch.bool,
    "ByteStorage": torch.uint8,
    "CharStorage": torch.int8,
    "ShortStorage": torch.int16,
    "IntStorage": torch.int32,
    "LongStorage": torch.int64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
}


_DTYPES = {  # looked up by name from a fixed list: a name from the pickle never reaches getattr(torch, ...)
    name: getattr(torch, name)
    for name in (
        "bool uint8 int8 int16 int32 int64 uint16 uint32 uint64 float16 bfloat16 float32 float64 complex64 "
        "complex128 float8_e4m3fn float8_e5m2 float8_e4m3fnuz float8_e5m2fnuz"
    ).split()
    if isinstance(getattr(torch, name, None), torch.dtype)
}


class NotStreamable(Exception):
    """The file does not start as torch.save starts a `.bin`; `consumed` holds the bytes read from the stream."""

    def __init__(self, reason, consumed):
        super().__init__(reason)
        self.consumed = consumed


# ---------------------------------------------------------------------------------------------------------
# data.pkl: a state dict of tensor descriptions, nothing built
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _StorageType:
    dtype: torch.dtype  # torch.uint8 for UntypedStorage


@dataclasses.dataclass(frozen=True, slots=True)
class _Storage:
    key: str
    dtype: torch.dtype
    numel: int

    @property
    def nbytes(self):
        return self.numel * _itemsize(self.dtype)


@dataclasses.dataclass(frozen=True, slots=True)
class _Tensor:
    """A tensor as data.pkl describes it: a view of a storage (offset and strides in elements of `dtype`)."""

    storage: _Storage
    dtype: torch.dtype
    offset: int
    shape: tuple
    stride: tuple


class _RefusedGlobal(pickle.UnpicklingError):
    pass


def _itemsize(dtype):
    return torch.empty((), dtype=dtype).element_size()


def _is_ints(values):
    return isinstance(values, tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def _tensor(storage, offset, shape, stride, dtype):
    if not isinstance(storage, _Storage) or not (_is_ints((offset,)) and _is_ints(shape) and _is_ints(stride)):
        raise pickle.UnpicklingError("a tensor whose storage, offset, shape or strides are not what torch.save writes")
    if len(shape) != len(stride) or offset < 0 or min(shape + stride, default=0) < 0:
        raise pickle.UnpicklingError(f"a tensor of shape {shape} and strides {stride} at offset {offset}")
    return _Tensor(storage, dtype, offset, shape, stride)


def _rebuild_tensor_v2(storage, offset, shape, stride, requires_grad, backward_hooks, metadata=None):
    return _tensor(storage, offset, shape, stride, getattr(storage, "dtype", None))


def _rebuild_tensor_v3(storage, offset, shape, stride, requires_grad, backward_hooks, dtype, metadata=None):
    if not isinstance(dtype, torch.dtype) or getattr(storage, "dtype", None) != torch.uint8:
        raise pickle.UnpicklingError("a tensor of an untyped storage without a dtype")
    return _tensor(storage, offset, shape, stride, dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    return data  # a Parameter in a state dict: its tensor


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles data.pkl into {name: `_Tensor`}, calling nothing but the stand-ins below: as safe as
    `torch.load(weights_only=True)` and narrower. The globals a torch.save'd dict of tensors names are mapped to
    functions that only record what they are given (`torch._utils._rebuild_tensor_v2` / `_v3` /
    `_rebuild_parameter`), to `collections.OrderedDict`, to storage-type and dtype markers; any other global (a class
    to instantiate, a function to call) raises `_RefusedGlobal`, before anything is called."""

    def __init__(self, stream):
        super().__init__(stream)
        self.storages = {}

    def find_class(self, module, name):
        qualified = f"{module}.{name}"
        if qualified == "collections.OrderedDict":
            return collections.OrderedDict
        rebuild = {
            "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
            "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
            "torch._utils._rebuild_parameter": _rebuild_parameter,
        }.get(qualified)
        if rebuild is not None:
            return rebuild
        if module == "torch" and name in _TYPED_STORAGES:
            return _StorageType(_TYPED_STORAGES[name])
        if qualified in ("torch.UntypedStorage", "torch.storage.UntypedStorage"):
            return _StorageType(torch.uint8)
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        raise _RefusedGlobal(qualified)

    def persistent_load(self, pid):
        # ("storage", storage type, key, location, numel): what torch.save's persistent_id writes for a storage
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and _is_ints((pid[4],))
            and pid[4] >= 0
        ):
            raise pickle.UnpicklingError(f"a persistent id torch.save does not write: {pid!r:.80}")
        storage = _Storage(pid[2], pid[1].dtype, pid[4])
        if self.storages.setdefault(storage.key, storage) != storage:
            raise pickle.UnpicklingError(f"storage {storage.key!r} is described twice, differently")
        return storage


# ---------------------------------------------------------------------------------------------------------
# The zip records, read from a stream
# ---------------------------------------------------------------------------------------------------------


class _Truncated(Exception):
    pass


class _Reader:
    """Exact reads from a binary stream, with bytes pushed back (a small record is found by reading past it) and,
    for the unpickler, `read`/`readline`/`readinto` within a budget. `seekable`: skipping seeks instead of reading."""

    def __init__(self, raw, seekable=False):
        self.raw, self.seekable = raw, seekable
        self.pending = b""
        self.budget = None  # bytes the unpickler may still read
        self.recorded = bytearray()  # what `read_exact` read, while `recording` (for NotStreamable)
        self.recording = True

    def _take(self, size):
        if self.budget is not None:
            if size > self.budget:
                raise pickle.UnpicklingError(f"data.pkl is larger than {_MAX_PICKLE >> 20} MiB")
            self.budget -= size
        taken, self.pending = self.pending[:size], self.pending[size:]
        return taken

    def read_exact(self, size):
        data = self._take(size)
        try:
            while len(data) < size:
                chunk = self.raw.read(size - len(data))
                if not chunk:
                    raise _Truncated
                data += chunk
        finally:
            if self.recording:
                self.recorded += data
        return data

    def readinto_exact(self, view):
        filled = len(self.pending[: len(view)])
        view[:filled] = self._take(filled)
        while filled < len(view):
            count = self.raw.readinto(view[filled:])
            if not count:
                raise _Truncated
            filled += count

    def read_some(self, size):
        """Up to `size` bytes; b"" at the end of the stream."""
        return self._take(size) if self.pending else self.raw.read(size)

    def unread(self, data):
        self.pending = data + self.pending

    def skip(self, size):
        size -= len(self._take(size))
        if self.seekable and size:
            self.raw.seek(size, 1)  # past the end when the file is truncated: the next read says so
            return
        while size:
            chunk = self.raw.read(min(size, _SKIP_CHUNK))
            if not chunk:
                raise _Truncated
            size -= len(chunk)

    # for pickle.Unpickler (which reads exactly what it needs when the stream has no `peek`)
    def read(self, size=-1):
        if size < 0:
            raise pickle.UnpicklingError("an unbounded read")
        return self.read_exact(size)

    def readinto(self, buffer):
        view = memoryview(buffer).cast("B")
        view[:] = self.read_exact(len(view))
        return len(view)

    def readline(self):
        line = b""
        while not line.endswith(b"\n"):
            line += self.read_exact(1)
        return line


@dataclasses.dataclass
class _Record:
    name: str
    size: int | None  # None: in a data descriptor after the data
    compressed: int  # the compressed size in the header (a stored record's is its size)
    zip64: bool  # a ZIP64 field in the local header: 8-byte sizes in the descriptor
    flags: int
    method: int


class StreamedBin:
    """A torch.save `.bin`, read once from `stream` (see the module docstring). `meta` ({name: meta tensor}, in the
    file's order) is known on construction, from `data.pkl`; then exactly one of `tensors()` (each tensor built as
    its storage arrives) or `check()` (every record's presence and size verified, the data skipped) reads the
    rest. `seekable`: `stream` is a file on disk, so `check()` seeks over the data instead of reading it."""

    def __init__(self, stream, name, seekable=False):
        self.name, self.reader = name, _Reader(stream, seekable)
        self.root, self.tensors_by_name = self._read_data_pkl()
        self.meta = {key: torch.empty(t.shape, dtype=t.dtype, device="meta") for key, t in self.tensors_by_name.items()}
        self.by_storage = collections.defaultdict(list)  # storage key -> names of its tensors, in data.pkl order
        for key, tensor in self.tensors_by_name.items():
            self.by_storage[tensor.storage.key].append(key)
        self.storages = {t.storage.key: t.storage for t in self.tensors_by_name.values()}

    # ---- reading ----

    def _error(self, what):
        return ConversionError(f"cannot read {self.name}: {what}")

    def _truncated(self):
        return self._error("the file is truncated or corrupt (it ends inside a zip record)")

    def _read_data_pkl(self):
        reader = self.reader
        try:
            fixed = reader.read_exact(LOCAL_HEADER.size)
            if not fixed.startswith(LOCAL_HEADER_SIGNATURE):
                raise NotStreamable("it is not a zip, as torch.save >= 1.6 writes (a legacy .bin?)", reader.recorded)
            record = self._local_header(fixed)
        except _Truncated:
            raise NotStreamable("it is shorter than a zip header", reader.recorded) from None
        if not record.name.endswith("/data.pkl") or record.name.count("/") != 1:
            raise NotStreamable(f"its first record is {record.name!r}, not <root>/data.pkl", reader.recorded)
        reader.recording, reader.recorded = False, None
        self._check_stored(record)
        root = record.name.rsplit("/", 1)[0]
        limit = record.size if record.size is not None else _MAX_PICKLE
        reader.budget = limit
        try:
            state = _StateDictUnpickler(reader).load()
        except _RefusedGlobal as error:
            raise ConversionError(
                f"refusing to load {self.name}: it holds pickled objects other than tensors (global '{error}'), "
                "which the converter never builds, as torch.load(weights_only=True) would not"
            ) from None
        except _Truncated:
            raise self._truncated() from None
        except ConversionError:  # the archive under the stream is unreadable (archive.py), not data.pkl
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError) as error:
            raise self._error(f"its data.pkl is not a pickled state dict ({error})") from error
        size, reader.budget = limit - reader.budget, None
        self._end_of_record(record, size)
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, _Tensor) for k, v in state.items()
        ):
            raise ConversionError(f"{self.name} does not hold a state dict (a dict of named tensors)")
        for key, tensor in state.items():
            self._check_bounds(key, tensor)
        return root, state

    def _local_header(self, fixed):
        """The record whose local header starts with `fixed` (30 bytes); reads its name and extra field."""
        _, _, flags, method, _, _, _, compressed, size, name_length, extra_length = LOCAL_HEADER.unpack(fixed)
        name = self.reader.read_exact(name_length).decode("utf-8", "replace")
        extra = self.reader.read_exact(extra_length)
        fields, position = {}, 0
        while position + 4 <= len(extra):
            field, length = struct.unpack_from("<HH", extra, position)
            fields[field] = extra[position + 4 : position + 4 + length]
            position += 4 + length
        zip64 = ZIP64_FIELD in fields
        if flags & FLAG_DESCRIPTOR:
            size = None
        elif size == 0xFFFFFFFF and zip64 and len(fields[ZIP64_FIELD]) >= 16:
            size, compressed = struct.unpack_from("<QQ", fields[ZIP64_FIELD])
        return _Record(name, size, compressed, zip64, flags, method)

    def _check_stored(self, record):
        if record.flags & FLAG_ENCRYPTED:
            raise self._error(f"its record {record.name!r} is encrypted, which torch.save never does")
        if record.method != STORED:
            raise self._error(
                f"its record {record.name!r} is compressed (zip method {record.method}); torch.save stores every "
                "record as is, and this converter reads only such files"
            )
        if record.size is not None and (record.size == 0xFFFFFFFF or record.compressed != record.size):
            raise self._error(f"its record {record.name!r} has sizes this converter cannot read")

    def _end_of_record(self, record, size):
        """Check the data descriptor after a record of `size` bytes (if it has one) against `size`."""
        if record.size is not None:
            if record.size != size:
                raise self._error(f"its record {record.name!r} holds {record.size} bytes, not {size}")
            return
        try:
            descriptor = self.reader.read_exact(24 if record.zip64 else 16)
        except _Truncated:
            raise self._truncated() from None
        if not descriptor.startswith(DESCRIPTOR_SIGNATURE):
            raise self._error(
                f"its record {record.name!r} is not followed by a data descriptor as torch.save writes it"
            )
        sizes = struct.unpack_from("<QQ" if record.zip64 else "<II", descriptor, 8)
        if sizes != (size, size):
            raise self._error(
                f"its record {record.name!r} is {size} bytes long but its data descriptor says {sizes}; the file is "
                "corrupt"
            )

    def _check_bounds(self, key, tensor):
        itemsize = _itemsize(tensor.dtype)
        if tensor.storage.nbytes % itemsize:
            raise self._error(
                f"tensor {key!r} ({tensor.dtype}) does not divide its storage's {tensor.storage.nbytes} bytes"
            )
        elements = tensor.storage.nbytes // itemsize
        extent = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride))
        if math.prod(tensor.shape) and extent >= elements:
            raise self._error(f"tensor {key!r} reaches past the end of its storage")

    def _next_record(self):
        """The next local record's header, or None at the central directory."""
        try:
            signature = self.reader.read_exact(4)
            if signature in CENTRAL_DIRECTORY_SIGNATURES:
                return None
            if signature != LOCAL_HEADER_SIGNATURE:
                raise self._error("it holds bytes that are not a zip record where one should start; it is corrupt")
            record = self._local_header(signature + self.reader.read_exact(LOCAL_HEADER.size - 4))
        except _Truncated:
            raise self._truncated() from None
        self._check_stored(record)
        return record

    def _records(self, read_storage):
        """Walk the records after data.pkl; `read_storage(storage)` reads (or skips) a storage's data and returns
        what `_records` yields for it."""
        arrived = set()
        while (record := self._next_record()) is not None:
            folder, _, key = record.name.rpartition("/")
            if folder == f"{self.root}/data":
                storage = self.storages.get(key)
                if storage is None or key in arrived:
                    what = "comes twice" if key in arrived else "is not used by data.pkl"
                    raise self._error(f"its storage record {record.name!r} {what}, which torch.save never writes")
                arrived.add(key)
                try:
                    yield read_storage(storage)
                except _Truncated:
                    raise self._truncated() from None
                self._end_of_record(record, storage.nbytes)
            else:
                self._small_record(record)
        missing = sorted(set(self.storages) - arrived, key=lambda k: (len(k), k))
        if missing:
            raise self._error(f"it lacks the record of storage {missing[0]!r} ({len(missing)} missing); it is corrupt")

    def _small_record(self, record):
        """Read a record other than data.pkl and the storages (a few bytes); refuse a big-endian file."""
        if record.size is not None:
            data = self.reader.read_exact(record.size)
        else:
            data = self._find_descriptor(record)
        if record.name == f"{self.root}/byteorder" and data != b"little":
            raise self._error(f"it was saved {data.decode(errors='replace')}-endian; only little-endian is read")

    def _find_descriptor(self, record):
        """The data of a small record whose length is only in its descriptor: read until a descriptor whose
        signature, CRC-32 and sizes agree with the bytes before it."""
        size_format, sizes_length = ("<QQ", 16) if record.zip64 else ("<II", 8)
        data = b""
        while len(data) <= _MAX_SMALL_RECORD:
            chunk = self.reader.read_some(256)
            if not chunk:
                raise self._truncated()
            data += chunk
            position = data.find(DESCRIPTOR_SIGNATURE)
            while position >= 0 and len(data) >= position + 8 + sizes_length:
                crc = struct.unpack_from("<I", data, position + 4)[0]
                sizes = struct.unpack_from(size_format, data, position + 8)
                if sizes == (position, position) and zlib.crc32(data[:position]) == crc:
                    self.reader.unread(data[position + 8 + sizes_length :])
                    return data[:position]
                position = data.find(DESCRIPTOR_SIGNATURE, position + 1)
        raise self._error(f"its record {record.name!r} is not one torch.save writes (over {_MAX_SMALL_RECORD} bytes)")

    # ---- what callers use ----

    def tensors(self):
        """(name, tensor) of every tensor, each built when its storage's record arrives (a storage's tensors
        together, in data.pkl's order), as torch.load builds them: same dtype, shape, strides, offset, and one
        storage for the tensors that share one. A storage is held only until the next is asked for."""

        def read(storage):
            data = torch.empty(storage.nbytes, dtype=torch.uint8)
            self.reader.readinto_exact(memoryview(data.numpy()))
            return storage, data

        for storage, data in self._records(read):
            for key in self.by_storage[storage.key]:
                t = self.tensors_by_name[key]
                yield key, data.view(t.dtype).as_strided(t.shape, t.stride, t.offset)
            del data

    def check(self):
        """Verify that every storage's record is present, whole and of the right size, without reading the data
        (seeking over it on a file)."""
        for _ in self._records(lambda storage: self.reader.skip(storage.nbytes)):
            pass


# ---------------------------------------------------------------------------------------------------------
# Files loaded whole: safetensors, and the .bin layouts StreamedBin does not read
# ---------------------------------------------------------------------------------------------------------


class LoadedWeights:
    """A state dict loaded whole, with the same interface as `StreamedBin`."""

    def __init__(self, name, state):
        self.name, self.state = name, state
        self.meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()}

    def tensors(self):
        yield from self.state.items()

    def check(self):
        pass


def load_weight_file(path, name=None):
    """All tensors of one weight file on disk, loaded whole: `.safetensors` (memory-mapped), or a `.bin` with
    `torch.load(weights_only=True)` (memory-mapped when its format allows it; nothing in it is executed). `name`:
    the file's name in messages (default: the path's)."""
    path = Path(path)
    name = name or path.name
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                return LoadedWeights(name, {key: f.get_tensor(key) for key in f.keys()})
        except (SafetensorError, OSError) as error:
            raise ConversionError(f"cannot read {name}: {error}; the file is truncated or corrupt") from error
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except pickle.UnpicklingError as error:
        if "weights only" not in str(error).lower():
            raise ConversionError(f"cannot read {name}: {error}; the file is truncated or corrupt") from error
        raise ConversionError(
            f"refusing to load {name}: it holds pickled objects other than tensors, which "
            f"torch.load(weights_only=True) will not build ({str(error).splitlines()[0]})"
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise ConversionError(f"cannot read {name}: {error}; the file is truncated or corrupt") from error
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ConversionError(f"{name} does not hold a state dict (a dict of named tensors)")
    return LoadedWeights(name, state)


def note_not_streamed(name, reason, spool=None):
    """The one line that says a `.bin` is loaded whole instead of streamed (through a temporary file in `spool`)."""
    through = f", through a temporary file in {spool}" if spool else ""
    print(f"honeybee-convert: {name}: {reason}; loading it whole with torch.load instead{through}", file=sys.stderr)


@contextlib.contextmanager
def open_weight_file(path, name=None, note=note_not_streamed):
    """The weight file at `path` (called `name` in messages): a `.bin` streamed (`StreamedBin`, seeking over what it
    skips) when its layout allows, else loaded whole (`load_weight_file`) after `note(name, reason)`."""
    path = Path(path)
    name = name or path.name
    if path.suffix == ".bin":
        with open(path, "rb") as stream:
            try:
                streamed = StreamedBin(stream, name, seekable=True)
            except NotStreamable as why:
                note(name, why)
            else:
                yield streamed
                return
    yield load_weight_file(path, name)
