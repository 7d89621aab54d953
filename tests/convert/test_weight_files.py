"""Reading a torch.save `.bin` in one pass (convert/weight_files.py) and writing safetensors shards as the tensors
arrive (convert/writer.py), against their references: `torch.load` for every tensor read (dtype, shape, strides,
offset, values, shared storages) and safetensors' `save_file` for every byte written. Zips laid out as torch.save
lays them out past 4 GiB, as other zip writers lay them out, and as nobody should are built here record by record.
"""

import collections
import io
import os
import pickle
import struct
import tarfile
import zipfile
import zlib

import pytest
import torch
from safetensors.torch import save_file

from honeybee_hf.convert import ConversionError
from honeybee_hf.convert.weight_files import NotStreamable, StreamedBin
from honeybee_hf.convert.writer import safetensors_header, write_at


def saved(state, **kwargs):
    buffer = io.BytesIO()
    torch.save(state, buffer, **kwargs)
    return buffer.getvalue()


def varied_state():
    """What a state dict can hold: every dtype the converter meets and more, views with offsets and strides into
    shared storages, a scalar, an empty tensor, a Parameter, an OrderedDict with `_metadata` (as state_dict())."""
    torch.manual_seed(0)
    state = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)).state_dict()
    matrix = torch.randn(6, 5, dtype=torch.bfloat16)
    state.update(
        matrix=matrix,
        rows=matrix[2:],  # offset into a shared storage
        columns=matrix[:, 1:4],  # non-contiguous
        transposed=matrix.t(),
        scalar=torch.tensor(3.5, dtype=torch.float64),
        empty=torch.zeros(0, 3),
        half=torch.randn(7).half(),
        ids=torch.arange(5),
        flags=torch.tensor([True, False, True]),
        small=torch.tensor([1, -2, 3], dtype=torch.int8),
        unsigned=torch.tensor([1, 2, 65535], dtype=torch.int32).to(torch.uint16),  # torch.save's _rebuild_tensor_v3
        fp8=torch.randn(4).to(torch.float8_e4m3fn),
        parameter=torch.nn.Parameter(torch.ones(2)),
    )
    return state


def assert_same_as_torch_load(data, got):
    expected = torch.load(io.BytesIO(data), weights_only=True)
    assert list(got) == list(expected)
    for key, tensor in expected.items():
        ours = got[key]
        assert ours.dtype == tensor.dtype and ours.shape == tensor.shape, key
        assert ours.stride() == tensor.stride() and ours.storage_offset() == tensor.storage_offset(), key
        assert torch.equal(ours.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), key
        assert torch.equal(storage_bytes(ours), storage_bytes(tensor)), key  # the whole storage, as torch.load's
    pointers = {k: (v.untyped_storage().data_ptr(), got[k].untyped_storage().data_ptr()) for k, v in expected.items()}
    for a in expected:
        for b in expected:  # the same storages are shared
            assert (pointers[a][0] == pointers[b][0]) == (pointers[a][1] == pointers[b][1]), (a, b)


def storage_bytes(tensor):
    return torch.empty(0, dtype=torch.uint8).set_(tensor.untyped_storage())


def read_all(stream, name="pytorch_model.bin", seekable=False):
    weights = StreamedBin(stream, name, seekable)
    meta = weights.meta
    tensors = {}
    for key, tensor in weights.tensors():
        assert tensor.shape == meta[key].shape and tensor.dtype == meta[key].dtype
        tensors[key] = tensor
    return {key: tensors[key] for key in meta}  # in the file's order


def tar_member_stream(data, name="ckpt/last/pytorch_model.bin"):
    """`data` as a member of a .tar.gz read in stream mode, as honeybee-convert reads archives."""
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    tar = tarfile.open(fileobj=io.BytesIO(archive.getvalue()), mode="r|gz")
    return tar.extractfile(next(iter(tar)))


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["archive member", "file", "bytes"])
def test_tensors_are_what_torch_load_builds(source, tmp_path):
    data = saved(varied_state())
    if source == "archive member":
        got = read_all(tar_member_stream(data))
    elif source == "file":
        (tmp_path / "w.bin").write_bytes(data)
        with open(tmp_path / "w.bin", "rb") as stream:
            got = read_all(stream, seekable=True)
    else:
        got = read_all(io.BytesIO(data))
    assert_same_as_torch_load(data, got)


def test_many_storages_in_either_order(tmp_path):
    """torch.save writes the storage records in the order of their keys (0, 1, 2, ... 10, 11); older versions in
    string order (0, 1, 10, 11, 2, ...): either is read."""
    data = saved({f"layer{i}": torch.randn(i + 1) for i in range(12)})
    assert_same_as_torch_load(data, read_all(io.BytesIO(data)))
    records = zip_records(data)
    head, storages, tail = records[:4], records[4:-2], records[-2:]
    assert [name for name, _ in storages] == [f"archive/data/{i}" for i in range(12)]
    by_string = head + sorted(storages) + tail
    assert_same_as_torch_load(data, read_all(io.BytesIO(build_zip(by_string))))


def test_check_verifies_every_record_without_building_tensors(tmp_path):
    data = saved(varied_state())
    path = tmp_path / "w.bin"
    path.write_bytes(data)
    with open(path, "rb") as stream:
        weights = StreamedBin(stream, "w.bin", seekable=True)
        weights.check()
    path.write_bytes(data[: len(data) * 2 // 3])
    with open(path, "rb") as stream, pytest.raises(ConversionError, match=r"cannot read w\.bin: .*truncated"):
        StreamedBin(stream, "w.bin", seekable=True).check()


def zip_records(data):
    """[(name, bytes)] of a zip, in its order."""
    archive = zipfile.ZipFile(io.BytesIO(data))
    return [(info.filename, archive.read(info)) for info in archive.infolist()]


def build_zip(records, zip64=False, descriptor=True, signature=True, flags=0, method=0, sizes=None):
    """Local records as torch.save writes them (bit 3, zero sizes in the header, a data descriptor after the data;
    `zip64`: the ZIP64 field and 8-byte descriptor sizes it writes for a record that starts past 4 GiB, as seen on a
    5.4 GB file torch.save 2.13 wrote, too big for a test), or with the sizes in the header
    (`descriptor=False`); `sizes`: {name: size to state} to lie about one. Then an end-of-central-directory record
    (the reader stops at the central directory)."""
    out = bytearray()
    for name, payload in records:
        encoded = name.encode()
        extra = struct.pack("<HHQ", 0x0001, 8, len(out)) if zip64 else b""
        crc, size = zlib.crc32(payload), (sizes or {}).get(name, len(payload))
        header_sizes = (0, 0, 0) if descriptor else (crc, size, size)
        out += struct.pack(
            "<IHHHHHIIIHH",
            0x04034B50,
            45 if zip64 else 20,
            (0x0808 if descriptor else 0x0800) | flags,
            method,
            0,
            0,
            *header_sizes,
            len(encoded),
            len(extra),
        )
        out += encoded + extra + payload
        if descriptor:
            out += (b"PK\x07\x08" if signature else b"") + struct.pack("<IQQ" if zip64 else "<III", crc, size, size)
    return bytes(out + b"PK\x05\x06" + bytes(18))


@pytest.mark.parametrize(
    "layout",
    ["zip64 as torch.save past 4 GiB", "sizes in the headers", "python zipfile"],
)
def test_other_zip_layouts_of_the_same_records(layout):
    data = saved(varied_state())
    records = zip_records(data)
    if layout == "python zipfile":  # another writer: stored records, sizes in the local headers, no descriptors
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
            for name, payload in records:
                archive.writestr(name, payload)
        rebuilt = buffer.getvalue()
    else:
        rebuilt = build_zip(
            records,
            zip64=layout.startswith("zip64"),
            descriptor=layout != "sizes in the headers",
        )
    assert_same_as_torch_load(data, read_all(io.BytesIO(rebuilt)))


def test_layouts_read_only_through_torch_load_raise_not_streamable_with_what_was_read():
    state = varied_state()
    legacy = saved(state, _use_new_zipfile_serialization=False)
    records = zip_records(saved(state))
    pickle_last = build_zip(records[1:] + records[:1])
    for data, reason in ((legacy, "not a zip"), (pickle_last, "first record is 'archive/.format_version'")):
        stream = io.BytesIO(data)
        with pytest.raises(NotStreamable, match=reason) as caught:
            StreamedBin(stream, "w.bin")
        assert caught.value.consumed + stream.read() == data  # nothing lost: the caller spools both


def refused(data, match):
    with pytest.raises(ConversionError, match=match) as caught:
        read_all(io.BytesIO(data), "shard.bin")
    assert "shard.bin" in str(caught.value)


def test_what_torch_save_never_writes_is_refused_naming_the_file():
    state = {"a": torch.randn(3), "b": torch.randn(2, 2)}
    data = saved(state)
    records = zip_records(data)
    storage = next(name for name, _ in records if "/data/" in name)
    refused(build_zip(records, method=8), r"record 'archive/data\.pkl' is compressed \(zip method 8\)")
    refused(build_zip(records, flags=0x0001), "encrypted")
    refused(build_zip(records, signature=False), "not followed by a data descriptor")
    refused(build_zip([r for r in records if r[0] != storage]), "lacks the record of storage")
    refused(build_zip(records + [(storage, records[-3][1])]), "comes twice")
    refused(build_zip(records + [("archive/data/99", b"x" * 8)]), "not used by data.pkl")
    refused(build_zip(records, descriptor=False, sizes={storage: 4}), f"record '{storage}' holds 4 bytes")
    big_endian = [(n, b"big" if n.endswith("byteorder") else p) for n, p in records]
    refused(build_zip(big_endian), "big-endian")
    refused(data[: len(data) // 2], "truncated or corrupt")
    pickled = dict(records)["archive/data.pkl"]
    refused(build_zip([("archive/data.pkl", pickled[:-1] + b"!")] + records[1:]), "not a pickled state dict")
    refused(build_zip([("archive/data.pkl", pickle.dumps([1, 2], protocol=2))] + records[1:]), "not hold a state dict")


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo never",))


def test_pickled_code_is_never_run(tmp_path):
    """Only the globals torch.save writes for a dict of tensors are found; any other is refused before it can be
    called, as torch.load(weights_only=True) refuses it."""
    marker = tmp_path / "ran"

    class Opener:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for payload, name in ((Opener(), "io.open"), (_Payload(), "posix.system"), (collections.Counter(), "Counter")):
        data = saved({"a": torch.ones(2), "payload": payload})
        with pytest.raises(ConversionError, match=rf"refusing to load shard\.bin: .*global '.*{name}'"):
            StreamedBin(io.BytesIO(data), "shard.bin")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------


def test_a_shard_written_by_place_is_what_save_file_writes(tmp_path):
    """The header first, then each tensor's bytes at its offset in any order: the file is save_file's, byte for
    byte (same tensor order, offsets, JSON and padding), for every dtype safetensors knows in torch."""
    torch.manual_seed(0)
    tensors = {
        "z.weight": torch.randn(3, 4, dtype=torch.bfloat16),
        "a.bias": torch.randn(5),
        "half": torch.randn(2).half(),
        "ids": torch.arange(3),
        "mask": torch.tensor([True, False]),
        "bytes": torch.tensor([1, 2], dtype=torch.uint8),
        "signed": torch.tensor([-1], dtype=torch.int8),
        "short": torch.tensor([7], dtype=torch.int16),
        "int": torch.tensor([7], dtype=torch.int32),
        "double": torch.tensor([0.5], dtype=torch.float64),
        "unsigned": torch.zeros(2, dtype=torch.uint16),
        "fp8": torch.zeros(3, dtype=torch.float8_e4m3fn),
        "fp8b": torch.zeros(1, dtype=torch.float8_e5m2),
        "scalar": torch.tensor(2.0),
        "empty": torch.zeros(0, 2),
        "naïve": torch.ones(1),
    }
    save_file(tensors, str(tmp_path / "reference.safetensors"), metadata={"format": "pt"})
    header, offsets = safetensors_header([(k, tuple(t.shape), t.dtype) for k, t in tensors.items()], {"format": "pt"})
    fd = os.open(tmp_path / "ours.safetensors", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        write_at(fd, header, 0)
        for key in reversed(list(tensors)):  # any order
            write_at(fd, tensors[key].reshape(-1).view(torch.uint8).numpy(), offsets[key])
    finally:
        os.close(fd)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
