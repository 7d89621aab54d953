"""`honeybee-convert`: an official Honeybee checkpoint (Kakao Brain's `.tar.gz` release, or the folder it unpacks
to) -> a Hub-ready folder that loads with `trust_remote_code=True` on transformers 4.57 and 5.x.

    honeybee-convert 7B-C-Abs-M144.tar.gz Honeybee-C-7B-M144 --tokenizer vicuna-7b-v1.5/tokenizer.model

What happens, in order; every check runs before OUT is touched:
1. A folder (`<name>/` or `<name>/last/`) is read in place. An archive is read once, as a stream, never unpacked
   (`archive.py`): its members are checked as they come (regular files and folders only: absolute paths, `..`,
   links and devices are refused) and `<name>/last/config.json` is read.
2. `config.json` (Dec-2023 or HEAD format) becomes a `HoneybeeConfig` (`official.official_config_to_kwargs`),
   with the vocabulary grown by one for `<image>` (id = the official vocabulary size).
3. The tokenizer (Vicuna's sentencepiece `tokenizer.model`, or a folder) must have exactly that vocabulary.
4. Each weight file is read in one pass (`weight_files.py`): a torch.save `.bin` from the archive's stream (or the
   folder's file), its `data.pkl` unpickled first with an unpickler that builds nothing but tensor descriptions,
   then each tensor built when its storage's record arrives. Its names and shapes are planned onto a meta-device
   model before any weight is read (`official.plan_official_state_dict`): an unknown, missing or wrongly shaped
   tensor, a missing or truncated shard, or eos tokens that disagree with the config stop the run. A folder is
   checked whole before anything is written (each file's data.pkl and records, its data skipped); an archive,
   readable only once, file by file as it streams and whole at the end.
5. The plan lays out the file's safetensors shards, whose headers are written first (`writer.py`); each tensor is
   written to its place as it arrives, so memory holds one official tensor at a time (and, for the embedding, the
   `<image>` row). Nothing is spooled to disk, except weight files that come before config.json in an archive or
   that the stream reader cannot read (`weight_files.py` says which), one at a time, next to OUT (`work_dir`).
6. config, generation config, processor and tokenizer files, code and model card are added (`hub/folder.py`), in a
   staging folder that replaces OUT only at the end: a failed or interrupted run leaves OUT as it was.

A folder saved by this package (`model_type: "honeybee"`, e.g. after fine-tuning) is exported the same way
(`hub/trained.py`): loaded, then written with `hub.folder.save_hub_folder`.
"""

import json
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from ..configuration_honeybee import HoneybeeConfig
from ..hub.folder import refuse_existing, staging_folder, write_support_files
from ..hub.model_card import render_model_card
from . import ConversionError
from .archive import open_checkpoint
from .official import (
    edit_tensor,
    edited_parts,
    num_eos_tokens_origin,
    official_config_to_kwargs,
    official_image_processor,
    plan_official_state_dict,
)
from .writer import ShardWriter, parse_size

# The model, processor and tokenizer modules are imported where they are used: importing them imports transformers'
# modeling code, which imports its quantizer integrations (torchao, bitsandbytes) and whatever those print at start;
# `--help` and a mistake in the arguments need none of it.

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


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
    the official code ran it. `work_dir`: where an archive's weight file waits when it cannot be converted as it
    streams (default: next to `out`).
    """
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve() or out.resolve() in src.resolve().parents:
        raise ConversionError(f"OUT ({out}) must not be SRC or a folder holding it: it is replaced at the end")
    refuse_existing(out, force)
    max_shard_size = parse_size(max_shard_size)
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    opened = open_checkpoint(src, work_dir or out.resolve().parent, progress)  # checks SRC, reads nothing yet
    backend = load_tokenizer(tokenizer)  # before the stream: a wrong path must not wait for a 26 GB archive
    with opened as checkpoint:
        text, found_name = checkpoint.config_text()
        official, kwargs, image_mean, image_std = read_official_config(text, src, allow_unknown_config_keys)
        check_tokenizer(backend, tokenizer, kwargs["text_config"])
        config = honeybee_config(kwargs)
        target = meta_state_dict(config)
        files, index, index_name = checkpoint.weights_index()
        if files is not None:  # a folder: checked whole before anything is written
            table = read_weight_table(checkpoint, files, progress)
            check_weights(official, config, target, table, index, index_name)
        processor = build_processor(backend, config, image_mean, image_std)
        with staging_folder(out, force) as staging:
            with ShardWriter(staging, max_shard_size, progress) as writer:
                table, out_dtype = write_weights(checkpoint, files, target, config, writer, DTYPES.get(dtype), progress)
                if files is None:  # an archive, readable only once: checked whole now, before OUT is replaced
                    index, index_name = checkpoint.finish_index(list(table))
                    check_weights(official, config, target, table, index, index_name)
                writer.finish()
            write_hub_files(staging, config, processor, out_dtype, name or found_name, src)
    return out


# ---------------------------------------------------------------------------------------------------------
# config.json, tokenizer, processor
# ---------------------------------------------------------------------------------------------------------


def read_official_config(text, src, allow_unknown_config_keys=()):
    """(official config dict, HoneybeeConfig kwargs before `<image>`, image mean, image std) from config.json."""
    try:
        official = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"config.json of {src} is not valid JSON ({error})") from error
    try:
        kwargs, image_mean, image_std = official_config_to_kwargs(official, allow_unknown_config_keys)
    except ValueError as error:
        raise ConversionError(str(error)) from error
    return official, kwargs, image_mean, image_std


def honeybee_config(kwargs):
    """The HoneybeeConfig of the official kwargs, its vocabulary grown by one for `<image>` (id = the official
    vocabulary size, so every official id keeps its meaning)."""
    vocab = kwargs["text_config"]["vocab_size"]
    kwargs = dict(kwargs, text_config=dict(kwargs["text_config"], vocab_size=vocab + 1))
    try:
        return HoneybeeConfig(**kwargs, image_token_id=vocab)
    except ValueError as error:
        raise ConversionError(f"config.json: {error}") from error


def load_tokenizer(source):
    """The tokenizer's `tokenizers.Tokenizer`."""
    from .tokenizer import load_backend

    try:
        return load_backend(source)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as error:
        raise ConversionError(f"cannot load the tokenizer {source}: {error}") from error


def check_tokenizer(backend, source, text_config):
    """The tokenizer `backend` (read from `source`) must match the checkpoint's vocabulary and special ids."""
    from ..processing_honeybee import IMAGE_TOKEN

    vocab_size = text_config["vocab_size"]
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
    from .chat_template import CHAT_TEMPLATE
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
        image_processor,
        tokenizer,
        chat_template=CHAT_TEMPLATE,
        num_query_tokens=pc.num_query_tokens,
        num_eos_tokens=pc.num_eos_tokens,
    )


# ---------------------------------------------------------------------------------------------------------
# The weights: checked, then converted one official file at a time
# ---------------------------------------------------------------------------------------------------------


def meta_state_dict(config):
    """Our model's state dict on the meta device: every key and shape, no memory."""
    from ..modeling_honeybee import HoneybeeForConditionalGeneration

    with torch.device("meta"):
        return HoneybeeForConditionalGeneration(config).state_dict()


def read_weight_table(checkpoint, files, progress):
    """{file: meta state} of a folder's weight files, each file's records verified (its data skipped)."""
    table = {}
    for file, weights in tqdm(
        checkpoint.weight_files(files),
        total=len(files),
        desc="Checking weight files",
        unit="file",
        disable=not progress,
    ):
        weights.check()
        table[file] = weights.meta
    return table


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


def plan_weights(meta, target, complete=False):
    """`official.plan_official_state_dict`, its ValueError a ConversionError."""
    try:
        return plan_official_state_dict(meta, target, complete=complete)
    except ValueError as error:
        raise ConversionError(f"the weights do not fit the checkpoint's config.json: {error}") from error


def check_weights(official, config, target, table, index, index_name):
    """The whole checkpoint (`table`: {file: meta state}): against its index, every key and shape, none missing,
    and the eos tokens."""
    check_weight_table(table, index, index_name)
    check_eos_tokens(official, config, table)
    plan_weights({k: v for state in table.values() for k, v in state.items()}, target, complete=True)


def checkpoint_dtype(mapped):
    """The checkpoint's dtype: that of its first floating tensor outside the abstractor (the official training
    casts the whole model to one dtype; the abstractor may differ), or None when `mapped` holds none."""
    return next(
        (t.dtype for k, t in mapped.items() if t.is_floating_point() and not k.startswith("model.abstractor.")), None
    )


def write_weights(checkpoint, files, target, config, writer, out_dtype, progress):
    """Convert and write every weight file of `checkpoint` as it is read; `out_dtype` None: the checkpoint's.
    Returns ({file: meta state}, the dtype written)."""
    fp32_abstractor = config.projector_config.projector_type == "d-abs"  # the official D-Abs always ran in fp32
    table = {}
    for file, weights in tqdm(
        checkpoint.weight_files(files),
        total=files and len(files),
        desc="Converting weight files",
        unit="file",
        disable=not progress,
    ):
        table[file] = weights.meta
        plan = plan_weights(weights.meta, target)
        shapes = {ours: edit_tensor(edit, weights.meta[key]) for key, (ours, edit) in plan.items()}  # meta
        out_dtype = out_dtype or checkpoint_dtype(shapes)
        writer.add_file(
            [(key, tuple(t.shape), _written_dtype(key, t, out_dtype, fp32_abstractor)) for key, t in shapes.items()]
        )
        for key, tensor in weights.tensors():
            if key in plan:  # not a stale buffer nor CLIP's unused post_layernorm
                ours, edit = plan[key]
                writer.write(ours, edited_parts(edit, tensor))
            del tensor
        writer.close_file()
    return table, out_dtype


def _written_dtype(key, tensor, out_dtype, fp32_abstractor):
    if not tensor.is_floating_point():
        return tensor.dtype
    if fp32_abstractor and key.startswith("model.abstractor."):
        return torch.float32
    return out_dtype or tensor.dtype  # None while only abstractor weights were read (the dtype is not known yet)


def write_hub_files(folder, config, processor, dtype, name, src):
    """config.json (with the weights' dtype), generation config, processor and tokenizer files, code and card."""
    dtype_name = str(dtype).replace("torch.", "")
    config.save_pretrained(folder)
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data["torch_dtype"] = data["dtype"] = dtype_name
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    card = render_model_card(config, name=name, source=src.name, dtype=dtype_name)
    write_support_files(config, processor, folder, card)
