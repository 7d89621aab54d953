"""Where an official checkpoint's files come from: a folder read in place, or a `.tar[.gz]` read once, front to back,
as a stream, never unpacked (its members checked as they come: regular files and folders only). Either gives
config.json, then each weight file (`weight_files.py`) one at a time."""

import contextlib
import gzip
import io
import json
import queue
import re
import shutil
import tarfile
import tempfile
import threading
import zlib
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from . import ConversionError
from .weight_files import NotStreamable, StreamedBin, load_weight_file, note_not_streamed, open_weight_file

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
WEIGHT_FILES = {  # single file, index; in the order transformers 4.38 looked for them (.bin first: the release)
    "bin": ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    "safetensors": ("model.safetensors", "model.safetensors.index.json"),
}
_COPY_CHUNK = 16 << 20
_INFLATED_CHUNK = 4 << 20  # small: what waits in memory (up to `depth` chunks) is anonymous memory
GZIP_MAGIC = b"\x1f\x8b"


class _ProgressReader:
    """A read-only file wrapper that advances a progress bar by the bytes read."""

    def __init__(self, raw, bar):
        self.raw, self.bar = raw, bar

    def read(self, size=-1):
        data = self.raw.read(size)
        self.bar.update(len(data))
        return data


class _TarBytes:
    """The tar inside an archive, as a file that only goes forward: `read`, `readinto`, `tell` and a `seek` that
    skips ahead, which is all tarfile's "r:" mode asks once nothing seeks back (tarfile parses the headers; a member's
    data is read straight from here, `_Member`). A gzip stream (all its members, as `gzip` reads them) is inflated in
    a thread of its own, a few chunks ahead of the reader: zlib lets go of the GIL while it inflates, so inflating
    overlaps with parsing and writing, as gzip and tar run side by side in `tar xzf`. At most `depth` chunks of
    `chunk` bytes wait. A truncated or corrupt stream raises, in the reader, what `gzip` would (EOFError,
    zlib.error, BadGzipFile). A plain tar is read as it is."""

    def __init__(self, raw, gzipped, chunk, depth=4):
        self.raw, self.chunk, self.position, self.current = raw, chunk, 0, memoryview(b"")
        self.ended, self.error, self.thread = False, None, None
        if gzipped:
            self.chunks, self.stop = queue.Queue(maxsize=depth), threading.Event()
            self.thread = threading.Thread(target=self._inflate, daemon=True)
            self.thread.start()

    def _inflate(self):
        try:
            inflater, data = zlib.decompressobj(16 + zlib.MAX_WBITS), b""
            while not self.stop.is_set():
                if not data:
                    data = self.raw.read(self.chunk)
                    if not data:
                        if not inflater.eof:
                            raise EOFError("Compressed file ended before the end-of-stream marker was reached")
                        break
                if inflater.eof:  # the next member, after the zero padding gzip allows between members
                    data = data.lstrip(b"\0")
                    if not data:
                        continue
                    if not data.startswith(GZIP_MAGIC):
                        raise gzip.BadGzipFile("Not a gzipped file after the first member")
                    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
                out = inflater.decompress(data, self.chunk)  # a chunk at most, however well the input compressed
                data = inflater.unconsumed_tail or inflater.unused_data
                if out:
                    self._put(out)
            self._put(None)
        except BaseException as error:  # handed to the reader, which raises it
            self._put(error)

    def _put(self, item):
        while not self.stop.is_set():
            try:
                self.chunks.put(item, timeout=0.1)
                return
            except queue.Full:
                pass

    def _refill(self):
        """The next chunk into `current`; False at the end."""
        if self.thread is None:
            self.current = memoryview(self.raw.read(self.chunk))
            return bool(self.current)
        if not self.ended:
            item = self.chunks.get()
            if isinstance(item, BaseException):
                self.ended, self.error = True, item
            elif item is None:
                self.ended = True
            else:
                self.current = memoryview(item)
        if self.error is not None:
            raise self.error
        return not self.ended

    def readinto(self, buffer):
        view, filled = memoryview(buffer).cast("B"), 0
        while filled < len(view) and (self.current or self._refill()):
            count = min(len(self.current), len(view) - filled)
            view[filled : filled + count] = self.current[:count]
            self.current, filled = self.current[count:], filled + count
        self.position += filled
        return filled

    def read(self, size=-1):
        if size < 0:
            raise io.UnsupportedOperation("an unbounded read of an archive")
        buffer = bytearray(size)
        return bytes(memoryview(buffer)[: self.readinto(buffer)])

    def tell(self):
        return self.position

    def seek(self, position, whence=io.SEEK_SET):
        """Skip ahead to `position` (infinity: to the end)."""
        if whence != io.SEEK_SET or position < self.position:
            raise io.UnsupportedOperation("the archive is read front to back only")
        while self.position < position and (self.current or self._refill()):
            count = min(len(self.current), position - self.position)
            self.current, self.position = self.current[count:], self.position + count
        return self.position

    def close(self):
        if self.thread is not None:
            self.stop.set()
            self.thread.join()


class _Member:
    """A member's data, read straight from the archive's `_TarBytes` (no copy through tarfile), its read errors
    `ArchiveCheckpoint._reading`'s one-line error."""

    def __init__(self, tar_bytes, member, reading):
        self.tar_bytes, self.reading = tar_bytes, reading
        with reading():
            tar_bytes.seek(member.offset_data)
        self.left = member.size

    def readinto(self, buffer):
        view = memoryview(buffer).cast("B")[: self.left]
        with self.reading():
            count = self.tar_bytes.readinto(view)
        self.left -= count
        return count

    def read(self, size=-1):
        buffer = bytearray(self.left if size < 0 else min(size, self.left))
        return bytes(memoryview(buffer)[: self.readinto(buffer)])


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
        self.noted = set()

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
        """(file name, weight file) of each file of `files`, one at a time (`weight_files.open_weight_file`); a file
        read twice (checked, then converted) that cannot be streamed is named once."""
        for name in files:
            with open_weight_file(self.folder / name, note=self._note_once) as weights:
                yield name, weights

    def _note_once(self, name, reason):
        if name not in self.noted:
            self.noted.add(name)
            note_not_streamed(name, reason)


class ArchiveCheckpoint:
    """An official `.tar[.gz]` read once, front to back, as a stream: nothing is unpacked. Each `.bin` is read from
    the stream as it passes (`weight_files.StreamedBin`), so nothing goes to disk. A weight file waits in a
    temporary file in `work_dir`, converted and deleted, only when it precedes config.json (the release archives
    put config.json first), when it is safetensors, or when the stream reader cannot read it (it says so on
    stderr). Every member is checked before it is read: regular files and folders only, no absolute path, no
    `..`, no member twice."""

    def __init__(self, archive, work_dir, progress=True):
        self.archive, self.progress = Path(archive), progress
        self.work_dir = Path(work_dir)
        self.folder = None  # the checkpoint's folder inside the archive, once config.json is found
        self.indexes, self.kinds, self.seen, self.top = {}, set(), set(), set()
        self.waiting = {}  # archive path -> temporary file, weight files read before config.json

    def __enter__(self):
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.spool = Path(tempfile.mkdtemp(prefix=f".{archive_stem(self.archive)}.unpack-", dir=self.work_dir))
        self.raw, self.tar_bytes = open(self.archive, "rb"), None
        self.bar = tqdm(
            total=self.archive.stat().st_size,
            unit="B",
            unit_scale=True,
            desc=f"Reading {self.archive.name}",
            disable=not self.progress,
        )
        try:
            magic = self.raw.read(6)
            self.raw.seek(0)
            if magic.startswith((b"BZh", b"\xfd7zXZ")):
                raise ConversionError(
                    f"{self.archive} is compressed with {'bzip2' if magic.startswith(b'BZh') else 'xz'}; the "
                    "releases are .tar.gz: unpack it and pass the folder"
                )
            compressed, gzipped = _ProgressReader(self.raw, self.bar), magic.startswith(GZIP_MAGIC)
            self.tar_bytes = _TarBytes(compressed, gzipped, _INFLATED_CHUNK)
            with self._reading():
                self.tar = tarfile.open(fileobj=self.tar_bytes, mode="r:")
        except BaseException:
            self._close()
            raise
        self.members = iter(self.tar)
        return self

    def __exit__(self, kind, error, traceback):
        try:
            if isinstance(error, ConversionError) and not isinstance(error, _Unreadable):
                self._check_the_rest()  # a member that escapes or links, or a corrupt archive, is the error to report
        finally:
            self._close()

    def _close(self):
        if self.tar_bytes is not None:
            self.tar_bytes.close()
        self.bar.close()
        self.raw.close()
        shutil.rmtree(self.spool, ignore_errors=True)

    def _check_the_rest(self):
        """Check the members not read yet (their names only), so that a refused member is reported even when the
        conversion stopped earlier, as it was when archives were unpacked whole first; and read to the end, so that
        an archive that is corrupt further on is reported as such, being the likelier cause of what stopped it."""
        while self._next_file() is not None:
            pass
        self._read_to_the_end()

    def _read_to_the_end(self):
        """Read what follows the last member: a gzip stream's checksum, which covers every byte, is checked there."""
        with self._reading():
            self.tar_bytes.seek(float("inf"))

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

    def _member_stream(self, member):
        return _Member(self.tar_bytes, member, self._reading)

    def _spool(self, path, stream, head=b""):
        """`head` then the rest of `stream`, to a temporary file."""
        destination = self.spool / f"{len(self.seen)}-{path.name}"
        with open(destination, "xb") as out:
            out.write(head)
            shutil.copyfileobj(stream, out, _COPY_CHUNK)
        return destination

    @staticmethod
    def _checkpoint_folder(path):
        """The checkpoint folder (archive path) and <name> when `path` is its config.json, else None."""
        parts = path.parts
        if parts[-1] != "config.json" or len(parts) > 3 or (len(parts) == 3 and parts[1] != "last"):
            return None
        folder = path.parent
        return folder, (parts[0] if len(parts) >= 2 and parts[0] != "last" else None)

    def _kind(self, path, member):
        """ "bin" or "safetensors" for a weight file of the checkpoint's folder (once it is known), else None; an
        index is kept in memory."""
        kind = _weight_kind(path.name)
        if kind is None or (self.folder is not None and path.parent != self.folder):
            return None
        if path.name == WEIGHT_FILES[kind][1]:
            self.indexes[path] = self._read_bytes(member)
            return None
        self.kinds.add(kind)
        if len(self.kinds) > 1:
            raise ConversionError(f"{self.archive} holds both .bin and .safetensors weights; refusing to pick one")
        return kind

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
                if self._kind(path, member) is not None:  # before config.json: it waits on disk
                    self.waiting[path] = self._spool(path, self._member_stream(member))
                continue
            self.folder, name = located
            for waiting in [p for p in self.waiting if p.parent != self.folder]:
                self.waiting.pop(waiting).unlink()
            return self._read_bytes(member), name or archive_stem(self.archive)

    def weights_index(self):
        """What is known before the weights are read: nothing (the stream order decides); see `finish_index`."""
        return None, None, None

    def weight_files(self, files=None):
        """(file name, weight file) of each weight file of the checkpoint folder, in archive order. The caller reads
        a file's tensors before it asks for the next file: the archive moves on then."""
        for path in list(self.waiting):  # in archive order
            yield from self._from_disk(path, self.waiting.pop(path))
        while (found := self._next_file()) is not None:
            path, member = found
            if self._checkpoint_folder(path) is not None:
                raise ConversionError(f"{self.archive} holds more than one config.json ({path}); ambiguous")
            kind = self._kind(path, member)
            if kind is None:
                continue
            stream = self._member_stream(member)
            if kind == "safetensors":
                yield from self._from_disk(path, self._spool(path, stream))
                continue
            try:
                weights = StreamedBin(stream, path.name)
            except NotStreamable as why:
                note_not_streamed(path.name, why, self.work_dir)
                yield from self._from_disk(path, self._spool(path, stream, why.consumed), streamable=False)
            else:
                yield path.name, weights
        self._read_to_the_end()

    def _from_disk(self, path, spooled, streamable=True):
        """The weight file `path`, spooled to `spooled`, which is deleted once the caller asks for the next file."""
        try:
            if streamable:
                with open_weight_file(spooled, path.name) as weights:
                    yield path.name, weights
            else:
                yield path.name, load_weight_file(spooled, path.name)
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


def open_checkpoint(src, work_dir, progress):
    src = Path(src)
    if src.is_dir():
        return contextlib.nullcontext(FolderCheckpoint(src))
    if not src.exists():
        raise ConversionError(f"{src} does not exist; pass an official .tar.gz archive or the folder it unpacks to")
    if not is_archive(src):
        raise ConversionError(f"{src} is neither a folder nor a .tar.gz/.tgz/.tar archive")
    return ArchiveCheckpoint(src, work_dir, progress)
