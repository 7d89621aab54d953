"""Honeybee: Locality-enhanced Projector for Multimodal LLM (Cha et al., CVPR 2024, arXiv 2312.06742).

CLIP ViT -> locality-preserving projector (C-Abstractor or D-Abstractor) -> Llama, with the official
checkpoints' weight names (github.com/kakaobrain/honeybee). What differs from the official code:
- The CLIP vision tower is written here (same math and keys as transformers' `CLIPVisionModel` in 4.x) because
  transformers 5 renamed that module's weights; our checkpoints read the same on every transformers version.
- The projectors compute token-major (B, N, C): a 1x1 conv is a `F.linear` on the same weight and a channel
  LayerNorm needs no permute. The numbers match the official NCHW modules (tests/models/test_projector_parity.py).
- `<image>` is a real token (`config.image_token_id`) expanded by the processor into `num_visual_tokens`
  placeholders, which the model overwrites in place (the official code used id -1).
- The D-Abstractor runs on any device and dtype; its weights stay fp32 when the model is loaded in half precision.

Shape letters: B batch, N = h*w visual tokens (h = w = image_size / patch_size), M queries (√M×√M),
Cv / Ch / D vision, projector and LM widths, L text length, nh heads, hd head dim, P sampling points.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, CLIPVisionConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPast,
    BaseModelOutputWithPooling,
    CausalLMOutputWithPast,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import can_return_tuple

from .configuration_honeybee import HoneybeeConfig, HoneybeeProjectorConfig
from .kernels_cabs_adaptive_pool import adaptive_avg_pool
from .kernels_cabs_dwconv_block import cabs_dwconv_block
from .kernels_cabs_ln_residual_silu import ln_residual_silu, ln_residual_silu_pool
from .kernels_common import check_kernel_backend
from .kernels_msda import msda
from .transformers_compat import (
    attention_registry_resolves_names,
    image_features_output,
    keep_in_fp32_modules,
    lm_head_tp_plan,
    tied_weights_keys,
)

# ---------------------------------------------------------------------------------------------------------
# CLIP vision tower (Radford et al. 2021), keys as transformers 4.x `CLIPVisionModel`
# ---------------------------------------------------------------------------------------------------------


class HoneybeeVisionEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        C, p = config.hidden_size, config.patch_size
        self.class_embedding = nn.Parameter(torch.randn(C))
        self.patch_embedding = nn.Conv2d(config.num_channels, C, kernel_size=p, stride=p, bias=False)
        self.position_embedding = nn.Embedding((config.image_size // p) ** 2 + 1, C)

    def forward(self, pixel_values):
        B = pixel_values.shape[0]
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, Cv, h, w)
        x = x.flatten(2).transpose(1, 2)  # (B, N, Cv), row-major
        cls = self.class_embedding.to(x.dtype).expand(B, 1, -1)
        positions = torch.arange(self.position_embedding.num_embeddings, device=x.device)
        # called, not read: an offloaded embedding only gets its weight while its own forward runs
        return torch.cat([cls, x], dim=1) + self.position_embedding(positions)  # (B, 1+N, Cv)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Softmax attention in plain PyTorch, with the signature of transformers' attention functions:
    (B, nh, T, hd) query/key/value -> ((B, T, nh, hd) output, (B, nh, T, T) weights)."""
    weights = (query @ key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.dropout(weights.softmax(-1, dtype=torch.float32).to(query.dtype), p=dropout, training=module.training)
    return (weights @ value).transpose(1, 2).contiguous(), weights


class HoneybeeAttention(nn.Module):
    """Base of our attention layers: the attention function is looked up on every call from the config, so
    `set_attn_implementation` switches it at runtime, as for transformers' own models."""

    is_causal = False

    def attention_interface(self, dtype):
        implementation = self.config._attn_implementation
        # sdpa for a module built outside a model (its config was never resolved), and for the fp32 D-Abstractor
        # inside a half-precision model that runs flash attention (fp16/bf16 only)
        if implementation is None or ("flash" in implementation and dtype == torch.float32):
            return ALL_ATTENTION_FUNCTIONS["sdpa"]
        if implementation == "eager":
            return eager_attention_forward
        # Both lookups written out in this file: transformers reads it to decide whether set_attn_implementation works.
        if attention_registry_resolves_names():
            return ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        return ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]


class HoneybeeVisionAttention(HoneybeeAttention):
    def __init__(self, config):
        super().__init__()
        self.config = config
        C = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = C // self.num_heads
        self.scale = self.head_dim**-0.5
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = (nn.Linear(C, C) for _ in range(4))

    def forward(self, x):  # (B, T, C) -> ((B, T, C), (B, nh, T, T) weights, or None from sdpa/flash)
        B, T, C = x.shape
        q, k, v = (
            proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )  # (B, nh, T, hd)
        out, weights = self.attention_interface(q.dtype)(
            self, q, k, v, None, dropout=0.0, scaling=self.scale, is_causal=False
        )
        return self.out_proj(out.reshape(B, T, C)), weights  # out: (B, T, nh, hd)


class HoneybeeVisionMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class HoneybeeVisionEncoderLayer(GradientCheckpointingLayer):
    def __init__(self, config):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = HoneybeeVisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = HoneybeeVisionMLP(config)

    def forward(self, x):  # (B, T, C) -> ((B, T, C), attention weights or None)
        attended, weights = self.self_attn(self.layer_norm1(x))
        x = x + attended
        return x + self.mlp(self.layer_norm2(x)), weights


class HoneybeeVisionEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(HoneybeeVisionEncoderLayer(config) for _ in range(config.num_hidden_layers))


class HoneybeeVisionTransformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embeddings = HoneybeeVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # sic: CLIP's key name
        self.encoder = HoneybeeVisionEncoder(config)
        # CLIP's `post_layernorm` only normalises the pooled CLS, which Honeybee never reads: the converter drops it.


def _init_standard_layer(module, std):
    """The library's usual init for the standard layers (normal(0, std) weights, zero biases, unit LayerNorms);
    whether `module` was one of them."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        module.weight.normal_(0.0, std)
        if module.bias is not None:
            module.bias.zero_()
    elif isinstance(module, nn.Embedding):
        module.weight.normal_(0.0, std)
    elif isinstance(module, nn.LayerNorm):
        module.weight.fill_(1.0)
        module.bias.zero_()
    else:
        return False
    return True


class HoneybeeVisionPreTrainedModel(PreTrainedModel):
    """The CLIP tower's own pretrained-model class, as transformers' CLIP has: attention dispatch reads these flags
    for the tower's config, and loading, offload and init treat the tower as a submodel (as LLaVA's tower)."""

    config_class = CLIPVisionConfig
    base_model_prefix = "vision_model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)  # transformers 5
    supports_gradient_checkpointing = True
    _no_split_modules = ["HoneybeeVisionEncoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True  # transformers 5
    _supports_flash_attn_2 = True  # transformers 4
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if not _init_standard_layer(module, std) and isinstance(module, HoneybeeVisionEmbeddings):
            module.class_embedding.normal_(0.0, std)


class HoneybeeVisionModel(HoneybeeVisionPreTrainedModel):
    """CLIP's vision transformer (without `post_layernorm`, which only normalises the pooled CLS Honeybee never reads).

    NOTE: the inner `vision_model.` is transformers 4.x `CLIPVisionModel`'s, so our keys read as LLaVA's with CLIP
    on transformers 4 (`model.vision_tower.vision_model.*`), on every transformers version.
    """

    def __init__(self, config):
        super().__init__(config)
        self.vision_model = HoneybeeVisionTransformer(config)
        self.post_init()

    def forward(self, pixel_values, output_attentions=False, **kwargs):
        """(B, 3, S, S) -> `BaseModelOutput`, every tensor (B, 1+N, Cv) with the CLS token first: `hidden_states`
        the embeddings after `pre_layrnorm` then each layer's output, `last_hidden_state` the last of them, and with
        `output_attentions` each layer's (B, nh, 1+N, 1+N) weights (None from attention functions that give none,
        as sdpa)."""
        tower = self.vision_model
        x = tower.pre_layrnorm(tower.embeddings(pixel_values))  # (B, 1+N, Cv): hidden_states[0]
        hidden_states, attentions = [x], []
        for layer in tower.encoder.layers:
            x, weights = layer(x)
            hidden_states.append(x)
            attentions.append(weights)
        return BaseModelOutput(
            last_hidden_state=x,
            hidden_states=tuple(hidden_states),
            attentions=tuple(attentions) if output_attentions else None,
        )


# ---------------------------------------------------------------------------------------------------------
# C-Abstractor (paper §3.2): RegNet stages (Radosavovic et al. 2020, timm's RegStage names) + adaptive pool
# ---------------------------------------------------------------------------------------------------------


# Why these blocks are not timm's `ConvNormAct` children (`conv1.conv`, `conv1.bn`, ...): every weight a fused op reads
# must belong to the module that calls the op. accelerate's offload hooks bring a module's own weights to the device
# only while that module's forward runs, so a parent reading its children's weights sees meta tensors. The first fused
# op applies conv1's norm (LN1 + SiLU) inside the depthwise-conv kernel, so that norm lives in `conv2` as `in_norm_*`,
# and each block owns its conv and norm weights directly; convert/official.py renames the official keys to these.
_CHANNEL_NORM_EPS = 1e-5  # timm's `LayerNormAct2d`


class HoneybeePointwiseConv(nn.Module):
    """A 1x1 conv without bias on token-major input, (B, N, Cin) -> (B, N, Cout): a linear map. The weight keeps
    `nn.Conv2d`'s (Cout, Cin, 1, 1) shape."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 1, 1))

    def forward(self, x):
        return F.linear(x, self.weight.flatten(1))


class HoneybeeProjectionShortcut(nn.Module):
    """The bottleneck's shortcut when the width changes: 1x1 conv and channel LayerNorm (timm: `downsample`)."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = HoneybeePointwiseConv(in_channels, out_channels)
        self.bn = nn.LayerNorm(out_channels, eps=_CHANNEL_NORM_EPS)  # sic: timm's name for it

    def forward(self, x):
        return self.bn(self.conv(x))


class HoneybeeDepthwiseConvBlock(nn.Module):
    """SiLU(LN_in(x)) -> depthwise 3x3 conv -> SiLU(LN(.)), and the per-channel means for SE, in one fused op.

    `in_norm_*` is the norm of the bottleneck's first 1x1 conv (timm: `conv1.bn`), fused in here; the rest is
    timm's `conv2`.
    """

    def __init__(self, channels, config):
        super().__init__()
        self.config = config  # read per call: `config.kernel_backend` is runtime state (set_kernel_backend)
        self.in_norm_weight = nn.Parameter(torch.ones(channels))
        self.in_norm_bias = nn.Parameter(torch.zeros(channels))
        self.weight = nn.Parameter(torch.empty(channels, 1, 3, 3))
        self.norm_weight = nn.Parameter(torch.ones(channels))
        self.norm_bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x, h, w):  # (B, N, C) -> ((B, N, C), (B, C) means)
        return cabs_dwconv_block(
            x,
            h,
            w,
            self.in_norm_weight,
            self.in_norm_bias,
            self.weight,
            self.norm_weight,
            self.norm_bias,
            _CHANNEL_NORM_EPS,
            backend=self.config.kernel_backend,
        )


class HoneybeeOutputConv(nn.Module):
    """The bottleneck's end: SiLU(LN(1x1 conv(y)) + shortcut), optionally average-pooled (timm: `conv3` + the
    residual and activation)."""

    def __init__(self, channels, config):
        super().__init__()
        self.config = config  # read per call: `config.kernel_backend` is runtime state (set_kernel_backend)
        self.weight = nn.Parameter(torch.empty(channels, channels, 1, 1))
        self.norm_weight = nn.Parameter(torch.ones(channels))
        self.norm_bias = nn.Parameter(torch.zeros(channels))

    def forward(self, y, shortcut, h, w, pool_to=None):
        y, weight, bias, eps = F.linear(y, self.weight.flatten(1)), self.norm_weight, self.norm_bias, _CHANNEL_NORM_EPS
        if pool_to is None:
            return ln_residual_silu(y, weight, bias, shortcut, eps, backend=self.config.kernel_backend)
        # the pool reads this block's output straight from registers: the full-resolution map is never written
        return ln_residual_silu_pool(
            y, weight, bias, shortcut, eps, h, w, pool_to, pool_to, backend=self.config.kernel_backend
        )


class HoneybeeSqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018) on pooled channel means; width round(c_in / 4) as in timm."""

    def __init__(self, channels, width):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, width, 1)
        self.fc2 = nn.Conv2d(width, channels, 1)

    def forward(self, mean):  # (B, C) -> (B, C) gates; the 1x1 convs run on a 1x1 map
        return torch.sigmoid(self.fc2(F.silu(self.fc1(mean[:, :, None, None])))).flatten(1)


class HoneybeeBottleneck(GradientCheckpointingLayer):
    """RegNet-Y bottleneck, stride 1, group width 1 (depthwise), SE, LayerNorm instead of BatchNorm."""

    def __init__(self, in_channels, out_channels, config):
        super().__init__()
        self.conv1 = HoneybeePointwiseConv(in_channels, out_channels)
        self.conv2 = HoneybeeDepthwiseConvBlock(out_channels, config)
        self.se = HoneybeeSqueezeExcite(out_channels, round(in_channels * 0.25))
        self.conv3 = HoneybeeOutputConv(out_channels, config)
        # NOTE: timm calls the projection shortcut `downsample` even at stride 1.
        self.downsample = HoneybeeProjectionShortcut(in_channels, out_channels) if in_channels != out_channels else None

    def forward(self, x, h, w, pool_to=None):  # (B, N, Cin) -> (B, N, Cout), or (B, pool_to², Cout)
        shortcut = x if self.downsample is None else self.downsample(x)
        y, mean = self.conv2(self.conv1(x), h, w)
        y = y * self.se(mean.to(y.dtype))[:, None]  # channel gates broadcast over tokens
        return self.conv3(y, shortcut, h, w, pool_to)


class HoneybeeRegStage(nn.Module):
    """`depth` bottlenecks named b1..b{depth}; only b1 changes the width."""

    def __init__(self, depth, in_channels, out_channels, config):
        super().__init__()
        for i in range(depth):
            self.add_module(
                f"b{i + 1}", HoneybeeBottleneck(in_channels if i == 0 else out_channels, out_channels, config)
            )

    def forward(self, x, h, w, pool_to=None):
        """`pool_to`: adaptive-average-pool the output to pool_to×pool_to, fused into the last block."""
        *blocks, last = self.children()
        for block in blocks:
            x = block(x, h, w)
        return last(x, h, w, pool_to)


class HoneybeeAdaptivePool(nn.Module):
    """`nn.AdaptiveAvgPool2d` on token-major maps; 16->12 and 24->16 have overlapping windows.

    With depth > 0 the pool runs fused into the first stage's last block (its output is never written at full
    resolution); this module then only holds the size, and keeps stage 2 at the official key `net.2`.
    """

    def __init__(self, side, config):
        super().__init__()
        self.side, self.config = side, config

    def forward(self, x, h, w):  # (B, h*w, C) -> (B, side*side, C)
        return adaptive_avg_pool(x, h, w, self.side, self.side, backend=self.config.kernel_backend)


def _readout_mlp(in_features, out_features, depth):
    """Linear, then (SiLU, Linear) x (depth - 1): keys readout.0, readout.2, ..."""
    layers = [nn.Linear(in_features, out_features)]
    for _ in range(depth - 1):
        layers += [nn.SiLU(), nn.Linear(out_features, out_features)]
    return nn.Sequential(*layers)


class HoneybeeCAbstractor(nn.Module):
    """C-Abstractor (paper §3.2, Fig. 4a): RegStage -> adaptive pool to √M×√M -> RegStage -> MLP readout.

    (B, N, Cv) CLIP features -> (B, M + n_eos, D).
    """

    def __init__(self, config, num_input_tokens, encoder_hidden_size, output_hidden_size):
        super().__init__()
        Cv, Ch, D = encoder_hidden_size, config.hidden_size, output_hidden_size
        self.grid = math.isqrt(num_input_tokens)
        self.prenorm = nn.LayerNorm(Cv, eps=1e-6) if config.prenorm else nn.Identity()
        self.pos_emb = nn.Parameter(torch.zeros(1, num_input_tokens, Cv)) if config.pos_emb else None
        self.depth = config.depth
        pool = HoneybeeAdaptivePool(math.isqrt(config.num_query_tokens), config)
        if self.depth > 0:  # the official keys: net.0 stage 1, net.1 the pool (no weights), net.2 stage 2
            self.net = nn.ModuleList(
                [HoneybeeRegStage(config.depth, Cv, Ch, config), pool, HoneybeeRegStage(config.depth, Ch, Ch, config)]
            )
        else:  # net.0 the pool alone
            self.net = nn.ModuleList([pool])
        self.readout = _readout_mlp(Ch if config.depth > 0 else Cv, D, config.mlp_depth)
        self.eos_tokens = nn.Parameter(torch.zeros(1, config.num_eos_tokens, D)) if config.num_eos_tokens else None

    def forward(self, x):  # (B, N, Cv)
        x = self.prenorm(x)
        if self.pos_emb is not None:
            x = x + self.pos_emb
        if self.depth == 0:
            x = self.net[0](x, self.grid, self.grid)  # (B, N, Cv) -> (B, M, Cv)
        else:
            stage1, pool, stage2 = self.net
            x = stage1(x, self.grid, self.grid, pool_to=pool.side)  # (B, N, Cv) -> (B, M, Ch), pooled
            x = stage2(x, pool.side, pool.side)  # (B, M, Ch)
        x = self.readout(x)  # (B, M, D)
        if self.eos_tokens is not None:
            x = torch.cat([x, self.eos_tokens.expand(x.shape[0], -1, -1)], dim=1)  # (B, M + n_eos, D)
        return x


# ---------------------------------------------------------------------------------------------------------
# D-Abstractor (paper §3.2, Fig. 4b): Deformable-DETR decoder layers (Zhu et al. 2021, transformers 4.x names)
# ---------------------------------------------------------------------------------------------------------


class HoneybeeSelfAttention(HoneybeeAttention):
    """Multi-head self-attention over the queries; position embeddings go into queries and keys only."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        C = config.d_model
        self.num_heads, self.dropout = config.decoder_attention_heads, config.attention_dropout
        self.scale = (C // self.num_heads) ** -0.5
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = (nn.Linear(C, C) for _ in range(4))

    def forward(self, x, pos):  # (B, M, C)
        B, M, C = x.shape
        split = lambda t: t.view(B, M, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, nh, M, hd)
        q, k, v = split(self.q_proj(x + pos)), split(self.k_proj(x + pos)), split(self.v_proj(x))
        dropout = self.dropout if self.training else 0.0
        out, _ = self.attention_interface(q.dtype)(
            self, q, k, v, None, dropout=dropout, scaling=self.scale, is_causal=False
        )
        return self.out_proj(out.reshape(B, M, C))  # out: (B, M, nh, hd)


class HoneybeeMultiscaleDeformableAttention(nn.Module):
    """Deformable attention (Deformable DETR eq. 2): each query reads P bilinear samples per head around its
    reference point, at learned offsets, mixed by learned weights. One feature level (see the config)."""

    def __init__(self, d_model, num_heads, num_points, config):
        super().__init__()
        self.num_heads, self.num_points, self.config = num_heads, num_points, config
        self.sampling_offsets = nn.Linear(d_model, num_heads * num_points * 2)
        self.attention_weights = nn.Linear(d_model, num_heads * num_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)

    def forward(self, queries, reference_points, values, grid):
        B, M, C = queries.shape
        nh, P = self.num_heads, self.num_points
        value = self.value_proj(values).view(B, -1, nh, C // nh)  # (B, N, nh, hd)
        offsets = self.sampling_offsets(queries).view(B, M, nh, 1, P, 2)
        logits = self.attention_weights(queries).view(B, M, nh, P)
        locations = reference_points[:, :, None, None, None, :] + offsets / grid  # (B, M, nh, 1, P, 2), (x, y)
        out = msda(value, [(grid, grid)], locations, logits, backend=self.config.kernel_backend)  # (B, M, C)
        return self.output_proj(out)


class HoneybeeDeformableDecoderLayer(GradientCheckpointingLayer):
    """Post-norm decoder layer: self-attention, deformable cross-attention to the visual map, FFN."""

    def __init__(self, config):
        super().__init__()
        C = config.d_model
        self.dropout, self.activation_dropout = config.dropout, config.activation_dropout
        self.self_attn = HoneybeeSelfAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(C)
        self.encoder_attn = HoneybeeMultiscaleDeformableAttention(
            C, config.decoder_attention_heads, config.decoder_n_points, config
        )
        self.encoder_attn_layer_norm = nn.LayerNorm(C)
        self.fc1 = nn.Linear(C, config.decoder_ffn_dim)
        self.fc2 = nn.Linear(config.decoder_ffn_dim, C)
        self.activation_fn = ACT2FN[config.activation_function]
        self.final_layer_norm = nn.LayerNorm(C)

    def forward(self, x, pos, reference_points, values, grid):  # (B, M, C)
        drop = lambda t, p: F.dropout(t, p, self.training)
        x = self.self_attn_layer_norm(x + drop(self.self_attn(x, pos), self.dropout))
        x = self.encoder_attn_layer_norm(
            x + drop(self.encoder_attn(x + pos, reference_points, values, grid), self.dropout)
        )
        y = self.fc2(drop(self.activation_fn(self.fc1(x)), self.activation_dropout))
        return self.final_layer_norm(x + drop(y, self.dropout))


def _initial_reference_points(grid, num_queries):
    """(1, M, 2) points (x, y) on a √M×√M lattice spanning [0.5/grid, 1 - 0.5/grid], as the official init."""
    steps = math.isqrt(num_queries)
    line = torch.linspace(0.5, grid - 0.5, steps) / grid
    y, x = torch.meshgrid(line, line, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=-1)[None]


class HoneybeeDAbstractor(nn.Module):
    """D-Abstractor (paper §3.2, Fig. 4b): M learned queries attend deformably to the visual map.

    (B, N, Cv) CLIP features -> (B, M + n_eos, D).
    """

    def __init__(self, config, num_input_tokens, encoder_hidden_size, output_hidden_size):
        super().__init__()
        C, M = config.d_model, config.num_query_tokens
        self.grid = math.isqrt(num_input_tokens)
        self.pooled_v_target, self.config = config.pooled_v_target, config
        self.input_proj = nn.ModuleList(
            [nn.Linear(encoder_hidden_size, C) if encoder_hidden_size != C else nn.Identity()]
        )
        self.v_pos_emb = nn.Parameter(torch.zeros(1, num_input_tokens, C)) if config.pos_emb else None
        # "none": the learned embedding holds both the query position (first half) and the target (second half)
        self.query_position_embeddings = nn.Embedding(M, C if config.pooled_v_target != "none" else 2 * C)
        self.reference_points = nn.Parameter(_initial_reference_points(self.grid, M))
        self.layers = nn.ModuleList(HoneybeeDeformableDecoderLayer(config) for _ in range(config.decoder_layers))
        self.eos_tokens = nn.Parameter(torch.zeros(1, config.num_eos_tokens, C)) if config.num_eos_tokens else None
        self.output_proj = nn.Linear(C, output_hidden_size) if output_hidden_size != C else nn.Identity()

    def pooled_queries(self, values):
        """(query position, target), each (B, M, C); one of them is the adaptive-pooled visual map."""
        B, N, C = values.shape
        queries = torch.arange(self.query_position_embeddings.num_embeddings, device=values.device)
        learned = self.query_position_embeddings(queries).expand(B, -1, -1)  # called: offloading needs its forward
        if self.pooled_v_target == "none":
            return learned.split(C, dim=-1)
        side = math.isqrt(learned.shape[1])
        backend = self.config.kernel_backend
        pooled = adaptive_avg_pool(values, self.grid, self.grid, side, side, backend=backend)  # (B, M, C)
        return (pooled, learned) if self.pooled_v_target == "query" else (learned, pooled)

    def forward(self, x):  # (B, N, Cv)
        dtype = self.reference_points.dtype  # fp32 unless the user cast it: the official D-Abs always ran in fp32
        values = self.input_proj[0](x.to(dtype))  # (B, N, C)
        if self.v_pos_emb is not None:
            values = values + self.v_pos_emb
        pos, h = self.pooled_queries(values)
        reference_points = self.reference_points.expand(x.shape[0], -1, -1)  # (B, M, 2); not refined per layer
        for layer in self.layers:
            h = layer(h, pos, reference_points, values, self.grid)
        if self.eos_tokens is not None:
            h = torch.cat([h, self.eos_tokens.expand(h.shape[0], -1, -1)], dim=1)  # (B, M + n_eos, C)
        return self.output_proj(h)  # (B, M + n_eos, D)


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------

PROJECTOR_CLASSES = {"c-abs": HoneybeeCAbstractor, "d-abs": HoneybeeDAbstractor}


class HoneybeePreTrainedModel(PreTrainedModel):
    config_class = HoneybeeConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")  # transformers 5
    supports_gradient_checkpointing = True
    _no_split_modules = [
        "HoneybeeVisionEncoderLayer",
        "HoneybeeCAbstractor",
        "HoneybeeDAbstractor",
        "LlamaDecoderLayer",
    ]
    _skip_keys_device_placement = "past_key_values"
    _supports_sdpa = True
    _supports_flash_attn = True  # transformers 5
    _supports_flash_attn_2 = True  # transformers 4
    _supports_flex_attn = True
    _supports_attention_backend = True
    # prefill and decode compile with fullgraph=True (tests/models/test_model_contract.py): generate may compile the
    # decode
    _can_compile_fullgraph = True

    def _finish_projector_init(self, kernel_backend):
        """After `post_init`, which resets `_keep_in_fp32_modules_strict` from the class on transformers 4 and 5."""
        projector_type = self.config.projector_config.projector_type
        # Only this model's abstractor class: accelerate's FSDP auto-wrap refuses a listed class the model lacks.
        absent = {cls.__name__ for name, cls in PROJECTOR_CLASSES.items() if name != projector_type}
        self._no_split_modules = [name for name in type(self)._no_split_modules if name not in absent]
        if projector_type == "d-abs":
            # The official D-Abstractor always ran in fp32: half-precision loads (dtype=...) keep it there. It stays in
            # `_keep_in_fp32_modules` as well, though transformers' common test_keep_in_fp32_modules wants the two lists
            # disjoint: that list is the only one the quantizers skip (`HfQuantizer.get_modules_to_not_convert` on 5.x,
            # `preprocess_model` on 4.57), and without it bitsandbytes quantizes the D-Abstractor.
            self._keep_in_fp32_modules_strict = {"abstractor"}
        if kernel_backend is not None:  # from_pretrained(..., kernel_backend=...) arrives here
            self.set_kernel_backend(kernel_backend)

    def set_kernel_backend(self, backend):
        """Pick the projector's fused-op implementation from now on, as `set_attn_implementation` picks attention:
        "auto" (the default: the Triton kernels for CUDA tensors when Triton imports and each kernel passed its
        start-up check against the PyTorch reference on that device and dtype, else PyTorch), "triton"
        (always the kernels; a forward where they cannot run raises and says why) or "torch" (always the PyTorch
        reference; the same numbers). Runtime state, like the attention implementation: config.json never saves it.
        """
        check_kernel_backend(backend)
        # The model's projector config, and the copies PEFT's `modules_to_save` deep-copies along with the abstractor.
        for module in self.modules():
            if isinstance(getattr(module, "config", None), HoneybeeProjectorConfig):
                module.config.kernel_backend = backend
        self.config.projector_config.kernel_backend = backend

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if _init_standard_layer(module, std):
            return
        if isinstance(module, HoneybeeMultiscaleDeformableAttention):
            # Deformable DETR's init (children are initialised first): head h starts sampling along direction
            # 2πh/nh, point p at distance p+1; uniform attention; xavier value/output projections.
            nh, P = module.num_heads, module.num_points
            theta = torch.arange(nh, dtype=torch.float32) * (2 * math.pi / nh)
            direction = torch.stack([theta.cos(), theta.sin()], -1)
            direction = direction / direction.abs().max(-1, keepdim=True).values  # (nh, 2)
            grid = direction[:, None, :] * torch.arange(1, P + 1, dtype=torch.float32)[None, :, None]  # (nh, P, 2)
            module.sampling_offsets.weight.zero_()
            module.sampling_offsets.bias.copy_(grid.flatten())
            module.attention_weights.weight.zero_()
            module.attention_weights.bias.zero_()
            for linear in (module.value_proj, module.output_proj):
                nn.init.xavier_uniform_(linear.weight)
                linear.bias.zero_()
        elif isinstance(module, HoneybeePointwiseConv):
            module.weight.normal_(0.0, std)
        elif isinstance(module, (HoneybeeDepthwiseConvBlock, HoneybeeOutputConv)):
            module.weight.normal_(0.0, std)
            module.norm_weight.fill_(1.0)
            module.norm_bias.zero_()
            if isinstance(module, HoneybeeDepthwiseConvBlock):
                module.in_norm_weight.fill_(1.0)
                module.in_norm_bias.zero_()
        elif isinstance(module, (HoneybeeCAbstractor, HoneybeeDAbstractor)):
            for name in ("pos_emb", "v_pos_emb", "eos_tokens"):
                param = getattr(module, name, None)
                if param is not None:
                    nn.init.trunc_normal_(param, std=std)
            if isinstance(module, HoneybeeDAbstractor):
                module.reference_points.copy_(_initial_reference_points(module.grid, module.reference_points.shape[1]))
        else:  # the LLM's own modules (RMSNorm, rotary buffers on transformers 5): the library's generic init
            super()._init_weights(module)


def _continues_a_sequence(past_key_values):
    """True when the cache already holds positions: the step decodes after a prompt (whose images it has seen)."""
    return past_key_values is not None and past_key_values.get_seq_length() > 0


@dataclass
class HoneybeeModelOutputWithPast(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus `image_hidden_states`: the projector outputs (num_images, M + n_eos, D)."""

    image_hidden_states: torch.FloatTensor | None = None


@dataclass
class HoneybeeCausalLMOutputWithPast(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus `image_hidden_states`: the projector outputs (num_images, M + n_eos, D)."""

    image_hidden_states: torch.FloatTensor | None = None


class HoneybeeModel(HoneybeePreTrainedModel):
    """The backbone: `vision_tower` (CLIP) -> `abstractor` (C- or D-Abstractor) -> `language_model` (the LLM
    without its head). Returns the LLM's last hidden states, as transformers' `LlavaModel`."""

    # Quantizers (bitsandbytes, torchao) skip these modules -- they read this list, not `_keep_in_fp32_modules_strict`
    # -- so only the language model is quantized (lm_head is left alone by their own default). The list's other
    # effect is transformers': a float16 load, or a bitsandbytes load on transformers 4, keeps these modules in fp32.
    _keep_in_fp32_modules = ["vision_tower", "abstractor"]

    def __init__(self, config: HoneybeeConfig, kernel_backend=None):
        super().__init__(config)
        vc, pc = config.vision_config, config.projector_config
        self.vision_tower = HoneybeeVisionModel(vc)
        self.abstractor = PROJECTOR_CLASSES[pc.projector_type](
            pc, config.vision_grid**2, vc.hidden_size, config.text_config.hidden_size
        )
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()
        self._finish_projector_init(kernel_backend)

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_decoder(self):
        return self.language_model

    def set_decoder(self, decoder):
        self.language_model = decoder

    def get_image_features(self, pixel_values, return_dict=None, **kwargs):
        """(num_images, 3, S, S) normalised pixels -> the visual tokens for the LLM, (num_images, M + n_eos, D), as
        LLaVA's on each transformers version (`transformers_compat.image_features_output`).

        The output is a `BaseModelOutputWithPooling` as LLaVA's: `pooler_output` the visual tokens,
        `last_hidden_state` the CLIP tower's last hidden state (num_images, 1+N, Cv), and, when asked (or set in the
        config), the tower's `hidden_states` (CLS included) and `attentions`. Transformers 5 returns it, or its
        `to_tuple()` with `return_dict=False` (`config.return_dict` when not told); transformers 4 returns the visual
        tokens themselves unless `return_dict=True`.
        """
        if pixel_values is None:
            # 5.x's generate calls this with whatever `pixel_values` its caller passed, None for a text-only prompt
            # included (LLaVA raises there); no images encode to nothing, which forward reads as a text-only prompt.
            return None
        S = self.config.vision_config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, S, S):
            raise ValueError(
                f"pixel_values must have shape (num_images, 3, {S}, {S}), got {tuple(pixel_values.shape)}; "
                f"prepare images with HoneybeeProcessor, which resizes them to {S}x{S}"
            )
        # Read from kwargs, as LLaVA's: generate on 5.x hands this method the model kwargs its signature names and
        # then drops them from the LLM's, so named here they would cost `generate(output_attentions=True)` the LLM's.
        output_hidden_states, output_attentions = kwargs.get("output_hidden_states"), kwargs.get("output_attentions")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        tower = self.vision_tower(pixel_values, output_attentions=output_attentions)
        layer = self.config.projector_config.feature_layer_index
        image_features = self.abstractor(tower.hidden_states[layer][:, 1:])  # (n, N, Cv) -> (n, M + n_eos, D)
        output = BaseModelOutputWithPooling(
            last_hidden_state=tower.last_hidden_state,
            pooler_output=image_features,
            hidden_states=tower.hidden_states if output_hidden_states else None,
            attentions=tower.attentions,
        )
        return image_features_output(output, return_dict, self.config)

    def get_placeholder_mask(self, input_ids, inputs_embeds):
        """(B, L) bool: the `<image>` placeholders, found in `input_ids`, or without them (as LLaVA) as the rows of
        `inputs_embeds` equal to the `<image>` embedding."""
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_token = torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
        return (inputs_embeds == self.get_input_embeddings()(image_token)).all(-1)

    def check_image_count(self, placeholders, num_images):
        M = self.config.num_visual_tokens
        if placeholders != num_images * M:
            raise ValueError(
                f"the prompt holds {placeholders} image placeholder tokens ({placeholders / M:g} images of {M} "
                f"tokens) but {num_images} images were given; give one image per <image> and build the inputs "
                f"with HoneybeeProcessor, which expands each <image> into {M} placeholders"
            )

    @can_return_tuple  # as LLaVA; a conditional return in the body defeats torch.fx tracing (llm-compressor GPTQ)
    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        mm_encoder_outputs=None,
        **kwargs,
    ):
        r"""`input_ids` (or `inputs_embeds`) hold `num_visual_tokens` placeholders per image (HoneybeeProcessor
        writes them) and `pixel_values` the images in order; the projector outputs overwrite the placeholders.
        `mm_encoder_outputs` = `{"image": get_image_features(pixel_values, return_dict=True)}` instead of the
        pixels: images encoded once, as generate does on transformers 5 before the prefill."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        encoded = (mm_encoder_outputs or {}).get("image")
        if pixel_values is not None and encoded is not None:
            raise ValueError("give the images either as pixel_values or as mm_encoder_outputs, not both")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        image_features = None
        # Checks that read tensor values are skipped under torch.compile (no graph break; the processor is trusted).
        checking = not torch.compiler.is_compiling()
        if pixel_values is not None:
            encoded = self.get_image_features(pixel_values, return_dict=True)
        if encoded is not None:
            image_features = encoded.pooler_output  # (n_img, M, D)
            slots = self.get_placeholder_mask(input_ids, inputs_embeds)
            if checking:
                self.check_image_count(int(slots.sum()), image_features.shape[0])
            image_features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
            inputs_embeds = inputs_embeds.masked_scatter(slots[..., None], image_features)
        elif checking and input_ids is not None and not _continues_a_sequence(past_key_values):
            # Only a prompt must come with its images: a decode step's token is the model's own output, and the
            # vocabulary holds `<image>` (a random-weight 7B does generate it).
            if (input_ids == self.config.image_token_id).any():
                raise ValueError("input_ids hold <image> placeholders but no pixel_values were given")
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        outputs = HoneybeeModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
        )
        return outputs


class HoneybeeForConditionalGeneration(HoneybeePreTrainedModel, GenerationMixin):
    """Honeybee: the backbone `model` (`HoneybeeModel`) and the LM head `lm_head`.

    Example:
        >>> from transformers import AutoModelForImageTextToText, AutoProcessor
        >>> from PIL import Image
        >>> processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
        >>> model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True)
        >>> inputs = processor(images=Image.open("photo.jpg"), text="What is in the image?", return_tensors="pt")
        >>> answer = model.generate(**inputs, max_new_tokens=32)[:, inputs["input_ids"].shape[1]:]
        >>> processor.batch_decode(answer, skip_special_tokens=True)
    """

    # Only read when the text config ties the head to the embeddings (Vicuna does not).
    _tied_weights_keys = tied_weights_keys("lm_head.weight", "model.language_model.embed_tokens.weight")
    _keep_in_fp32_modules = keep_in_fp32_modules(HoneybeeModel._keep_in_fp32_modules, "model")
    _tp_plan = lm_head_tp_plan()  # the language model brings its own layers' plan

    def __init__(self, config: HoneybeeConfig, kernel_backend=None):
        super().__init__(config)
        self.model = HoneybeeModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()
        self._finish_projector_init(kernel_backend)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_decoder(self):
        return self.model.get_decoder()

    def set_decoder(self, decoder):
        self.model.set_decoder(decoder)

    @property
    def vision_tower(self):
        return self.model.vision_tower

    @property
    def abstractor(self):
        return self.model.abstractor

    @property
    def language_model(self):
        return self.model.language_model

    def get_image_features(self, pixel_values, **kwargs):
        return self.model.get_image_features(pixel_values, **kwargs)

    get_image_features.__doc__ = HoneybeeModel.get_image_features.__doc__

    @can_return_tuple  # as LLaVA; a conditional return in the body defeats torch.fx tracing (llm-compressor GPTQ)
    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        mm_encoder_outputs=None,
        **kwargs,
    ):
        r"""`input_ids` hold `num_visual_tokens` placeholders per image (HoneybeeProcessor writes them) and
        `pixel_values` the images in order. `labels` work as in `LlamaForCausalLM` (-100 is ignored); labels equal
        to the `<image>` id are ignored too (the model overwrites those positions and never predicts the id), so
        `labels=input_ids` supervises the text only.
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            mm_encoder_outputs=mm_encoder_outputs,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep])
        loss = None
        if labels is not None:
            labels = labels.masked_fill(labels == self.config.image_token_id, -100)
            loss = self.loss_function(logits, labels, vocab_size=self.config.text_config.vocab_size, **kwargs)
        outputs = HoneybeeCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
        )
        return outputs

    def prepare_inputs_for_generation(
        self, input_ids, inputs_embeds=None, pixel_values=None, mm_encoder_outputs=None, **kwargs
    ):
        # kwargs differ between transformers 4 (cache_position) and 5 (next_sequence_length): pass them through.
        # `inputs_embeds` is named: generate refuses it for models whose signature here lacks it.
        model_inputs = super().prepare_inputs_for_generation(input_ids, inputs_embeds=inputs_embeds, **kwargs)
        cache = kwargs.get("past_key_values")
        prefill = cache is None or cache.get_seq_length() == 0
        model_inputs["pixel_values"] = pixel_values if prefill else None
        model_inputs["mm_encoder_outputs"] = mm_encoder_outputs if prefill else None
        return model_inputs

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """Beams and `num_return_sequences`: each prompt row is repeated `expand_size` times, so its images are
        too, as a group ([a0, a1, b0] -> [a0, a1, a0, a1, b0, b0]); the library's default would repeat each image
        in place and hand a prompt's copies the wrong images. Rows without images take none."""
        pixel_values = model_kwargs.pop("pixel_values", None)
        if pixel_values is not None and expand_size > 1:
            ids = input_ids if input_ids is not None and input_ids.numel() else None
            slots = self.model.get_placeholder_mask(ids, model_kwargs.get("inputs_embeds"))
            images_per_row = (slots.sum(-1) // self.config.num_visual_tokens).tolist()
            self.model.check_image_count(int(slots.sum()), pixel_values.shape[0])
            groups = pixel_values.split(images_per_row)
            pixel_values = torch.cat([group for group in groups for _ in range(expand_size)])
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if pixel_values is not None:
            model_kwargs["pixel_values"] = pixel_values
        return input_ids, model_kwargs


__all__ = ["HoneybeeForConditionalGeneration", "HoneybeeModel", "HoneybeePreTrainedModel"]
