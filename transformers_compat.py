"""Every difference between transformers 4.57 and 5.x that the Honeybee files meet, one function each.

The rest of the code reads as if there were one version of transformers: where the two disagree it calls a function
here, whose docstring says which version needs what and why. Shipped to the Hub with the model files (a flat module,
imported relatively), so a Hub folder loads on both versions whichever one wrote it.
"""

import json
from pathlib import Path

import transformers
from tokenizers import Tokenizer

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


def attention_registry_resolves_names():
    """Whether `ALL_ATTENTION_FUNCTIONS.get_interface(name, default)` exists: 5.x's registry checks the name and can
    load a kernel from the Hub through it; 4.57's registry is a plain mapping, indexed by the name.

    The lookups themselves stay in modeling_honeybee.py: both versions allow `set_attn_implementation` only when they
    find those very calls in the model's own source file (`PreTrainedModel._can_set_attn_implementation`).
    """
    # imported here: transformers.modeling_utils imports the quantizer integrations (torchao, bitsandbytes), which
    # print at start; the converter's and publisher's --help import this module but need none of that
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface")


def tied_weights_keys(head, embeddings):
    """`_tied_weights_keys` for a head tied to the embeddings: 4.57 reads a list of the tied parameters, 5.x a
    {target: source} dict (as each version's LLaVA)."""
    return [head] if TRANSFORMERS_MAJOR < 5 else {head: embeddings}


def keep_in_fp32_modules(names, prefix):
    """A submodel's `_keep_in_fp32_modules` seen from its parent, whose attribute `prefix` holds it. 5.x matches the
    quantizers' skip list from the root of the module names, so it needs `prefix.name`; 4.57 matches a bare name
    anywhere in them (and accepts only bare names)."""
    return list(names) if TRANSFORMERS_MAJOR < 5 else [f"{prefix}.{name}" for name in names]


def lm_head_tp_plan():
    """`_tp_plan` for a causal-LM head, as each version's Llama: 5.x renamed "colwise_rep" (a column-sharded
    linear whose output is gathered) to "colwise_gather_output"."""
    return {"lm_head": "colwise_rep" if TRANSFORMERS_MAJOR < 5 else "colwise_gather_output"}


def image_features_output(output, return_dict, config):
    """What `get_image_features` returns, as each version's LLaVA: 5.x's returns the `BaseModelOutputWithPooling`,
    or its `to_tuple()` when `return_dict` is False (`config.return_dict` when not told: `can_return_tuple`); 4.57's
    returns the projected features (the `pooler_output` tensor), so only `return_dict=True` gets the object here."""
    if TRANSFORMERS_MAJOR < 5:
        return output if return_dict else output.pooler_output
    return output if (config.return_dict if return_dict is None else return_dict) else output.to_tuple()


# ---------------------------------------------------------------------------------------------------------------
# Processor, image processor and tokenizer


def processor_class_attributes():
    """Class attributes of a two-part processor: 4.57 finds the parts through `attributes` and the `*_class` names;
    5.x derives them from the `__init__` parameters and logs a deprecation warning for each of these."""
    if TRANSFORMERS_MAJOR >= 5:
        return {}
    return {
        "attributes": ["image_processor", "tokenizer"],
        "image_processor_class": "AutoImageProcessor",
        "tokenizer_class": "AutoTokenizer",
    }


def pil_clip_image_processor_class():
    """The PIL-backed CLIP image processor: 5.x names its torchvision-backed class `CLIPImageProcessor` whenever
    torchvision is installed (its bicubic resize differs slightly from PIL's, which the official pipeline, and so
    the model's training, used) and the PIL one `CLIPImageProcessorPil`; 4.57's `CLIPImageProcessor` is PIL's.
    Looked up by name: importing `CLIPImageProcessor` on 5.x without torchvision logs a fallback warning."""
    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def processor_level_text_options(options):
    """`return_mm_token_type_ids` and `return_text_replacement_offsets` as `_merge_kwargs` returns them: 5.x keeps
    them at the top level of the merged options, 4.57 (which does not know the second) in `text_kwargs`."""
    keys = ("return_mm_token_type_ids", "return_text_replacement_offsets")
    return {key: options[key] for key in keys if key in options}


def processor_files(processor, settings):
    """{file name: text} of an image-processor-and-tokenizer processor that 4.57 and 5.x both load, whichever runs
    this: 5.x's `ProcessorMixin.save_pretrained` writes `tokenizer_class: TokenizersBackend` and nests the image
    processor (as `CLIPImageProcessorPil`) in processor_config.json, and 4.57 loads neither. `settings`: the
    processor's own `__init__` values, for processor_config.json. Several chat templates are written as both
    versions' loaders read them: the default one in chat_template.jinja, the others in additional_chat_templates/."""
    templates = processor.chat_template
    templates = templates if isinstance(templates, dict) else {} if templates is None else {"default": templates}
    for key in templates:  # each name becomes a file name: it must not lead out of the folder (as the library)
        if not key or key in (".", "..") or Path(key).name != key or "\\" in key:
            raise ValueError(f"invalid chat template name {key!r}: use a plain file name (no path)")
    name = type(processor).__name__
    module = type(processor).__module__.rsplit(".", 1)[-1]
    processor_config = {"processor_class": name, "auto_map": {"AutoProcessor": f"{module}.{name}"}, **settings}
    return {
        "processor_config.json": _json(processor_config),
        "preprocessor_config.json": image_processor_file(processor.image_processor, name),
        **{
            "chat_template.jinja" if key == "default" else f"additional_chat_templates/{key}.jinja": template
            for key, template in templates.items()
        },
        **tokenizer_files(processor.tokenizer, processor_class=name),
    }


def tokenizer_files(tokenizer, processor_class=None):
    """{file name: text} of tokenizer.json, tokenizer_config.json and special_tokens_map.json that 4.57 and 5.x both
    load as written, whichever runs this: 5.x's own `save_pretrained` writes `tokenizer_class: TokenizersBackend`
    and `extra_special_tokens` as a list, neither of which 4.57 can load.

    `tokenizer_class` is `PreTrainedTokenizerFast`, which both versions build from tokenizer.json unchanged (5.x
    rebuilds a Llama class with its own Metaspace front end, whatever tokenizer.json says)."""
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_padding()  # call-time settings a fast tokenizer may have left on its backend
    backend.no_truncation()
    named = {name: getattr(tokenizer, name) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
    named = {name: token for name, token in named.items() if token is not None}
    added = tokenizer.added_tokens_decoder
    extra = [t.content for t in added.values() if t.special and t.content not in named.values()]
    flags = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "additional_special_tokens": extra,
        "added_tokens_decoder": {str(i): {k: getattr(t, k) for k in flags} for i, t in sorted(added.items())},
        "padding_side": tokenizer.padding_side,
        "truncation_side": tokenizer.truncation_side,
        "model_max_length": tokenizer.model_max_length,
        "model_input_names": ["input_ids", "attention_mask"],  # 4.57's PreTrainedTokenizerFast adds token_type_ids
        "clean_up_tokenization_spaces": False,
        # call-time text options the library's processors apply as defaults
        **{k: tokenizer.init_kwargs[k] for k in SAVED_TEXT_DEFAULTS if tokenizer.init_kwargs.get(k) is not None},
    }
    if processor_class is not None:
        config["processor_class"] = processor_class
    return {
        "tokenizer.json": backend.to_str(pretty=True),
        "tokenizer_config.json": _json(config),
        "special_tokens_map.json": _json({**named, "additional_special_tokens": extra}),
    }


SAVED_TEXT_DEFAULTS = ("padding", "max_length", "truncation", "pad_to_multiple_of")


def image_processor_file(image_processor, processor_class):
    """preprocessor_config.json as both versions read it: 5.x's `save_pretrained` nests it in processor_config.json
    and names the PIL class `CLIPImageProcessorPil`, which 4.57 does not have."""
    keys = ("do_resize", "do_center_crop", "do_rescale", "rescale_factor", "do_normalize", "do_convert_rgb")
    config = {
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": processor_class,
        **{key: getattr(image_processor, key) for key in keys},
        "resample": int(image_processor.resample),
        "image_mean": [float(x) for x in image_processor.image_mean],
        "image_std": [float(x) for x in image_processor.image_std],
    }
    for key in ("size", "crop_size"):
        value = getattr(image_processor, key, None)
        if value is not None:
            config[key] = {k: v for k, v in dict(value).items() if v is not None}
    return _json(config)


def _json(data):
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
