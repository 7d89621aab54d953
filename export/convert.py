"""`honeybee-convert`: an official Honeybee checkpoint (Kakao Brain's `.tar.gz` release, or the folder it unpacks
to) -> a Hub-ready folder that loads with `trust_remote_code=True` on transformers 4.57 and 5.x.

    honeybee-convert 7B-C-Abs-M144.tar.gz Honeybee-C-7B-M144 --tokenizer vicuna-7b-v1.5/tokenizer.model

What happens, in order; every check runs before anything is written:
1. A folder (`<name>/` or `<name>/last/`) is read in place. An archive is read once, as a stream, never unpacked:
   its members are checked as they come (regular files and folders only: absolute paths, `..`, links and devices
   are refused), `<name>/last/config.json` is read, and each weight file is copied to a temporary file next to OUT,
   converted and deleted (extra disk: the largest shard).
2. `config.json` (Dec-2023 or HEAD format) becomes a `HoneybeeConfig` (`official.official_config_to_kwargs`),
   with the vocabulary grown by one for `<image>` (id = the official vocabulary size).
3. The tokenizer (Vicuna's sentencepiece `tokenizer.model`, or a folder) must have exactly that vocabulary.
4. Every weight file is opened (memory-mapped, `torch.load(weights_only=True)`: nothing in it is executed) and its
   keys and shapes are mapped onto a meta-device model (`official.map_official_state_dict`): an unknown, missing
   or wrongly shaped tensor, a missing or truncated shard, or eos tokens that disagree with the config stop the
   run. A folder is checked whole before anything is written; an archive, readable only once, file by file as it
   streams and whole at the end, before OUT is touched.
5. One official file is loaded at a time, mapped, and written out as safetensors shards, so memory holds one
   official file (memory-mapped) and one output shard at most.
6. config, generation config, processor and tokenizer files, code and model card are added (`hub.py`), in a
   staging folder that replaces OUT only at the end: a failed or interrupted run leaves OUT as it was.

A folder saved by this package (`model_type: "honeybee"`, e.g. after fine-tuning) is exported the same way
(`export_trained`): loaded, then written with `hub.save_hub_folder`.
"""

import argparse
import contextlib
import gzip
import json
import pickle
import re
import shutil
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from ..cli import CommandError, add_debug_flag, console_script
from ..configuration_honeybee import HoneybeeConfig
from ..hub.folder import refuse_existing, save_hub_folder, staging_folder, write_support_files
from ..hub.model_card import render_model_card
from .official import (
    map_official_state_dict,
    num_eos_tokens_origin,
    official_config_to_kwargs,
    official_image_processor,
)

# The model, processor and tokenizer modules are imported where they are used: importing them imports transformers'
# modeling code, which imports its quantizer integrations (torchao, bitsandbytes) and whatever those print at start;
# `--help` and a mistake in the arguments need none of it.

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
WEIGHT_FILES = {  # single file, index; in the order transformers 4.38 looked for them (.bin first: the release)
    "bin": ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    "safetensors": ("model.safetensors", "model.safetensors.index.json"),
}
_COPY_CHUNK = 16 << 20
EMBED_KEY = "language_model.model.embed_tokens.weight"  # official key; its dtype is "the checkpoint's dtype"


class ConversionError(ValueError):
    """The checkpoint, archive or tokenizer cannot be converted; the message says what is wrong."""


# ---------------------------------------------------------------------------------------------------------
# Reading a checkpoint: a folder in place, an archive as a stream
# ---------------------------------------------------------------------------------------------------------


class _ProgressReader:
    """A read-only file wrapper that advances a progress bar by the bytes read."""

    def __init__(self, raw, bar):
        self.raw, self.bar = raw, bar

    def read(self, size=-1):
        data = self.raw.read(size)
        self.bar.update(len(data))
        return data


class _Unreadable(ConversionError):
    """The archive cannot be read further."""


def _member_path(member):
    """The archive path of `member` (a regular file or folder, inside the archive's folder), or a ConversionError
    naming it. Nothing is ever written under a member's name, so the check is on the name alone."""
    name = member.name
    if not (member.isfile() or member.isdir()):
        kind = "a symbolic link" if member.issym() else "a hard link" if member.islnk() else "not a regular file"
        target = f" to {member.linkname!r}" if member.issym() or member.islnk() else ""
        raise ConversionError(
            f"archive member {name!r} is {kind}{target}; an official checkpoint holds only files and folders, "
            "refusing to unpack it"
        )
    path = PurePosixPath(name)
    if name.startswith(("/", "\\")) or path.is_absolute() or ".." in path.parts or "\\" in name:
        raise ConversionError(
            f"archive member {name!r} would be written outside the target folder; refusing to unpack it"
        )
    return PurePosixPath(*[part for part in path.parts if part != "."])


def is_archive(path):
    return Path(path).is_file() and Path(path).name.lower().endswith(ARCHIVE_SUFFIXES)


def archive_stem(path):
    name = Path(path).name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _weight_kind(name):
    """ "bin" or "safetensors" for a weight file or index name as `save_pretrained` writes them, else None."""
    for kind, (single, index) in WEIGHT_FILES.items():
        stem, suffix = single.rsplit(".", 1)
        if name in (single, index) or re.fullmatch(rf"{stem}-\d+-of-\d+\.{suffix}", name):
            return kind
    return None


def load_weight_file(path):
    """All tensors of one official weight file; `.bin` files are memory-mapped when their format allows it."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                return {key: f.get_tensor(key) for key in f.keys()}
        except (SafetensorError, OSError) as error:
            raise ConversionError(f"cannot read {path.name}: {error}; the file is truncated or corrupt") from error
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except pickle.UnpicklingError as error:
        if "weights only" not in str(error).lower():
            raise ConversionError(f"cannot read {path.name}: {error}; the file is truncated or corrupt") from error
        raise ConversionError(
            f"refusing to load {path.name}: it holds pickled objects other than tensors, which "
            f"torch.load(weights_only=True) will not build ({str(error).splitlines()[0]})"
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise ConversionError(f"cannot read {path.name}: {error}; the file is truncated or corrupt") from error
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ConversionError(f"{path.name} does not hold a state dict (a dict of named tensors)")
    return state


def _read_index(text, name):
    try:
        return json.loads(text)["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise ConversionError(f"{name} is not a weights index ({error})") from error


def _missing_shard(name, index, index_name, where):
    count = sum(1 for f in index.values() if f == name)
    return ConversionError(
        f"shard {name} is missing: {index_name} puts {count} tensors in it but {where} has no such file (an "
        "incomplete download or extraction?)"
    )


class FolderCheckpoint:
    """An official checkpoint folder (`<name>/` or `<name>/last/`): config.json and the weight files
    (`pytorch_model.bin`, or shards and their index; also safetensors), read in place one file at a time."""

    def __init__(self, src):
        found = self._locate(Path(src))
        if found is None:
            raise ConversionError(
                f"{src} holds neither config.json nor last/config.json: not an official Honeybee checkpoint"
            )
        self.folder, self.name = found

    @staticmethod
    def _locate(folder):
        if (folder / "config.json").is_file():
            return folder, (folder.parent.name if folder.name == "last" else folder.name)
        if (folder / "last" / "config.json").is_file():
            return folder / "last", folder.name
        return None

    def config_text(self):
        return (self.folder / "config.json").read_bytes(), self.name

    def weights_index(self):
        """(files in reading order, key -> file index or None, index file name or None)."""
        for single, index in WEIGHT_FILES.values():
            if (self.folder / single).is_file():
                return [single], None, None
            if (self.folder / index).is_file():
                weight_map = _read_index((self.folder / index).read_bytes(), self.folder / index)
                files = sorted(set(weight_map.values()))
                for name in files:
                    if not (self.folder / name).is_file():
                        raise _missing_shard(name, weight_map, index, self.folder)
                return files, weight_map, index
        shards = sorted(p.name for p in self.folder.glob("pytorch_model-*.bin"))
        hint = f" (shards {shards} but no pytorch_model.bin.index.json)" if shards else ""
        raise ConversionError(f"{self.folder} holds no pytorch_model.bin, nor a weights index{hint}")

    def weight_files(self, files):
        """(file name, state dict) of each file of `files`, one at a time."""
        for name in files:
            yield name, load_weight_file(self.folder / name)


class ArchiveCheckpoint:
    """An official `.tar[.gz]` read once, front to back, as a stream: nothing is unpacked. Each weight file is
    copied to a temporary file in `work_dir` (torch.load needs a seekable file), converted and deleted, so the
    extra disk is the largest shard. Weight files that precede config.json wait on disk until it comes (the
    release archives put config.json first). Every member is checked before it is read: regular files and
    folders only, no absolute path, no `..`, no member twice."""

    def __init__(self, archive, work_dir, progress=True):
        self.archive, self.progress = Path(archive), progress
        self.work_dir = Path(work_dir)
        self.folder = None  # the checkpoint's folder inside the archive, once config.json is found
        self.indexes, self.kinds, self.seen, self.top = {}, set(), set(), set()
        self.waiting = {}  # archive path -> temporary file, weight files read before config.json

    def __enter__(self):
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.spool = Path(tempfile.mkdtemp(prefix=f".{archive_stem(self.archive)}.unpack-", dir=self.work_dir))
        self.raw = open(self.archive, "rb")
        self.bar = tqdm(
            total=self.archive.stat().st_size,
            unit="B",
            unit_scale=True,
            desc=f"Reading {self.archive.name}",
            disable=not self.progress,
        )
        with self._reading():
            self.tar = tarfile.open(fileobj=_ProgressReader(self.raw, self.bar), mode="r|*", bufsize=_COPY_CHUNK)
        self.members = iter(self.tar)
        return self

    def __exit__(self, kind, error, traceback):
        try:
            if isinstance(error, ConversionError) and not isinstance(error, _Unreadable):
                self._check_the_rest()  # a member that escapes or links is the error to report, whatever else is
        finally:
            self.bar.close()
            self.raw.close()
            shutil.rmtree(self.spool, ignore_errors=True)

    def _check_the_rest(self):
        """Check the members not read yet (their names only), so that a refused member is reported even when the
        conversion stopped earlier, as it was when archives were unpacked whole first."""
        try:
            while self._next_file() is not None:
                pass
        except _Unreadable:
            pass

    @contextlib.contextmanager
    def _reading(self):
        try:
            yield
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
            raise _Unreadable(
                f"{self.archive} is truncated or corrupt ({type(error).__name__}: {error}); download it again"
            ) from error

    def _next_file(self):
        """(archive path, member) of the next regular file, checked; None at the end of the archive."""
        while True:
            with self._reading():
                member = next(self.members, None)
            if member is None:
                return None
            path = _member_path(member)
            if path in self.seen:
                raise ConversionError(f"archive member {member.name!r} appears twice; refusing an ambiguous archive")
            if path.parts:
                self.top.add(path.parts[0])
            if member.isdir():
                continue
            self.seen.add(path)
            return path, member

    def _read_bytes(self, member):
        with self._reading():
            return self.tar.extractfile(member).read()

    def _spool(self, path, member):
        destination = self.spool / f"{len(self.seen)}-{path.name}"
        with self._reading(), open(destination, "xb") as out:
            shutil.copyfileobj(self.tar.extractfile(member), out, _COPY_CHUNK)
        return destination

    @staticmethod
    def _checkpoint_folder(path):
        """The checkpoint folder (archive path) and <name> when `path` is its config.json, else None."""
        parts = path.parts
        if parts[-1] != "config.json" or len(parts) > 3 or (len(parts) == 3 and parts[1] != "last"):
            return None
        folder = path.parent
        return folder, (parts[0] if len(parts) >= 2 and parts[0] != "last" else None)

    def _take(self, path, member):
        """Keep what the conversion needs of a member that is not config.json: indexes in memory, weight files
        on disk (only those of the checkpoint's folder once it is known)."""
        kind = _weight_kind(path.name)
        if kind is None or (self.folder is not None and path.parent != self.folder):
            return None
        if path.name in (WEIGHT_FILES[kind][1],):
            self.indexes[path] = self._read_bytes(member)
            return None
        self.kinds.add(kind)
        if len(self.kinds) > 1:
            raise ConversionError(f"{self.archive} holds both .bin and .safetensors weights; refusing to pick one")
        return self._spool(path, member)

    def config_text(self):
        """(config.json bytes, checkpoint name), reading the archive up to config.json."""
        while True:
            found = self._next_file()
            if found is None:
                raise ConversionError(
                    f"{self.archive} holds no <name>/last/config.json (members at its top: {sorted(self.top)}); "
                    "not an official Honeybee archive"
                )
            path, member = found
            located = self._checkpoint_folder(path)
            if located is None:
                spooled = self._take(path, member)
                if spooled is not None:
                    self.waiting[path] = spooled
                continue
            self.folder, name = located
            for waiting in [p for p in self.waiting if p.parent != self.folder]:
                self.waiting.pop(waiting).unlink()
            return self._read_bytes(member), name or archive_stem(self.archive)

    def weights_index(self):
        """What is known before the weights are read: nothing (the stream order decides); see `finish_index`."""
        return None, None, None

    def weight_files(self, files=None):
        """(file name, state dict) of each weight file of the checkpoint folder, in archive order; its temporary
        file is deleted once the caller asks for the next one."""
        while True:
            if self.waiting:
                path = next(iter(self.waiting))  # in archive order
                spooled = self.waiting.pop(path)
            else:
                found = self._next_file()
                if found is None:
                    return
                if self._checkpoint_folder(found[0]) is not None:
                    raise ConversionError(f"{self.archive} holds more than one config.json ({found[0]}); ambiguous")
                path, spooled = found[0], self._take(*found)
                if spooled is None:
                    continue
            try:
                yield path.name, load_weight_file(spooled)
            finally:
                spooled.unlink()

    def finish_index(self, names):
        """(key -> file index or None, index name) once every weight file was read; `names`: the files read."""
        for kind, (single, index) in WEIGHT_FILES.items():
            text = self.indexes.get(self.folder / index)
            if text is not None and (kind in self.kinds or not self.kinds):
                weight_map = _read_index(text, index)
                for name in sorted(set(weight_map.values()) - set(names)):
                    raise _missing_shard(name, weight_map, index, self.archive)
                return weight_map, index
        if not names:
            raise ConversionError(f"{self.archive} holds no pytorch_model.bin, nor a weights index, in {self.folder}")
        if len(names) > 1 or names[0] not in (single for single, _ in WEIGHT_FILES.values()):
            raise ConversionError(f"{self.archive} holds shards {sorted(names)} but no weights index")
        return None, None


# ---------------------------------------------------------------------------------------------------------
# Checks on the weights
# ---------------------------------------------------------------------------------------------------------


def meta_state(state):
    return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()}


def check_weight_table(table, index, index_name):
    """`table` ({file: meta state}) against the index, and no key in two files."""
    for name, state in table.items():
        if index is None:
            continue
        indexed = {k for k, f in index.items() if f == name}
        extra, missing = sorted(set(state) - indexed), sorted(indexed - set(state))
        if missing:
            raise ConversionError(
                f"{name} lacks {missing[0]!r}, which {index_name} says it holds ({len(missing)} missing)"
            )
        if extra:
            raise ConversionError(f"{name} holds {extra[0]!r}, which {index_name} does not list")
    seen = {}
    for name, state in table.items():
        for key in state:
            if key in seen:
                raise ConversionError(f"{key!r} is in both {seen[key]} and {name}")
            seen[key] = name


# ---------------------------------------------------------------------------------------------------------
# Tokenizer, processor, writing
# ---------------------------------------------------------------------------------------------------------


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


def tokenizer_backend(source, vocab_size, text_config):
    """The tokenizer's `tokenizers.Tokenizer`, checked against the checkpoint's vocabulary and special ids."""
    from ..processing_honeybee import IMAGE_TOKEN
    from .tokenizer import load_backend

    try:
        backend = load_backend(source)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as error:
        raise ConversionError(f"cannot load the tokenizer {source}: {error}") from error
    size = backend.get_vocab_size(with_added_tokens=True)
    image_id = backend.token_to_id(IMAGE_TOKEN)
    if image_id is not None and image_id != size - 1:
        raise ConversionError(f"the tokenizer {source} has {IMAGE_TOKEN} at id {image_id}, not after its vocabulary")
    base = size - 1 if image_id is not None else size
    if base != vocab_size:
        raise ConversionError(
            f"the tokenizer {source} has {base} tokens but the checkpoint's language model has {vocab_size} "
            "(config.json text_config.vocab_size): wrong tokenizer? The released Honeybee models use Vicuna v1.5's "
            "(Llama 2) sentencepiece tokenizer.model, 32000 tokens"
        )
    for name, token in (("bos_token_id", "<s>"), ("eos_token_id", "</s>")):
        expected = text_config.get(name)
        if isinstance(expected, int) and backend.token_to_id(token) != expected:
            raise ConversionError(
                f"the tokenizer {source} has {token} at id {backend.token_to_id(token)} but the checkpoint's "
                f"text_config.{name} is {expected}"
            )
    return backend


def check_eos_tokens(official, config, table):
    """The eos-token count the config implies must be the one the weights hold."""
    shapes = {k: v.shape for state in table.values() for k, v in state.items()}
    shape = shapes.get("abstractor.eos_tokens")
    in_weights = 0 if shape is None else (shape[1] if len(shape) == 3 else None)
    expected = config.projector_config.num_eos_tokens
    if in_weights != expected:
        found = "no abstractor.eos_tokens" if shape is None else f"abstractor.eos_tokens of shape {tuple(shape)}"
        raise ConversionError(
            f"the config implies {expected} eos tokens ({num_eos_tokens_origin(official)}) but the weights hold "
            f"{found}; the checkpoint's config.json and weights disagree"
        )


def build_processor(backend, config, image_mean=None, image_std=None):
    """A HoneybeeProcessor for `config` from a tokenizer backend (official image preprocessing)."""
    from transformers import AutoTokenizer

    from ..processing_honeybee import HoneybeeProcessor
    from .tokenizer import save_tokenizer_files

    with tempfile.TemporaryDirectory() as folder:
        save_tokenizer_files(backend, folder, model_max_length=config.text_config.max_position_embeddings)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    colour = {"image_mean": image_mean, "image_std": image_std}
    image_processor = official_image_processor(
        config.vision_config.image_size, **{k: v for k, v in colour.items() if v is not None}
    )
    pc = config.projector_config
    return HoneybeeProcessor(
        image_processor, tokenizer, num_query_tokens=pc.num_query_tokens, num_eos_tokens=pc.num_eos_tokens
    )


class _Writer:
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


def checkpoint_dtype(mapped):
    """The checkpoint's dtype: that of its first floating tensor outside the abstractor (the official training
    casts the whole model to one dtype; the abstractor may differ), or None when `mapped` holds none."""
    return next(
        (t.dtype for k, t in mapped.items() if t.is_floating_point() and not k.startswith("model.abstractor.")), None
    )


# ---------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------


def _open_checkpoint(src, work_dir, progress):
    src = Path(src)
    if src.is_dir():
        return contextlib.nullcontext(FolderCheckpoint(src))
    if not src.exists():
        raise ConversionError(f"{src} does not exist; pass an official .tar.gz archive or the folder it unpacks to")
    if not is_archive(src):
        raise ConversionError(f"{src} is neither a folder nor a .tar.gz/.tgz/.tar archive")
    return ArchiveCheckpoint(src, work_dir, progress)


def convert_official_checkpoint(
    src,
    out,
    tokenizer,
    dtype=None,
    max_shard_size="5GB",
    force=False,
    name=None,
    work_dir=None,
    allow_unknown_config_keys=(),
    progress=True,
):
    """Convert an official Honeybee checkpoint (`.tar.gz` or folder) into the Hub-ready folder `out`.

    `tokenizer`: Vicuna's sentencepiece `tokenizer.model`, or a folder holding it or a `tokenizer.json`.
    `dtype`: "bfloat16", "float16" or "float32" (default: the checkpoint's); a D-Abstractor stays float32, as
    the official code ran it. `work_dir`: where an archive's weight files are spooled one at a time (default: next
    to `out`).
    """
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve() or out.resolve() in src.resolve().parents:
        raise ConversionError(f"OUT ({out}) must not be SRC or a folder holding it: it is replaced at the end")
    refuse_existing(out, force)
    max_shard_size = parse_size(max_shard_size)
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    with _open_checkpoint(src, work_dir or out.resolve().parent, progress) as checkpoint:
        text, found_name = checkpoint.config_text()
        try:
            official = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ConversionError(f"config.json of {src} is not valid JSON ({error})") from error
        try:
            kwargs, image_mean, image_std = official_config_to_kwargs(official, allow_unknown_config_keys)
        except ValueError as error:
            raise ConversionError(str(error)) from error
        vocab = kwargs["text_config"]["vocab_size"]
        backend = tokenizer_backend(tokenizer, vocab, kwargs["text_config"])
        kwargs["text_config"]["vocab_size"] = vocab + 1  # + <image>
        try:
            config = HoneybeeConfig(**kwargs, image_token_id=vocab)
        except ValueError as error:
            raise ConversionError(f"config.json: {error}") from error
        from ..modeling_honeybee import HoneybeeForConditionalGeneration

        with torch.device("meta"):
            target = HoneybeeForConditionalGeneration(config).state_dict()

        def check_whole(table):  # every key, shape, the completeness and the eos tokens, on meta tensors
            check_eos_tokens(official, config, table)
            try:
                map_official_state_dict({k: v for state in table.values() for k, v in state.items()}, target)
            except ValueError as error:
                raise ConversionError(f"the weights do not fit the checkpoint's config.json: {error}") from error

        # A folder is checked whole before anything is written; an archive can be read only once, so it is
        # checked file by file as it streams (unknown keys, shapes) and whole at the end, before OUT is replaced.
        files, index, index_name = checkpoint.weights_index()
        if files is not None:
            table = {}
            for file, state in tqdm(
                checkpoint.weight_files(files),
                total=len(files),
                desc="Checking weight files",
                unit="file",
                disable=not progress,
            ):
                table[file] = meta_state(state)
                del state
            check_weight_table(table, index, index_name)
            check_whole(table)
        processor = build_processor(backend, config, image_mean, image_std)
        name = name or found_name
        fp32_abstractor = config.projector_config.projector_type == "d-abs"  # the official D-Abs always ran in fp32
        out_dtype = DTYPES[dtype] if dtype else None

        with staging_folder(out, force) as staging:
            writer = _Writer(staging, max_shard_size, progress)
            streamed = {}
            for file, state in tqdm(
                checkpoint.weight_files(files),
                total=files and len(files),
                desc="Converting weight files",
                unit="file",
                disable=not progress,
            ):
                streamed[file] = meta_state(state)
                try:
                    mapped = map_official_state_dict(state, target, complete=False)
                except ValueError as error:
                    raise ConversionError(f"the weights do not fit the checkpoint's config.json: {error}") from error
                del state
                out_dtype = out_dtype or checkpoint_dtype(mapped)
                dtypes = {
                    key: (torch.float32 if fp32_abstractor and key.startswith("model.abstractor.") else out_dtype)
                    if t.is_floating_point()
                    else t.dtype
                    for key, t in mapped.items()
                }
                writer.add(mapped, dtypes)
                del mapped
            if files is None:
                index, index_name = checkpoint.finish_index(list(streamed))
                check_weight_table(streamed, index, index_name)
                check_whole(streamed)
            writer.finish()
            dtype_name = str(out_dtype).replace("torch.", "")
            config.save_pretrained(staging)
            _patch_config_dtype(staging / "config.json", dtype_name)
            card = render_model_card(config, name=name, source=src.name, dtype=dtype_name)
            write_support_files(config, processor, staging, card)
    return out


def _patch_config_dtype(path, dtype_name):
    data = json.loads(path.read_text())
    data["torch_dtype"] = data["dtype"] = dtype_name
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def is_package_folder(src):
    """A folder saved by this package (`save_pretrained` / `save_hub_folder`): config.json with model_type honeybee."""
    config = Path(src) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "honeybee"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def export_trained(src, out, processor=None, dtype=None, max_shard_size="5GB", force=False, model_card=None):
    """A model saved by this package (e.g. fine-tuned, then `save_pretrained`) -> a Hub-ready folder.

    `processor`: a folder with the processor files (default: `src`). The weights keep their dtype unless `dtype`.
    """
    from ..modeling_honeybee import HoneybeeForConditionalGeneration
    from ..processing_honeybee import HoneybeeProcessor

    src, out = Path(src), Path(out)
    refuse_existing(out, force)
    processor_src = Path(processor) if processor is not None else src
    try:
        loaded_processor = HoneybeeProcessor.from_pretrained(processor_src)
    except (OSError, ValueError, TypeError) as error:
        raise ConversionError(
            f"cannot load the processor from {processor_src} ({error}); give the folder of the model it was "
            "trained from with --processor"
        ) from error
    model, info = HoneybeeForConditionalGeneration.from_pretrained(
        src, dtype=DTYPES[dtype] if dtype else "auto", output_loading_info=True
    )
    problems = {kind: keys for kind, keys in info.items() if keys}
    if problems:  # a weight left at its random init must never reach the Hub
        raise ConversionError(f"{src} does not load cleanly: {problems}")
    if model_card is None:
        model_card = render_model_card(model.config, dtype=str(model.dtype).replace("torch.", ""), fine_tuned=True)
    return save_hub_folder(
        model.eval(), loaded_processor, out, max_shard_size=max_shard_size, model_card=model_card, force=force
    )


def build_parser():
    parser = argparse.ArgumentParser(
        prog="honeybee-convert",
        description="Turn an official Honeybee checkpoint (.tar.gz, <name>/ or <name>/last/) into a Hugging Face Hub "
        "folder that loads with trust_remote_code on transformers 4.57 and 5.x. A folder saved by honeybee-hf "
        "(model_type 'honeybee', e.g. a fine-tuned model) is exported the same way.",
    )
    parser.add_argument(
        "src", type=Path, help="official .tar.gz archive, or its extracted <name>/ or <name>/last/ folder"
    )
    parser.add_argument("out", type=Path, help="the Hub folder to write (must not exist, unless --force)")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        help="Vicuna/Llama sentencepiece tokenizer.model, or a folder with tokenizer files "
        "(required for official checkpoints)",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="weight dtype (default: the checkpoint's, bfloat16 for the release)"
    )
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default: 5GB)")
    parser.add_argument(
        "--force", action="store_true", help="replace OUT if it exists (only once the new folder is complete)"
    )
    parser.add_argument("--name", help="checkpoint name for the model card, e.g. 7B-C-Abs-M144 (default: from SRC)")
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="where an archive's weight files are spooled, one at a time (default: next to OUT)",
    )
    parser.add_argument(
        "--allow-unknown-config-key",
        action="append",
        default=[],
        metavar="SECTION.KEY",
        help="accept (and ignore) a config.json key this converter does not know, e.g. projector_config.foo; "
        "check the outputs of the converted model",
    )
    parser.add_argument(
        "--processor", type=Path, help="for a honeybee-hf folder without processor files: where to take them from"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


@console_script("honeybee-convert")
def main(argv):
    parser = build_parser()
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    try:
        if args.src.is_dir() and is_package_folder(args.src):
            export_trained(args.src, args.out, args.processor, args.dtype, args.max_shard_size, args.force)
        else:
            if args.tokenizer is None:
                raise ConversionError("--tokenizer is required: official checkpoints ship without a tokenizer")
            convert_official_checkpoint(
                args.src,
                args.out,
                args.tokenizer,
                dtype=args.dtype,
                max_shard_size=args.max_shard_size,
                force=args.force,
                name=args.name,
                work_dir=args.work_dir,
                allow_unknown_config_keys=args.allow_unknown_config_key,
                progress=not args.quiet,
            )
    except (OSError, MemoryError) as error:  # an existing OUT, a full disk, a missing file, too little memory
        what = "out of memory" if isinstance(error, MemoryError) else error
        raise CommandError(f"{what}; {args.out} was not written or changed") from error
    except KeyboardInterrupt:
        print(f"honeybee-convert: interrupted; {args.out} was not written or changed", file=sys.stderr)
        return 130
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
