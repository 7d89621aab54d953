"""Write a Hub-ready Honeybee folder: safetensors weights, config with `auto_map` and the custom pipeline,
processor and tokenizer files, generation config, the remote-code files, and an optional model card.

Every file is written so that transformers 4.57 and 5.x both load it, whichever version runs this: the
weights' keys do not depend on the version (modeling_honeybee.py owns the CLIP module), and the config, processor
and tokenizer JSON are patched or written by hand where the two versions disagree. The folder appears whole or
not at all: it is written next to its destination and renamed at the end.
"""

import contextlib
import json
import shutil
import uuid
from pathlib import Path

from transformers import GenerationConfig
from transformers.dynamic_module_utils import get_relative_import_files

PACKAGE_DIR = Path(__file__).resolve().parent.parent
MODEL_CLASS = "modeling_honeybee.HoneybeeForConditionalGeneration"
AUTO_MAP = {
    "AutoConfig": "configuration_honeybee.HoneybeeConfig",
    "AutoModel": "modeling_honeybee.HoneybeeModel",  # the backbone, as transformers' LLaVA (vLLM needs it)
    "AutoModelForVision2Seq": MODEL_CLASS,  # transformers 4.x; 5.x ignores it
    "AutoModelForImageTextToText": MODEL_CLASS,
    "AutoProcessor": "processing_honeybee.HoneybeeProcessor",
}
# Both versions consult custom_pipelines before their own tasks; "pt" must name classes that exist in both.
CUSTOM_PIPELINES = {
    "image-to-text": {
        "impl": "pipeline_honeybee.HoneybeeImageToTextPipeline",
        "pt": ["AutoModelForImageTextToText"],
        "tf": [],
        "type": "multimodal",
    }
}


def _code_files():
    """The remote code a Hub folder needs: the modules auto_map and the pipeline name, and every flat module they
    import, found the way transformers' loader finds them."""
    classes = [*AUTO_MAP.values(), *(pipeline["impl"] for pipeline in CUSTOM_PIPELINES.values())]
    entry = {f"{path.split('.')[0]}.py" for path in classes}
    imported = {Path(f).name for name in entry for f in get_relative_import_files(PACKAGE_DIR / name)}
    return sorted(entry | imported)


CODE_FILES = _code_files()


def _patch_json(path, update):
    data = json.loads(path.read_text())
    update(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _version_neutral_config(config):
    config["auto_map"] = AUTO_MAP
    config["custom_pipelines"] = CUSTOM_PIPELINES
    config["architectures"] = ["HoneybeeForConditionalGeneration"]
    if "dtype" in config:  # transformers 5 writes `dtype`, 4.x reads `torch_dtype`
        config["torch_dtype"] = config["dtype"]
    text = config["text_config"]
    rope = text.get("rope_parameters") or {}
    if "rope_theta" not in text and "rope_theta" in rope:  # 5.x moved it; 4.x would fall back to 1e4
        text["rope_theta"] = rope["rope_theta"]


def generation_config_for(config, max_new_tokens=256):
    """Greedy decoding, as the official evaluation; `<image>` can never be generated."""
    text = config.text_config
    return GenerationConfig(
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
        pad_token_id=text.pad_token_id if text.pad_token_id is not None else 0,
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        suppress_tokens=[config.image_token_id],
    )


def _check_visual_tokens(config, processor):
    if processor.num_visual_tokens != config.num_visual_tokens:
        raise ValueError(
            f"the processor writes {processor.num_visual_tokens} placeholders per image but the model expects "
            f"{config.num_visual_tokens}"
        )


def write_support_files(config, processor, folder, model_card=None):
    """Everything of a Hub folder but the weights, into `folder`, which already holds `config.json`: patches it
    (auto_map, custom pipeline, keys both versions read), then writes generation_config.json (greedy), the processor
    and tokenizer files (`HoneybeeProcessor.save_pretrained`, version-neutral), the remote-code files and, if given,
    the model card `README.md`."""
    folder = Path(folder)
    _check_visual_tokens(config, processor)
    _patch_json(folder / "config.json", _version_neutral_config)
    generation_config_for(config).save_pretrained(folder)
    # Written out even where they are the defaults (transformers 4 drops those): greedy, as the official evaluation.
    _patch_json(folder / "generation_config.json", lambda c: c.update(do_sample=False, num_beams=1))
    processor.save_pretrained(folder)
    if processor.image_token_id != config.image_token_id:
        raise ValueError(
            f"the tokenizer puts <image> at id {processor.image_token_id} but the model's image_token_id is "
            f"{config.image_token_id}"
        )
    for name in CODE_FILES:
        shutil.copyfile(PACKAGE_DIR / name, folder / name)
    if model_card is not None:
        (folder / "README.md").write_text(model_card)


def refuse_existing(out_dir, force):
    if Path(out_dir).exists() and not force:
        raise FileExistsError(f"{out_dir} exists; pass force=True (--force) to replace it")


@contextlib.contextmanager
def staging_folder(out_dir, force=False):
    """An empty folder next to `out_dir` to write into. When the block ends normally it replaces `out_dir`; when
    it raises (or is interrupted) it is deleted, and `out_dir`, new or existing, is never touched."""
    out_dir = Path(out_dir)
    refuse_existing(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        refuse_existing(out_dir, force)  # someone may have created it meanwhile
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_hub_folder(model, processor, out_dir, max_shard_size="5GB", model_card=None, force=False):
    """Write `model` and `processor` to `out_dir` as a Hub repo that loads with `trust_remote_code=True`."""
    out_dir = Path(out_dir)
    _check_visual_tokens(model.config, processor)  # before writing gigabytes of weights
    with staging_folder(out_dir, force) as staging:
        model.save_pretrained(staging, safe_serialization=True, max_shard_size=max_shard_size)
        write_support_files(model.config, processor, staging, model_card)
    return out_dir


def _replace_dir(new, target):
    """Move `new` to `target`; an existing `target` is removed only once `new` is in place."""
    if not target.exists():
        new.rename(target)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    target.rename(old)
    new.rename(target)
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()
