"""The one mapping from official Honeybee checkpoints (github.com/kakaobrain/honeybee) to this package's keys.

An official `pytorch_model.bin` holds `vision_model.vision_model.*` (CLIP), `abstractor.*` (C- or D-Abstractor)
and `language_model.*` (Llama with its head); ours follow transformers' LLaVA: `model.vision_tower.*`,
`model.abstractor.*`, `model.language_model.*` (the Llama backbone) and `lm_head.*`. Every key is renamed by one
explicit rule and its shape checked against our model's state dict; anything left over, missing or the wrong shape
raises a `ValueError` that names the key.
Nothing here loads files or touches a model: `plan_official_state_dict` says, from shapes alone (meta tensors do,
which is how the converter checks a whole checkpoint and lays out its output before any weight arrives), what each
official key becomes (our key, and an edit: kept, the legacy CLS slot dropped, or `<image>`'s row appended);
`map_official_state_dict` applies that plan to a dict of tensors; `official_config_to_kwargs` maps an official
`config.json` to `HoneybeeConfig` arguments.

    >>> ours = map_official_state_dict(official, model.state_dict())
    >>> model.load_state_dict(ours, strict=True)
"""

import math
import re

import torch
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from ..transformers_compat import pil_clip_image_processor_class

# Buffers that transformers <= 4.30 saved and newer versions recompute: CLIP's `embeddings.position_ids` and
# Llama's `rotary_emb.inv_freq`. They hold no learned values.
STALE_BUFFER_SUFFIXES = (".position_ids", ".rotary_emb.inv_freq")


def official_image_processor(image_size=224, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD):
    """The official preprocessing as a CLIP image processor, whose saved config both versions load: the squash
    resize (PIL bicubic, as torchvision's Resize in the official pipeline, to image_size×image_size, no crop), /255,
    CLIP mean/std."""
    return pil_clip_image_processor_class()(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=3,
        do_center_crop=False,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(image_mean),
        image_std=list(image_std),
        do_convert_rgb=True,
    )


def is_stale_buffer(key):
    return key.endswith(STALE_BUFFER_SUFFIXES)


def _check_shape(official_key, tensor, our_key, target):
    if tuple(tensor.shape) != tuple(target.shape):
        raise ValueError(
            f"official key {official_key!r} has shape {tuple(tensor.shape)} but our {our_key!r} is "
            f"{tuple(target.shape)}; the checkpoint was built with another config than the model"
        )


def _check_complete(mapped, target_state_dict, prefix, official_name=lambda key: key):
    """Raise on any key of `target_state_dict` that `mapped` lacks, named as the official checkpoint names it."""
    missing = sorted(official_name(k) for k in set(target_state_dict) - set(mapped))
    if missing:
        raise ValueError(f"the official checkpoint lacks {[prefix + k for k in missing]}, which our model needs")


# C-Abstractor bottlenecks: timm's `conv{1,2,3}.{conv,bn}` children -> modules that own every weight their fused op
# reads (modeling_honeybee.py says why). Keys relative to a bottleneck `net.<stage>.b<block>.`.
_BOTTLENECK_RENAMES = {
    "conv1.conv.weight": "conv1.weight",
    "conv1.bn.weight": "conv2.in_norm_weight",
    "conv1.bn.bias": "conv2.in_norm_bias",
    "conv2.conv.weight": "conv2.weight",
    "conv2.bn.weight": "conv2.norm_weight",
    "conv2.bn.bias": "conv2.norm_bias",
    "conv3.conv.weight": "conv3.weight",
    "conv3.bn.weight": "conv3.norm_weight",
    "conv3.bn.bias": "conv3.norm_bias",
}
_BOTTLENECK_KEY = re.compile(r"^(net\.\d+\.b\d+\.)(.+)$")


def _rename_bottleneck_key(key, renames):
    match = _BOTTLENECK_KEY.match(key)
    if match is None or match.group(2) not in renames:
        return key
    return match.group(1) + renames[match.group(2)]


def abstractor_key(official):
    """An official abstractor key (without `abstractor.`) -> ours."""
    return _rename_bottleneck_key(official, _BOTTLENECK_RENAMES)


def official_abstractor_key(ours):
    """Our abstractor key (without `abstractor.`) -> the official one."""
    return _rename_bottleneck_key(ours, {v: k for k, v in _BOTTLENECK_RENAMES.items()})


# How an official tensor becomes ours besides its new name: kept, or edited in one of three ways.
KEEP = "keep"
DROP_CLS_SLOT = "drop the legacy CLS slot"  # Dec-2023 pos_emb / v_pos_emb: (1, N + 1, C) -> (1, N, C)
APPEND_MEAN_ROW = "append the mean row"  # embed_tokens: (V, D) -> (V + 1, D), `<image>`'s row
APPEND_ZERO_ROW = "append a zero row"  # lm_head: (V, D) -> (V + 1, D), `<image>`'s row
_MEAN_BLOCK_ROWS = 4096  # rows of the embedding averaged at a time in fp32


def image_token_row(edit, tensor):
    """The row (1, D) that `<image>` adds to the official (V, D) `tensor`.

    - APPEND_MEAN_ROW (embed_tokens): the mean of the V rows. The model overwrites every `<image>` embedding with a
      projector output before the LM sees it, so the row never changes an output; the mean (as
      `resize_token_embeddings(..., mean_resizing=True)`) keeps it among the other embeddings for anything that
      reads it anyway (a fine-tune that trains the embeddings, a probe of the embedding matrix).
    - APPEND_ZERO_ROW (lm_head): zeros. The `<image>` logit is then exactly 0 whatever the hidden state, so the row
      carries no signal and the V official logits are untouched (bit-identical); `generation_config.json` also
      suppresses the id, so greedy and sampled generation never produce it.
    """
    if edit == APPEND_MEAN_ROW:
        # summed in fp32 a block of rows at a time: a whole fp32 copy of a 13B embedding would be 0.65 GB
        total = sum(block.to(torch.float32).sum(dim=0, keepdim=True) for block in tensor.split(_MEAN_BLOCK_ROWS))
        return (total / tensor.shape[0]).to(tensor.dtype)
    return torch.zeros_like(tensor[:1])


def edited_parts(edit, tensor):
    """The official `tensor` after `edit`, as parts to concatenate along dim 0: a writer can put them one after the
    other, so growing a vocabulary matrix by one row never copies the matrix."""
    if edit == DROP_CLS_SLOT:
        return [tensor[:, 1:]]  # slot 0 was the legacy CLS position
    if edit in (APPEND_MEAN_ROW, APPEND_ZERO_ROW):
        return [tensor, image_token_row(edit, tensor)]
    return [tensor]


def edit_tensor(edit, tensor):
    """The official `tensor` after `edit`, as one tensor."""
    parts = edited_parts(edit, tensor)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


# One rule per official module: an official key (without the module's prefix) and its tensor -> (our key, edit), or
# None for a tensor our model does not have; `target` is our model's state dict keyed the same way. A key with no
# counterpart raises. Only shapes are read, so meta tensors do.


def _abstractor_rule(key, tensor, target, prefix):
    """The submodule names of HoneybeeCAbstractor / HoneybeeDAbstractor are the official ones, except in the
    C-Abstractor's bottlenecks (`abstractor_key`). Dec-2023 checkpoints built `pos_emb` (D-Abs: `v_pos_emb`) with N+1
    slots for the CLS-inclusive features and dropped token 0 afterwards; slot 0 is dropped here, as the official
    `Projector._load_from_state_dict` does."""
    ours = abstractor_key(key)
    if ours not in target:
        raise ValueError(f"official key {prefix + key!r} has no counterpart in our abstractor")
    shape = target[ours].shape
    legacy = (
        key in ("pos_emb", "v_pos_emb")
        and tensor.dim() == 3
        and tensor.shape[1] == shape[1] + 1
        and (tensor.shape[0], tensor.shape[2]) == (shape[0], shape[2])
    )
    return ours, DROP_CLS_SLOT if legacy else KEEP


# CLIP's `post_layernorm` normalises the pooled CLS token, which Honeybee never reads: our tower has no such
# weights (a trainable parameter without a gradient breaks DDP and gradient-checkpointing checks).
UNUSED_VISION_PREFIX = "vision_model.post_layernorm."


def _vision_rule(key, tensor, target, prefix):
    """CLIP: our vision tower keeps transformers 4.x `CLIPVisionModel`'s names, so every key maps to itself; the
    unused `post_layernorm` is dropped."""
    if key.startswith(UNUSED_VISION_PREFIX):
        return None
    if key not in target:
        raise ValueError(f"official key {prefix + key!r} has no counterpart in our vision tower")
    return key, KEEP


# The two matrices indexed by token id, and how each grows: ours have one more row, for `<image>` (image_token_id =
# the official vocabulary size, so every official id keeps its meaning).
_VOCAB_MATRICES = {"model.embed_tokens.weight": APPEND_MEAN_ROW, "lm_head.weight": APPEND_ZERO_ROW}


def _language_model_rule(key, tensor, target, prefix):
    """Llama: keys map to themselves; the embedding and lm_head grow by one row for `<image>` (`image_token_row`),
    exactly when our model's matrix has one row more than the checkpoint's."""
    if key not in target:
        raise ValueError(f"official key {prefix + key!r} has no counterpart in our language model")
    shape = target[key].shape
    grown = (
        key in _VOCAB_MATRICES and tensor.dim() == 2 and tensor.shape[0] + 1 == shape[0] and tensor.shape[1] == shape[1]
    )
    return key, _VOCAB_MATRICES[key] if grown else KEEP


def _plan(rule, state_dict, target_state_dict, prefix, complete, official_name=lambda key: key):
    """{official key: (our key, edit)} of `state_dict` by `rule`, each edited shape checked against ours; with
    `complete`, our keys the checkpoint lacks raise (named by `official_name`)."""
    plan = {}
    for key, tensor in state_dict.items():
        mapped = rule(key, tensor, target_state_dict, prefix)
        if mapped is None:
            continue
        ours, edit = mapped
        _check_shape(prefix + key, edit_tensor(edit, tensor.to("meta")), ours, target_state_dict[ours])
        plan[key] = mapped
    if complete:
        _check_complete({ours for ours, _ in plan.values()}, target_state_dict, prefix, official_name)
    return plan


def _apply(plan, state_dict):
    return {ours: edit_tensor(edit, state_dict[key]) for key, (ours, edit) in plan.items()}


def map_official_abstractor(state_dict, target_state_dict, prefix="", complete=True):
    """Official abstractor weights -> ours (`_abstractor_rule`); keys are given without the `abstractor.` prefix.
    `prefix` only makes error messages name full checkpoint keys; `complete=False` maps a part of the checkpoint
    (one shard) without asking for the rest."""
    plan = _plan(_abstractor_rule, state_dict, target_state_dict, prefix, complete, official_abstractor_key)
    return _apply(plan, state_dict)


def map_official_vision_model(state_dict, target_state_dict, prefix="", complete=True):
    """Official CLIP weights -> ours (`_vision_rule`), as `map_official_abstractor`."""
    return _apply(_plan(_vision_rule, state_dict, target_state_dict, prefix, complete), state_dict)


def map_official_language_model(state_dict, target_state_dict, prefix="", complete=True):
    """Official Llama weights -> ours (`_language_model_rule`), as `map_official_abstractor`."""
    return _apply(_plan(_language_model_rule, state_dict, target_state_dict, prefix, complete), state_dict)


# One rule per top-level official module: official prefix -> (rule on the un-prefixed keys, how the checkpoint names
# our un-prefixed keys, where those keys live in ours: {official sub-prefix: our prefix}). The official
# `language_model` is a whole `LlamaForCausalLM`; ours splits it, as LLaVA, into the backbone `model.language_model`
# and the head `lm_head`.
RULES = {
    "vision_model.": (_vision_rule, lambda key: key, {"": "model.vision_tower."}),
    "abstractor.": (_abstractor_rule, official_abstractor_key, {"": "model.abstractor."}),
    "language_model.": (
        _language_model_rule,
        lambda key: key,
        {"model.": "model.language_model.", "lm_head.": "lm_head."},
    ),
}


def _ours_to_official(key, placement):
    """Our key -> the key relative to the official module of `placement`, or None when it lies elsewhere."""
    for official_sub, ours in placement.items():
        if key.startswith(ours):
            return official_sub + key[len(ours) :]
    return None


def _official_to_ours(key, placement):
    official_sub = max((sub for sub in placement if key.startswith(sub)), key=len)
    return placement[official_sub] + key[len(official_sub) :]


def official_key(key):
    """Our key -> the official checkpoint's name for it (the inverse of the renames)."""
    for official_prefix, (_, official_name, placement) in RULES.items():
        relative = _ours_to_official(key, placement)
        if relative is not None:
            return official_prefix + official_name(relative)
    raise ValueError(f"{key!r} is under none of our module prefixes")


def plan_official_state_dict(state_dict, model_state_dict, complete=True):
    """{official key: (our key, edit)} for a full (or partial, by prefix) official state dict, checked against
    `model_state_dict`; only shapes are read, so the converter plans a whole file from meta tensors before any weight
    arrives. Each official key must fall under a prefix of `RULES`; each rule sees its keys without the prefix and
    the matching slice of `model_state_dict`, keyed the same way. Stale buffers (`is_stale_buffer`) and tensors our
    model does not have are left out. With `complete` (the default) our keys that the checkpoint lacks raise;
    `complete=False` plans one shard. Ordered by module (`RULES`), then as `state_dict`."""
    groups = {}
    for key, tensor in state_dict.items():
        if is_stale_buffer(key):
            continue
        official_prefix = next((p for p in RULES if key.startswith(p)), None)
        if official_prefix is None:
            raise ValueError(f"official key {key!r} is under no known module prefix {sorted(RULES)}")
        groups.setdefault(official_prefix, {})[key[len(official_prefix) :]] = tensor
    plan = {}
    for official_prefix, (rule, official_name, placement) in RULES.items():
        if not complete and official_prefix not in groups:
            continue
        target = {}
        for key, value in model_state_dict.items():
            relative = _ours_to_official(key, placement)
            if relative is not None:
                target[relative] = value
        group = groups.get(official_prefix, {})
        for key, (ours, edit) in _plan(rule, group, target, official_prefix, complete, official_name).items():
            plan[official_prefix + key] = (_official_to_ours(ours, placement), edit)
    if complete:
        _check_complete({ours for ours, _ in plan.values()}, model_state_dict, "")
    return plan


def map_official_state_dict(state_dict, model_state_dict, complete=True):
    """A full (or partial) official state dict -> ours, checked against `model_state_dict`
    (`plan_official_state_dict`, then each tensor renamed and edited)."""
    return _apply(plan_official_state_dict(state_dict, model_state_dict, complete), state_dict)


# ---------------------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------------------

# Keys every transformers <= 4.38 `PretrainedConfig` serialises (plus private bookkeeping keys, anything starting
# with "_"): generation defaults, labels, export flags. None of them describes Honeybee's architecture.
GENERIC_CONFIG_KEYS = frozenset(
    """add_cross_attention architectures bad_words_ids begin_suppress_tokens bos_token_id chunk_size_feed_forward
    cross_attention_hidden_size decoder_start_token_id diversity_penalty do_sample dtype early_stopping
    encoder_no_repeat_ngram_size eos_token_id exponential_decay_length_penalty finetuning_task forced_bos_token_id
    forced_eos_token_id id2label is_decoder is_encoder_decoder label2id length_penalty max_length min_length
    model_type no_repeat_ngram_size num_beam_groups num_beams num_return_sequences output_attentions
    output_hidden_states output_scores pad_token_id prefix problem_type pruned_heads remove_invalid_values
    repetition_penalty return_dict return_dict_in_generate sep_token_id suppress_tokens task_specific_params
    temperature tf_legacy_loss tie_encoder_decoder tie_word_embeddings tokenizer_class top_k top_p torch_dtype
    torchscript transformers_version typical_p use_bfloat16""".split()
)

# projector_config keys that HoneybeeProjectorConfig takes under the same name and meaning.
PROJECTOR_KEYS = {
    "common": ("projector_type", "num_eos_tokens", "pos_emb", "feature_layer_index", "initializer_range"),
    "c-abs": ("hidden_size", "depth", "mlp_depth", "prenorm"),
    "d-abs": (
        "d_model",
        "decoder_layers",
        "decoder_attention_heads",
        "decoder_n_points",
        "decoder_ffn_dim",
        "activation_function",
        "dropout",
        "attention_dropout",
        "activation_dropout",
        "num_feature_levels",
        "pooled_v_target",
    ),
}
# projector_config keys the official code writes but never reads for the released projectors, or derives again:
DEAD_PROJECTOR_KEYS = frozenset(
    # encoder/output_hidden_size are copies of the CLIP and LLM widths; use_cls/except_cls only said where the CLS
    # token was dropped (legacy pos_emb slots are handled on the weights); the reference points are always a
    # learned parameter (manual_init_refPoints, learnable_mRP); the MSDA kernel choice is ours.
    """encoder_hidden_size output_hidden_size use_cls except_cls manual_init_refPoints learnable_mRP
    disable_custom_kernels"""
    # Dec-2023 HoneybeeVisualProjectorConfig fields of the (unreleased) resampler
    """ num_hidden_layers num_attention_heads intermediate_size attention_probs_dropout_prob layer_norm_eps"""
    # DeformableDetrConfig fields of the parts of Deformable DETR the D-Abstractor does not build (encoder,
    # backbone, detection heads and losses)
    """ auxiliary_loss backbone backbone_config backbone_kwargs bbox_cost bbox_loss_coefficient class_cost
    dice_loss_coefficient dilation encoder_attention_heads encoder_ffn_dim encoder_layerdrop encoder_layers
    encoder_n_points eos_coefficient focal_alpha giou_cost giou_loss_coefficient init_std init_xavier_std
    mask_loss_coefficient max_position_embeddings num_channels position_embedding_type return_intermediate
    two_stage two_stage_num_proposals use_pretrained_backbone use_timm_backbone with_box_refine
    decoder_layerdrop""".split()
)
# DeformableDetrConfig defaults: the official code built the D-Abstractor's config as
# `DeformableDetrConfig(**yaml)`, so a key missing from config.json had this value.
DDETR_DEFAULTS = {
    "d_model": 256,
    "decoder_layers": 6,
    "decoder_attention_heads": 8,
    "decoder_n_points": 4,
    "decoder_ffn_dim": 1024,
    "activation_function": "relu",
    "dropout": 0.1,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "num_feature_levels": 4,
}
CLIP_KEYS = (
    "hidden_size",
    "intermediate_size",
    "projection_dim",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
    "attention_dropout",
    "initializer_range",
    "initializer_factor",
)
REQUIRED_CLIP_KEYS = (
    "hidden_size",
    "image_size",
    "patch_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
)
# vision_config keys of the official HoneybeeVisionConfig that are not CLIP's architecture (image_mean/std are
# returned separately, for the image processor); `dropout` is an old CLIPVisionConfig field no layer reads.
DEAD_VISION_KEYS = frozenset({"pretrained_vision_name_or_path", "dropout"})
LLAMA_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pretraining_tp",
    "rope_theta",
    "rope_scaling",
    "attention_bias",
    "attention_dropout",
    "mlp_bias",
    "head_dim",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
# lm_config only names where the official code downloaded the LLM, its delta weights and the tokenizer from.
DEAD_LM_KEYS = frozenset(
    {"pretrained_lm_name_or_path", "pretrained_tokenizer_name_or_path", "delta_model_name_or_path"}
)
# Top-level keys: HEAD writes the four sub-configs; Dec-2023 ("mllm") also wrote these copies of other values.
# (`pretrained_vision_name_or_path` sat at the top level in checkpoints older than Dec-2023's vision_config key.)
DEAD_TOP_KEYS = frozenset(
    {
        "lm_config",
        "hidden_size",
        "use_decoder_only_language_model",
        "initializer_factor",
        "num_visual_tokens",
        "pretrained_vision_name_or_path",
    }
)


def _is_generic(key):
    return key in GENERIC_CONFIG_KEYS or key.startswith("_")


def _refuse_unknown(section, config, known, allow):
    unknown = sorted(k for k in config if k not in known and not _is_generic(k) and f"{section}.{k}" not in allow)
    if unknown:
        raise ValueError(
            f"config.json: {section}.{unknown[0]} is not a key the official Honeybee code writes for a released "
            f"model (unknown keys in {section}: {unknown}); refusing to guess what it means"
        )


def official_config_format(official):
    """ "dec2023" (`model_type: "mllm"`, `visual_projector_config`, top-level `num_query_tokens`) or "head"."""
    if "visual_projector_config" in official and "projector_config" in official:
        raise ValueError("config.json has both visual_projector_config (Dec-2023) and projector_config (HEAD)")
    if official.get("model_type") == "mllm" or "visual_projector_config" in official:
        return "dec2023"
    if official.get("model_type") not in (None, ""):
        raise ValueError(
            f"config.json: model_type {official['model_type']!r} is not an official Honeybee checkpoint "
            "(the official configs have model_type 'mllm' or none)"
        )
    if "projector_config" not in official:
        raise ValueError(
            "config.json has neither projector_config nor visual_projector_config: not a Honeybee checkpoint"
        )
    return "head"


def projector_section(fmt):
    """Where the projector's config sits in a config.json of format `fmt` (`official_config_format`)."""
    return "visual_projector_config" if fmt == "dec2023" else "projector_config"


def official_config_to_kwargs(official, allow_unknown=()):
    """An official Honeybee `config.json` (dict) -> (`HoneybeeConfig` kwargs, image mean, image std).

    Both formats of the official code are read:
    - Dec-2023 (`4161ddf`, the released checkpoints): `model_type: "mllm"`, `visual_projector_config`,
      `num_query_tokens` at the top level, `lm_config`, `text_config`. A missing key takes that code's default:
      `num_eos_tokens=1`, `pos_emb=False`, `prenorm=False` (C-Abs); `DeformableDetrConfig`'s defaults (D-Abs).
    - HEAD (`68a8d84`): `projector_config` (which holds `num_query_tokens`), `lm_config`, `text_config`, no
      model_type. Missing: `num_eos_tokens=0` (HEAD's default), the rest as above.
    The number of queries is `num_query_tokens` (top level or projector) or `num_queries` (which the official
    projectors read); all that are present must agree. Keys the official code writes but no released model
    depends on (`DEAD_*`, `GENERIC_CONFIG_KEYS`) are dropped; values this package cannot represent (a list
    `feature_layer_index`, `num_feature_levels` > 1, another projector or LLM type, ...) and unknown keys raise a
    `ValueError` naming the key, unless the key ("section.key", e.g. "projector_config.foo") is in
    `allow_unknown`. `num_eos_tokens` must still be checked against the weights' `abstractor.eos_tokens`.
    """
    allow = set(allow_unknown)
    fmt = official_config_format(official)
    section = projector_section(fmt)
    _check_top_level(official, section, allow)
    projector = _projector_kwargs(official, fmt, section, allow)
    vision = _vision_kwargs(official["vision_config"], allow)
    text = _text_kwargs(official, allow)
    kwargs = {
        "vision_config": vision,
        "projector_config": projector,
        "text_config": text,
        "initializer_range": official.get("initializer_range", 0.02),
    }
    return kwargs, official["vision_config"].get("image_mean"), official["vision_config"].get("image_std")


def _check_top_level(official, section, allow):
    for name in ("vision_config", section, "text_config"):
        if not isinstance(official.get(name), dict):
            raise ValueError(f"config.json has no {name} (a dict)")
    top_known = {"vision_config", section, "text_config", "num_query_tokens", "initializer_range"} | DEAD_TOP_KEYS
    _refuse_unknown("config", official, top_known, allow)
    if official.get("use_decoder_only_language_model") is False:
        raise ValueError("config.json: use_decoder_only_language_model is false; only decoder-only LLMs are supported")


def _projector_kwargs(official, fmt, section, allow):
    """`HoneybeeProjectorConfig` kwargs from the projector's section, a missing key taking the official default."""
    pc = official[section]
    projector_type = pc.get("projector_type", "c-abs")
    if projector_type not in ("c-abs", "d-abs"):
        raise ValueError(
            f"config.json: {section}.projector_type {projector_type!r} is not supported (only the released "
            "'c-abs' and 'd-abs')"
        )
    own = PROJECTOR_KEYS["common"] + PROJECTOR_KEYS[projector_type]
    other = PROJECTOR_KEYS["d-abs" if projector_type == "c-abs" else "c-abs"]
    # The other projector's fields are written by the official configs too (e.g. DDETR's `dropout`); only ours count.
    known = set(own) | set(other) | {"num_query_tokens", "num_queries"} | DEAD_PROJECTOR_KEYS
    _refuse_unknown(section, pc, known, allow)
    defaults = {
        "num_eos_tokens": 1 if fmt == "dec2023" else 0,
        "pos_emb": False,
        "prenorm": False,
        "feature_layer_index": -1,
        "initializer_range": 0.02,
    }
    if projector_type == "d-abs":
        defaults.update(DDETR_DEFAULTS, pooled_v_target="query")
    missing = sorted(k for k in PROJECTOR_KEYS[projector_type] if k not in pc and k not in defaults)
    if missing:
        raise ValueError(f"config.json: {section} lacks {missing}, which a {projector_type} projector needs")
    projector = {k: pc.get(k, defaults.get(k)) for k in own}
    projector["num_query_tokens"] = _num_query_tokens(official, section)
    _check_projector_values(projector, section)
    return projector


def _num_query_tokens(official, section):
    """The number of queries: every place the official code wrote it must agree."""
    pc = official[section]
    counts = {f"{section}.{k}": pc[k] for k in ("num_query_tokens", "num_queries") if pc.get(k) is not None}
    if official.get("num_query_tokens") is not None:
        counts["config.num_query_tokens"] = official["num_query_tokens"]
    if not counts:
        raise ValueError(f"config.json: no num_query_tokens (top level or {section}) nor {section}.num_queries")
    if len(set(counts.values())) > 1:
        raise ValueError(f"config.json: the number of queries disagrees between {counts}")
    return next(iter(counts.values()))


def _check_projector_values(projector, section):
    """Refuse the official values this package cannot represent."""
    if not isinstance(projector["feature_layer_index"], int) or isinstance(projector["feature_layer_index"], bool):
        raise ValueError(
            f"config.json: {section}.feature_layer_index = {projector['feature_layer_index']!r}: only one CLIP "
            "layer (an int) is supported, not multi-layer features"
        )
    if projector["projector_type"] == "d-abs" and projector["num_feature_levels"] != 1:
        raise ValueError(
            f"config.json: {section}.num_feature_levels = {projector['num_feature_levels']}: only 1 feature level "
            "is supported (the released D-Abstractors use 1)"
        )
    M = projector["num_query_tokens"]
    if not isinstance(M, int) or M <= 0 or math.isqrt(M) ** 2 != M:
        raise ValueError(f"config.json: the number of queries {M!r} is not a positive perfect square")


def _vision_kwargs(vc, allow):
    """CLIPVisionConfig kwargs from `vision_config` (only OpenAI CLIP, as released)."""
    _refuse_unknown(
        "vision_config", vc, set(CLIP_KEYS) | DEAD_VISION_KEYS | {"encoder_type", "image_mean", "image_std"}, allow
    )
    if vc.get("encoder_type", "openai.clip") != "openai.clip":
        raise ValueError(
            f"config.json: vision_config.encoder_type {vc['encoder_type']!r} is not supported (only 'openai.clip')"
        )
    vision = {k: vc[k] for k in CLIP_KEYS if k in vc}
    for k in REQUIRED_CLIP_KEYS:
        if k not in vision:
            raise ValueError(f"config.json: vision_config lacks {k}")
    return vision


def _text_kwargs(official, allow):
    """LlamaConfig kwargs from `text_config` (an untied Llama, as Vicuna); `lm_config` only named where the official
    code downloaded the LLM from."""
    tc = official["text_config"]
    if tc.get("model_type") != "llama":
        raise ValueError(
            f"config.json: text_config.model_type {tc.get('model_type')!r} is not supported (only 'llama')"
        )
    _refuse_unknown("text_config", tc, set(LLAMA_KEYS), allow)
    if tc.get("tie_word_embeddings"):
        raise ValueError("config.json: text_config.tie_word_embeddings is true; the released (Vicuna) LLMs are untied")
    text = {k: tc[k] for k in LLAMA_KEYS if k in tc}
    text.update(model_type="llama", tie_word_embeddings=False)
    lm = official.get("lm_config") or {}
    if not isinstance(lm, dict):
        raise ValueError("config.json: lm_config is not a dict")
    _refuse_unknown("lm_config", lm, DEAD_LM_KEYS, allow)
    return text


def num_eos_tokens_origin(official):
    """Where `num_eos_tokens` came from, for error messages."""
    fmt = official_config_format(official)
    section = projector_section(fmt)
    if "num_eos_tokens" in official[section]:
        return f"{section}.num_eos_tokens"
    return f"the {'Dec-2023' if fmt == 'dec2023' else 'HEAD'} default (config.json has no {section}.num_eos_tokens)"


__all__ = [
    "abstractor_key",
    "edit_tensor",
    "edited_parts",
    "image_token_row",
    "is_stale_buffer",
    "map_official_abstractor",
    "map_official_language_model",
    "map_official_state_dict",
    "map_official_vision_model",
    "official_abstractor_key",
    "official_key",
    "num_eos_tokens_origin",
    "plan_official_state_dict",
    "official_config_to_kwargs",
]
