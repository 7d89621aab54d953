"""A model saved by this package (`model_type: "honeybee"`, e.g. after fine-tuning) -> a Hub-ready folder: what
`honeybee-convert` does with such a folder."""

import json
from pathlib import Path

from ..convert import ConversionError
from ..convert.conversion import DTYPES
from .folder import refuse_existing, save_hub_folder
from .model_card import render_model_card


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
