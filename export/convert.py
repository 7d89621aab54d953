"""`honeybee-convert`: an official Honeybee checkpoint (Kakao Brain's `.tar.gz` release, or the folder it unpacks
to) -> a Hub-ready folder that loads with `trust_remote_code=True` on transformers 4.57 and 5.x.

    honeybee-convert 7B-C-Abs-M144.tar.gz Honeybee-C-7B-M144 --tokenizer vicuna-7b-v1.5/tokenizer.model

What happens, in order; every check runs before anything is written:
1. The archive is unpacked next to OUT (regular files and folders only: absolute paths, `..`, links and devices
   are refused) and `<name>/last/` is found. A folder (`<name>/` or `<name>/last/`) is read in place.
2. `config.json` (Dec-2023 or HEAD format) becomes a `HoneybeeConfig` (`official.official_config_to_kwargs`),
   with the vocabulary grown by one for `<image>` (id = the official vocabulary size).
3. The tokenizer (Vicuna's sentencepiece `tokenizer.model`, or a folder) must have exactly that vocabulary.
4. Every weight file is opened (memory-mapped, `torch.load(weights_only=True)`: nothing in it is executed) and its
   keys and shapes are mapped onto a meta-device model (`official.map_official_state_dict`): an unknown, missing
   or wrongly shaped tensor, a missing or truncated shard, or eos tokens that disagree with the config stop here.
5. The weights are streamed: one official shard is loaded at a time, mapped, and written out as safetensors shards
   as soon as each is complete, so memory holds one official shard (memory-mapped) and one output shard at most.
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
import uuid
import zlib
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from ..configuration_honeybee import HoneybeeConfig
from ..modeling_honeybee import HoneybeeForConditionalGeneration
from ..processing_honeybee import IMAGE_TOKEN, HoneybeeProcessor
from .hub import refuse_existing, save_hub_folder, staging_folder, write_support_files
from .model_card import render_model_card
from .official import (
    map_official_state_dict,
    num_eos_tokens_origin,
    official_config_to_kwargs,
    official_image_processor,
)
from .tokenizer import load_backend, save_tokenizer_files

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
# Unpacking
# ---------------------------------------------------------------------------------------------------------


class _ProgressReader:
    """A read-only file wrapper that advances a progress bar by the bytes read."""

    def __init__(self, raw, bar):
        self.raw, self.bar = raw, bar

    def read(self, size=-1):
        data = self.raw.read(size)
        self.bar.update(len(data))
        return data


def _member_destination(member, root):
    """Where `member` may be written inside `root`, or a ConversionError naming it."""
    name = member.name
    if not (member.isfile() or member.isdir()):
        kind = "a symbolic link" if member.issym() else "a hard link" if member.islnk() else "not a regular file"
        target = f" to {member.linkname!r}" if member.issym() or member.islnk() else ""
        raise ConversionError(
            f"archive member {name!r} is {kind}{target}; an official checkpoint holds only files and folders, "
            "refusing to unpack it"
        )
    parts = PurePosixPath(name).parts
    if name.startswith(("/", "\\")) or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
        raise ConversionError(
            f"archive member {name!r} would be written outside the target folder; refusing to unpack it"
        )
    destination = (root / name).resolve()
    if destination != root and root not in destination.parents:
        raise ConversionError(
            f"archive member {name!r} would be written outside the target folder; refusing to unpack it"
        )
    return destination


def safe_extract(archive, target, progress=True):
    """Unpack a `.tar[.gz]` into the empty folder `target`: regular files and folders only, nothing outside it,
    no file written twice. A truncated or corrupt archive raises a ConversionError."""
    archive, root = Path(archive), Path(target).resolve()
    try:
        with (
            open(archive, "rb") as raw,
            tqdm(
                total=archive.stat().st_size,
                unit="B",
                unit_scale=True,
                desc=f"Unpacking {archive.name}",
                disable=not progress,
            ) as bar,
        ):
            with tarfile.open(fileobj=_ProgressReader(raw, bar), mode="r|*") as tar:
                for member in tar:
                    destination = _member_destination(member, root)
                    if member.isdir():
                        destination.mkdir(parents=True, exist_ok=True)
                        continue
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    source = tar.extractfile(member)
                    try:
                        with open(destination, "xb") as out:
                            shutil.copyfileobj(source, out, _COPY_CHUNK)
                    except FileExistsError:
                        raise ConversionError(
                            f"archive member {member.name!r} appears twice; refusing an ambiguous archive"
                        ) from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise ConversionError(
            f"{archive} is truncated or corrupt ({type(error).__name__}: {error}); download it again"
        ) from error


def _locate_checkpoint(folder):
    """(`<name>/last`, name) for a folder that is `<name>/last/` or `<name>/`, else None."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder, (folder.parent.name if folder.name == "last" else folder.name)
    if (folder / "last" / "config.json").is_file():
        return folder / "last", folder.name
    return None


def is_archive(path):
    return Path(path).is_file() and Path(path).name.lower().endswith(ARCHIVE_SUFFIXES)


def archive_stem(path):
    name = Path(path).name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


@contextlib.contextmanager
def unpacked_checkpoint(src, work_dir, progress=True):
    """Yield (checkpoint folder holding config.json and the weights, checkpoint name) for an archive or a folder.
    An archive is unpacked into a temporary folder in `work_dir`, deleted afterwards whatever happens."""
    src = Path(src)
    if src.is_dir():
        found = _locate_checkpoint(src)
        if found is None:
            raise ConversionError(
                f"{src} holds neither config.json nor last/config.json: not an official Honeybee checkpoint"
            )
        yield found
        return
    if not src.exists():
        raise ConversionError(f"{src} does not exist")
    if not is_archive(src):
        raise ConversionError(f"{src} is neither a folder nor a .tar.gz/.tgz/.tar archive")
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    unpack = Path(work_dir) / f".{archive_stem(src)}.unpack-{uuid.uuid4().hex[:8]}"
    unpack.mkdir()
    try:
        safe_extract(src, unpack, progress)
        entries = [p for p in unpack.iterdir()]
        found = (
            _locate_checkpoint(entries[0]) if len(entries) == 1 and entries[0].is_dir() else _locate_checkpoint(unpack)
        )
        if found is None:
            raise ConversionError(
                f"{src} holds no <name>/last/config.json (members at its top: {sorted(p.name for p in entries)}); "
                "not an official Honeybee archive"
            )
        if found[1] == unpack.name or found[0] == unpack:  # the archive holds last/ or its files, without <name>/
            found = (found[0], archive_stem(src))
        yield found
    finally:
        shutil.rmtree(unpack, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# Official weight files
# ---------------------------------------------------------------------------------------------------------


class OfficialWeights:
    """The weight files of an official checkpoint folder (`pytorch_model.bin`, or shards and their index; also
    safetensors), read one file at a time."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.index = None  # key -> file, for sharded checkpoints
        for kind, (single, index) in WEIGHT_FILES.items():
            if (self.folder / single).is_file():
                self.kind, self.files, self.index_name = kind, [single], None
                break
            if (self.folder / index).is_file():
                self.kind, self.index_name = kind, index
                try:
                    self.index = json.loads((self.folder / index).read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as error:
                    raise ConversionError(f"{self.folder / index} is not a weights index ({error})") from error
                self.files = sorted(set(self.index.values()))
                break
        else:
            shards = sorted(p.name for p in self.folder.glob("pytorch_model-*.bin"))
            hint = f" (shards {shards} but no pytorch_model.bin.index.json)" if shards else ""
            raise ConversionError(f"{self.folder} holds no pytorch_model.bin, nor a weights index{hint}")
        for name in self.files:
            if not (self.folder / name).is_file():
                count = sum(1 for f in self.index.values() if f == name)
                raise ConversionError(
                    f"shard {name} is missing: {self.index_name} puts {count} tensors in it but {self.folder} has no "
                    "such file (an incomplete download or extraction?)"
                )

    def load(self, name):
        """All tensors of one weight file; `.bin` files are memory-mapped when their format allows it."""
        path = self.folder / name
        if self.kind == "safetensors":
            try:
                with safe_open(str(path), framework="pt") as f:
                    return {key: f.get_tensor(key) for key in f.keys()}
            except (SafetensorError, OSError) as error:
                raise ConversionError(f"cannot read {path}: {error}; the file is truncated or corrupt") from error
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                if "mmap" not in str(error):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
        except pickle.UnpicklingError as error:
            if "weights only" not in str(error).lower():
                raise ConversionError(f"cannot read {path}: {error}; the file is truncated or corrupt") from error
            raise ConversionError(
                f"refusing to load {path}: it holds pickled objects other than tensors, which "
                f"torch.load(weights_only=True) will not build ({str(error).splitlines()[0]})"
            ) from error
        except (RuntimeError, EOFError, OSError, ValueError) as error:
            raise ConversionError(f"cannot read {path}: {error}; the file is truncated or corrupt") from error
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise ConversionError(f"{path} does not hold a state dict (a dict of named tensors)")
        return state

    def metadata(self, progress=True):
        """{file: {key: meta tensor of the same shape and dtype}}, reading every file once; checks the index."""
        table = {}
        for name in tqdm(self.files, desc="Checking weight files", unit="file", disable=not progress):
            state = self.load(name)
            table[name] = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()}
            del state
            if self.index is not None:
                indexed = {k for k, f in self.index.items() if f == name}
                extra, missing = sorted(set(table[name]) - indexed), sorted(indexed - set(table[name]))
                if missing:
                    raise ConversionError(
                        f"{name} lacks {missing[0]!r}, which {self.index_name} says it holds ({len(missing)} missing)"
                    )
                if extra:
                    raise ConversionError(f"{name} holds {extra[0]!r}, which {self.index_name} does not list")
        seen = {}
        for name, state in table.items():
            for key in state:
                if key in seen:
                    raise ConversionError(f"{key!r} is in both {seen[key]} and {name}")
                seen[key] = name
        return table


# ---------------------------------------------------------------------------------------------------------
# Checks, plan, writing
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
    """Streams mapped tensors into safetensors shards planned in advance (`plan`: one list of keys per shard)."""

    def __init__(self, folder, plan, dtypes, progress):
        self.folder, self.plan, self.dtypes = Path(folder), plan, dtypes
        n = len(plan)
        self.names = (
            ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.pending, self.next, self.total_size, self.weight_map = {}, 0, 0, {}
        self.bar = tqdm(total=n, desc="Writing shards", unit="shard", position=1, disable=not progress)

    def add(self, tensors):
        self.pending.update(tensors)
        while self.next < len(self.plan) and all(k in self.pending for k in self.plan[self.next]):
            shard = {}
            for key in self.plan[self.next]:
                tensor = self.pending.pop(key)
                shard[key] = tensor.to(self.dtypes[key]).contiguous()
                if (
                    self.dtypes[key] == torch.float16
                    and not torch.isfinite(shard[key]).all()
                    and torch.isfinite(tensor).all()
                ):
                    raise ConversionError(
                        f"{key} overflows float16 (its values exceed ±65504); keep bfloat16 or float32"
                    )
            path = self.folder / self.names[self.next]
            save_file(shard, str(path), metadata={"format": "pt"})
            path.chmod(0o644)  # safetensors writes 0600 (a temporary file renamed); a Hub folder is for sharing
            self.total_size += sum(t.numel() * t.element_size() for t in shard.values())
            self.weight_map.update(dict.fromkeys(shard, self.names[self.next]))
            del shard
            self.next += 1
            self.bar.update(1)

    def finish(self):
        self.bar.close()
        if self.next != len(self.plan) or self.pending:
            raise RuntimeError(f"internal error: {len(self.plan) - self.next} shards left unwritten")
        if len(self.plan) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def plan_shards(mapped_per_file, dtypes, max_shard_size):
    """Keys per output shard, in streaming order, each shard at most `max_shard_size` bytes (or one tensor)."""
    plan, size = [[]], 0
    for mapped in mapped_per_file:
        for key, tensor in mapped.items():
            nbytes = tensor.numel() * torch.empty((), dtype=dtypes[key]).element_size()
            if plan[-1] and size + nbytes > max_shard_size:
                plan.append([])
                size = 0
            plan[-1].append(key)
            size += nbytes
    return plan


# ---------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------


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
    the official code ran it. `work_dir`: where an archive is unpacked (default: next to `out`).
    """
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve() or out.resolve() in src.resolve().parents:
        raise ConversionError(f"OUT ({out}) must not be SRC or a folder holding it: it is replaced at the end")
    refuse_existing(out, force)
    max_shard_size = parse_size(max_shard_size)
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    with unpacked_checkpoint(src, work_dir or out.resolve().parent, progress) as (folder, found_name):
        try:
            official = json.loads((folder / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ConversionError(f"{folder / 'config.json'} is not valid JSON ({error})") from error
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

        weights = OfficialWeights(folder)
        table = weights.metadata(progress)
        check_eos_tokens(official, config, table)
        with torch.device("meta"):
            target = HoneybeeForConditionalGeneration(config).state_dict()
        try:  # every key, shape and the completeness, on meta tensors: no weight is read yet
            map_official_state_dict({k: v for state in table.values() for k, v in state.items()}, target)
            mapped_meta = [map_official_state_dict(state, target, complete=False) for state in table.values()]
        except ValueError as error:
            raise ConversionError(f"the weights do not fit the checkpoint's config.json: {error}") from error
        embed = next(s[EMBED_KEY] for s in table.values() if EMBED_KEY in s)  # present: the mapping checked it
        out_dtype = DTYPES[dtype] if dtype else embed.dtype
        fp32_abstractor = config.projector_config.projector_type == "d-abs"  # the official D-Abs always ran in fp32
        dtypes = {
            key: (torch.float32 if fp32_abstractor and key.startswith("model.abstractor.") else out_dtype)
            if t.is_floating_point()
            else t.dtype
            for mapped in mapped_meta
            for key, t in mapped.items()
        }
        plan = plan_shards(mapped_meta, dtypes, max_shard_size)
        processor = build_processor(backend, config, image_mean, image_std)
        name = name or found_name
        dtype_name = str(out_dtype).replace("torch.", "")
        card = render_model_card(config, name=name, source=src.name, dtype=dtype_name)

        with staging_folder(out, force) as staging:
            config.save_pretrained(staging)
            _patch_config_dtype(staging / "config.json", dtype_name)
            files = tqdm(weights.files, desc="Loading official shards", unit="file", disable=not progress)
            writer = _Writer(staging, plan, dtypes, progress)
            for file in files:
                state = weights.load(file)
                mapped = map_official_state_dict(state, target, complete=False)
                del state
                writer.add(mapped)
                del mapped
            writer.finish()
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
    parser.add_argument("--work-dir", type=Path, help="where to unpack an archive (default: next to OUT)")
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


def main(argv=None):
    args = build_parser().parse_args(argv)
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
    except (ConversionError, OSError) as error:  # OSError: an existing OUT, a full disk, a missing file...
        print(f"honeybee-convert: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"honeybee-convert: interrupted; {args.out} was not written or changed", file=sys.stderr)
        return 130
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
