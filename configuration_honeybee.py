"""Honeybee configuration (arXiv 2312.06742; official code: github.com/kakaobrain/honeybee).

A composite config, as transformers' LLaVA: a CLIP `vision_config`, a Llama `text_config`, and a
`projector_config` for the locality-enhanced projector (C-Abstractor or D-Abstractor). The defaults are the
released Honeybee-C-7B-M144: CLIP ViT-L/14 at 224 px (16x16 patches), C-Abstractor with 144 queries, Vicuna-7B.
Nothing here touches the network.
"""

import math

from transformers import AutoConfig, AutoModelForImageTextToText, CLIPVisionConfig, LlamaConfig, PretrainedConfig
from transformers.activations import ACT2FN
from transformers.utils import logging

logger = logging.get_logger(__name__)

PROJECTOR_TYPES = ("c-abs", "d-abs")
POOLED_V_TARGETS = ("query", "tgt", "none")

# Keys every PretrainedConfig serialises; anything else given to the projector config is unknown to us.
_GENERIC_CONFIG_KEYS = set(PretrainedConfig().to_dict()) | {"transformers_version", "dtype", "torch_dtype"}


def _require(condition, message):
    if not condition:
        raise ValueError(message)


class HoneybeeProjectorConfig(PretrainedConfig):
    r"""The locality-enhanced projector between CLIP and the LLM (paper §3).

    Shared fields:
        projector_type (`str`, "c-abs"): "c-abs" (convolutional, §3.2) or "d-abs" (deformable attention, §3.2).
        num_query_tokens (`int`, 144): M, the visual tokens per image; a perfect square (the output is a √M×√M map).
        num_eos_tokens (`int`, 0): learned tokens appended after the M queries (released models: 0).
        pos_emb (`bool`, True): learned positional embedding added to the visual features.
        feature_layer_index (`int`, -1): which CLIP hidden state feeds the projector (-1: the last layer's output,
            without post_layernorm; 0: the embeddings after pre_layrnorm).
        initializer_range (`float`, 0.02): std of the random init of new weights.

    C-Abstractor fields (RegNet stages, timm names):
        hidden_size (`int`, 1024): Ch, channels of the RegNet stages.
        depth (`int`, 3): bottleneck blocks per stage; 0 keeps only the adaptive pooling.
        mlp_depth (`int`, 2): Linear layers of the readout MLP (SiLU between them).
        prenorm (`bool`, False): LayerNorm (eps 1e-6) on the CLIP features before everything else.

    D-Abstractor fields (Deformable-DETR decoder names, so official configs map one to one):
        d_model (`int`, 1024), decoder_layers (`int`, 6), decoder_attention_heads (`int`, 8),
        decoder_n_points (`int`, 4), decoder_ffn_dim (`int`, 1024), activation_function (`str`, "relu"),
        dropout (`float`, 0.1), attention_dropout (`float`, 0.0), activation_dropout (`float`, 0.0).
        num_feature_levels (`int`, 1): only 1; the official code cannot build pooled queries from several levels.
        pooled_v_target (`str`, "query"): which decoder input is the adaptive-pooled visual map: "query" (the
            query position embedding; released models), "tgt" (the decoder target) or "none" (both learned).
    """

    model_type = "honeybee_projector"
    # Runtime state, never saved (like the attention implementation): which implementation the projector's fused
    # ops take, "auto", "triton" or "torch". Set it with `model.set_kernel_backend(...)` or
    # `from_pretrained(..., kernel_backend=...)`; the modules read it on every call.
    kernel_backend = "auto"

    def __init__(
        self,
        projector_type="c-abs",
        num_query_tokens=144,
        num_eos_tokens=0,
        pos_emb=True,
        feature_layer_index=-1,
        initializer_range=0.02,
        hidden_size=1024,
        depth=3,
        mlp_depth=2,
        prenorm=False,
        d_model=1024,
        decoder_layers=6,
        decoder_attention_heads=8,
        decoder_n_points=4,
        decoder_ffn_dim=1024,
        activation_function="relu",
        dropout=0.1,
        attention_dropout=0.0,
        activation_dropout=0.0,
        num_feature_levels=1,
        pooled_v_target="query",
        **kwargs,
    ):
        unknown = sorted(set(kwargs) - _GENERIC_CONFIG_KEYS - {"model_type"})
        if unknown:
            logger.warning(f"HoneybeeProjectorConfig ignores unknown keys {unknown}")
        self.projector_type = projector_type
        self.num_query_tokens = num_query_tokens
        self.num_eos_tokens = num_eos_tokens
        self.pos_emb = pos_emb
        self.feature_layer_index = feature_layer_index
        self.initializer_range = initializer_range
        self.hidden_size = hidden_size
        self.depth = depth
        self.mlp_depth = mlp_depth
        self.prenorm = prenorm
        self.d_model = d_model
        self.decoder_layers = decoder_layers
        self.decoder_attention_heads = decoder_attention_heads
        self.decoder_n_points = decoder_n_points
        self.decoder_ffn_dim = decoder_ffn_dim
        self.activation_function = activation_function
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.activation_dropout = activation_dropout
        self.num_feature_levels = num_feature_levels
        self.pooled_v_target = pooled_v_target
        super().__init__(**kwargs)
        self.validate()

    def to_dict(self):
        output = super().to_dict()
        output.pop("kernel_backend", None)  # runtime state (see above)
        return output

    def validate(self):
        _require(
            self.projector_type in PROJECTOR_TYPES,
            f"projector_type must be one of {PROJECTOR_TYPES}, got {self.projector_type!r}",
        )
        M = self.num_query_tokens
        _require(
            isinstance(M, int) and M > 0 and math.isqrt(M) ** 2 == M,
            f"num_query_tokens must be a positive perfect square (the projector outputs a √M×√M map), got {M!r}",
        )
        _require(
            isinstance(self.num_eos_tokens, int) and self.num_eos_tokens >= 0,
            f"num_eos_tokens must be an int >= 0, got {self.num_eos_tokens!r}",
        )
        _require(
            isinstance(self.feature_layer_index, int),
            f"feature_layer_index must be one int (multi-layer features are not supported), got "
            f"{self.feature_layer_index!r}",
        )
        if self.projector_type == "c-abs":
            _require(self.hidden_size > 0, f"hidden_size must be > 0, got {self.hidden_size}")
            _require(self.depth >= 0, f"depth must be >= 0, got {self.depth}")
            _require(self.mlp_depth >= 1, f"mlp_depth must be >= 1, got {self.mlp_depth}")
        else:
            _require(
                self.d_model % self.decoder_attention_heads == 0,
                f"d_model ({self.d_model}) must be divisible by decoder_attention_heads "
                f"({self.decoder_attention_heads})",
            )
            _require(self.decoder_layers >= 1, f"decoder_layers must be >= 1, got {self.decoder_layers}")
            _require(self.decoder_n_points >= 1, f"decoder_n_points must be >= 1, got {self.decoder_n_points}")
            _require(
                self.num_feature_levels == 1,
                f"num_feature_levels must be 1 (the official D-Abstractor builds its pooled queries from one "
                f"level only), got {self.num_feature_levels}",
            )
            _require(
                self.pooled_v_target in POOLED_V_TARGETS,
                f"pooled_v_target must be one of {POOLED_V_TARGETS}, got {self.pooled_v_target!r}",
            )
            _require(
                self.activation_function in ACT2FN,
                f"activation_function {self.activation_function!r} is not a transformers activation",
            )


class HoneybeeConfig(PretrainedConfig):
    r"""Configuration of a Honeybee model: CLIP vision tower -> projector -> Llama.

    Args:
        vision_config (`dict` or `CLIPVisionConfig`): the CLIP vision tower (default: ViT-L/14, 224 px).
        projector_config (`dict` or `HoneybeeProjectorConfig`): the C- or D-Abstractor (default: C-Abs, M=144).
        text_config (`dict` or `PretrainedConfig`): the language model (default: Vicuna-7B-v1.5 shapes, with the
            vocabulary grown by one for `<image>`).
        image_token_id (`int`, 32000): the id of the `<image>` placeholder; the processor writes
            `num_visual_tokens` of them per image and the model overwrites them with the projector outputs.

    Example:
        >>> config = HoneybeeConfig(projector_config={"projector_type": "d-abs"})
        >>> config.num_visual_tokens
        144
    """

    model_type = "honeybee"
    sub_configs = {
        "vision_config": CLIPVisionConfig,
        "projector_config": HoneybeeProjectorConfig,
        "text_config": AutoConfig,
    }

    def __init__(
        self,
        vision_config=None,
        projector_config=None,
        text_config=None,
        image_token_id=32000,
        initializer_range=0.02,
        **kwargs,
    ):
        if vision_config is None:
            vision_config = _clip_vit_large_patch14_224()
        if isinstance(vision_config, dict):
            vision_config = CLIPVisionConfig(**{k: v for k, v in vision_config.items() if k != "model_type"})
        if projector_config is None:
            projector_config = {}
        if isinstance(projector_config, dict):
            projector_config = HoneybeeProjectorConfig(**projector_config)
        if text_config is None:
            text_config = _vicuna_7b()
        if isinstance(text_config, dict):
            text_config = dict(text_config)
            model_type = text_config.pop("model_type", "llama")
            text_config = AutoConfig.for_model(model_type, **text_config)
        self.vision_config = vision_config
        self.projector_config = projector_config
        self.text_config = text_config
        self.image_token_id = image_token_id
        self.initializer_range = initializer_range
        # Vicuna's lm_head is its own matrix; the generic default (True) would tie it to the embeddings.
        kwargs.setdefault("tie_word_embeddings", getattr(text_config, "tie_word_embeddings", False))
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):  # what Trainer and generate look up here
            kwargs.setdefault(name, getattr(text_config, name, None))
        super().__init__(**kwargs)
        self.validate()

    @property
    def num_visual_tokens(self):
        """Placeholders per image: the M queries plus the eos tokens."""
        return self.projector_config.num_query_tokens + self.projector_config.num_eos_tokens

    @property
    def vision_grid(self):
        """Side of CLIP's square patch grid: 16 for ViT-L/14 at 224 px, 24 at 336 px."""
        return self.vision_config.image_size // self.vision_config.patch_size

    def validate(self):
        vc = self.vision_config
        _require(
            vc.image_size % vc.patch_size == 0,
            f"vision_config.image_size ({vc.image_size}) must be a multiple of patch_size ({vc.patch_size})",
        )
        layers = vc.num_hidden_layers
        index = self.projector_config.feature_layer_index
        _require(
            -(layers + 1) <= index <= layers,
            f"feature_layer_index {index} is out of range for a {layers}-layer vision tower",
        )
        vocab = self.text_config.vocab_size
        _require(
            0 <= self.image_token_id < vocab,
            f"image_token_id ({self.image_token_id}) must be a row of the language model's embeddings "
            f"(vocab_size {vocab}); grow the vocabulary when adding <image> to the tokenizer",
        )


def _clip_vit_large_patch14_224():
    return CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    )


def _vicuna_7b():
    return LlamaConfig(
        vocab_size=32001,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


# lmms-eval's generic `huggingface` backend (0.7.3, models/chat/huggingface.py) picks the Auto class before it loads
# the model, by `config.model_type in AutoModelForImageTextToText._model_mapping.keys()`; otherwise it takes AutoModel,
# which is Honeybee's backbone and cannot generate. It reads no `auto_map`, and the public
# `AutoModelForImageTextToText.register(config_class, model_class)` keys the mapping by the config class, which that
# string test never matches: only a model-type key does, so the mapping's own `register` gets one, at import (only this
# file is imported by then). Loading never reads the entry (the class comes from `auto_map`); pipelines only list the
# `__name__` of its value, which must be a class: the model class cannot be imported from here (modeling_honeybee.py
# imports this file), so the config class stands in.
AutoModelForImageTextToText._model_mapping.register(HoneybeeConfig.model_type, HoneybeeConfig, exist_ok=True)

__all__ = ["HoneybeeConfig", "HoneybeeProjectorConfig"]
