"""Honeybee: Locality-enhanced Projector for Multimodal LLM (Cha et al., CVPR 2024, arXiv 2312.06742).

CLIP ViT -> locality-preserving projector (C-Abstractor or D-Abstractor) -> Llama, with the official
checkpoints' weight names (github.com/kakaobrain/honeybee). What differs from the official code:
- The CLIP vision tower is written here (same math and keys as transformers' `CLIPVisionModel` in 4.x) because
  transformers 5 renamed that module's weights; our checkpoints read the same on every transformers version.
- The projectors compute token-major (B, N, C): a 1x1 conv is a `F.linear` on the same weight and a channel
  LayerNorm needs no permute. The numbers match the official NCHW modules (tests/test_projector_parity.py).
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
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_honeybee import HoneybeeConfig
from .kernels_honeybee import adaptive_avg_pool, cabs_dwconv_block, ln_residual_silu, ln_residual_silu_pool, msda


@dataclass
class HoneybeeCausalLMOutputWithPast(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus `image_hidden_states`: the projector outputs (num_images, M + n_eos, D)."""

    image_hidden_states: torch.FloatTensor | None = None


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
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (B, 1+N, Cv)


class HoneybeeVisionAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        C = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = C // self.num_heads
        self.scale = self.head_dim**-0.5
        self.is_causal = False
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = (nn.Linear(C, C) for _ in range(4))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (
            proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )  # (B, nh, T, hd)
        implementation = self.config._attn_implementation or "sdpa"
        if implementation == "eager":
            attn = (q @ k.transpose(-1, -2) * self.scale).softmax(-1)  # (B, nh, T, T)
            out = (attn @ v).transpose(1, 2)  # (B, T, nh, hd)
        else:
            out, _ = ALL_ATTENTION_FUNCTIONS[implementation](
                self, q, k, v, None, dropout=0.0, scaling=self.scale, is_causal=False
            )
        return self.out_proj(out.reshape(B, T, C))


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

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


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
        # NOTE: unused (it only normalises the pooled CLS); kept so released checkpoints load without leftovers.
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class HoneybeeVisionModel(nn.Module):
    """CLIP's vision transformer. Returns `hidden_states[feature_layer_index]` with the CLS token dropped.

    NOTE: the doubled `vision_model.vision_model.*` key path is transformers 4.x `CLIPVisionModel`'s, which the
    released checkpoints use; keeping it makes every checkpoint load unchanged on transformers 4 and 5.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.vision_model = HoneybeeVisionTransformer(config)

    def forward(self, pixel_values, feature_layer_index=-1):
        tower = self.vision_model
        num_layers = (
            len(tower.encoder.layers) + 1 + feature_layer_index if feature_layer_index < 0 else feature_layer_index
        )
        x = tower.pre_layrnorm(tower.embeddings(pixel_values))  # (B, 1+N, Cv): hidden_states[0]
        for layer in tower.encoder.layers[:num_layers]:  # layers past the chosen one are never run
            x = layer(x)
        return x[:, 1:]  # (B, N, Cv), CLS dropped


# ---------------------------------------------------------------------------------------------------------
# C-Abstractor (paper §3.2): RegNet stages (Radosavovic et al. 2020, timm's RegStage names) + adaptive pool
# ---------------------------------------------------------------------------------------------------------


class HoneybeeConvNormAct(nn.Module):
    """A 1x1 or depthwise 3x3 conv and a channel LayerNorm (eps 1e-5, timm's `LayerNormAct2d`).

    NOTE: the norm is called `bn` (timm's name, frozen by the checkpoints) although it is a LayerNorm.
    """

    def __init__(self, in_channels, out_channels, kernel_size=1, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, groups=groups, bias=False
        )
        self.bn = nn.LayerNorm(out_channels, eps=1e-5)

    def linear(self, x):
        """The 1x1 conv on token-major input: (B, N, Cin) -> (B, N, Cout)."""
        return F.linear(x, self.conv.weight.flatten(1))


class HoneybeeSqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018) on pooled channel means; width round(c_in / 4) as in timm."""

    def __init__(self, channels, width):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, width, 1)
        self.fc2 = nn.Conv2d(width, channels, 1)

    def forward(self, mean):  # (B, C) -> (B, C) gates
        s = F.silu(F.linear(mean, self.fc1.weight.flatten(1), self.fc1.bias))
        return torch.sigmoid(F.linear(s, self.fc2.weight.flatten(1), self.fc2.bias))


class HoneybeeBottleneck(GradientCheckpointingLayer):
    """RegNet-Y bottleneck, stride 1, group width 1 (depthwise), SE, LayerNorm instead of BatchNorm."""

    def __init__(self, in_channels, out_channels, kernel_backend):
        super().__init__()
        self.kernel_backend = kernel_backend
        self.conv1 = HoneybeeConvNormAct(in_channels, out_channels)
        self.conv2 = HoneybeeConvNormAct(out_channels, out_channels, kernel_size=3, groups=out_channels)
        self.se = HoneybeeSqueezeExcite(out_channels, round(in_channels * 0.25))
        self.conv3 = HoneybeeConvNormAct(out_channels, out_channels)
        # NOTE: timm calls the projection shortcut `downsample` even at stride 1.
        self.downsample = HoneybeeConvNormAct(in_channels, out_channels) if in_channels != out_channels else None

    def forward(self, x, h, w, pool_to=None):  # (B, N, Cin) -> (B, N, Cout), or (B, pool_to², Cout)
        shortcut = x
        if self.downsample is not None:
            shortcut = self.downsample.bn(self.downsample.linear(x))
        c1, c2, c3 = self.conv1, self.conv2, self.conv3
        y, mean = cabs_dwconv_block(
            c1.linear(x),
            h,
            w,
            c1.bn.weight,
            c1.bn.bias,
            c2.conv.weight,
            c2.bn.weight,
            c2.bn.bias,
            c1.bn.eps,
            backend=self.kernel_backend,
        )
        y = y * self.se(mean.to(y.dtype))[:, None]  # channel gates broadcast over tokens
        y, ln = c3.linear(y), c3.bn
        if pool_to is None:
            return ln_residual_silu(y, ln.weight, ln.bias, shortcut, ln.eps, backend=self.kernel_backend)
        # the pool reads this block's output straight from registers: the full-resolution map is never written
        return ln_residual_silu_pool(
            y, ln.weight, ln.bias, shortcut, ln.eps, h, w, pool_to, pool_to, backend=self.kernel_backend
        )


class HoneybeeRegStage(nn.Module):
    """`depth` bottlenecks named b1..b{depth}; only b1 changes the width."""

    def __init__(self, depth, in_channels, out_channels, kernel_backend):
        super().__init__()
        for i in range(depth):
            self.add_module(
                f"b{i + 1}", HoneybeeBottleneck(in_channels if i == 0 else out_channels, out_channels, kernel_backend)
            )

    def forward(self, x, h, w, pool_to=None):
        """`pool_to`: adaptive-average-pool the output to pool_to×pool_to, fused into the last block."""
        *blocks, last = self.children()
        for block in blocks:
            x = block(x, h, w)
        return last(x, h, w, pool_to)


class HoneybeeAdaptivePool(nn.Module):
    """`nn.AdaptiveAvgPool2d` on token-major maps; 16->12 and 24->16 have overlapping windows.

    With depth > 0 the pool runs fused into the first stage's last block; this module then only holds the size.
    """

    def __init__(self, side, kernel_backend):
        super().__init__()
        self.side, self.kernel_backend = side, kernel_backend

    def forward(self, x, h, w):  # (B, h*w, C) -> (B, side*side, C)
        return adaptive_avg_pool(x, h, w, self.side, self.side, backend=self.kernel_backend)


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
        backend = config.kernel_backend
        self.grid = math.isqrt(num_input_tokens)
        self.prenorm = nn.LayerNorm(Cv, eps=1e-6) if config.prenorm else nn.Identity()
        self.pos_emb = nn.Parameter(torch.zeros(1, num_input_tokens, Cv)) if config.pos_emb else None
        pool = HoneybeeAdaptivePool(math.isqrt(config.num_query_tokens), backend)
        if config.depth > 0:
            self.net = nn.ModuleList(
                [HoneybeeRegStage(config.depth, Cv, Ch, backend), pool, HoneybeeRegStage(config.depth, Ch, Ch, backend)]
            )
        else:
            self.net = nn.ModuleList([pool])
        self.readout = _readout_mlp(Ch if config.depth > 0 else Cv, D, config.mlp_depth)
        self.eos_tokens = nn.Parameter(torch.zeros(1, config.num_eos_tokens, D)) if config.num_eos_tokens else None

    def forward(self, x):  # (B, N, Cv)
        x = self.prenorm(x)
        if self.pos_emb is not None:
            x = x + self.pos_emb
        if len(self.net) == 1:  # depth 0: the pool alone
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


class HoneybeeSelfAttention(nn.Module):
    """Multi-head self-attention over the queries; position embeddings go into queries and keys only."""

    def __init__(self, d_model, num_heads, dropout):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = (nn.Linear(d_model, d_model) for _ in range(4))

    def forward(self, x, pos):  # (B, M, C)
        B, M, C = x.shape
        split = lambda t: t.view(B, M, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, nh, M, hd)
        q, k, v = split(self.q_proj(x + pos)), split(self.k_proj(x + pos)), split(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(B, M, C))


class HoneybeeMultiscaleDeformableAttention(nn.Module):
    """Deformable attention (Deformable DETR eq. 2): each query reads P bilinear samples per head around its
    reference point, at learned offsets, mixed by learned weights. One feature level (see the config)."""

    def __init__(self, d_model, num_heads, num_points, kernel_backend):
        super().__init__()
        self.num_heads, self.num_points, self.kernel_backend = num_heads, num_points, kernel_backend
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
        out = msda(value, [(grid, grid)], locations, logits, backend=self.kernel_backend)  # (B, M, C)
        return self.output_proj(out)


class HoneybeeDeformableDecoderLayer(GradientCheckpointingLayer):
    """Post-norm decoder layer: self-attention, deformable cross-attention to the visual map, FFN."""

    def __init__(self, config):
        super().__init__()
        C = config.d_model
        self.dropout, self.activation_dropout = config.dropout, config.activation_dropout
        self.self_attn = HoneybeeSelfAttention(C, config.decoder_attention_heads, config.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(C)
        self.encoder_attn = HoneybeeMultiscaleDeformableAttention(
            C, config.decoder_attention_heads, config.decoder_n_points, config.kernel_backend
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
        self.pooled_v_target, self.kernel_backend = config.pooled_v_target, config.kernel_backend
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
        learned = self.query_position_embeddings.weight.expand(B, -1, -1)
        if self.pooled_v_target == "none":
            return learned.split(C, dim=-1)
        side = math.isqrt(learned.shape[1])
        pooled = adaptive_avg_pool(values, self.grid, self.grid, side, side, backend=self.kernel_backend)  # (B, M, C)
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
    base_model_prefix = "model"  # no such attribute: the model is its own base
    main_input_name = "input_ids"
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
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, HoneybeeMultiscaleDeformableAttention):
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
        elif isinstance(module, HoneybeeVisionEmbeddings):
            module.class_embedding.normal_(0.0, std)
        elif isinstance(module, (HoneybeeCAbstractor, HoneybeeDAbstractor)):
            for name in ("pos_emb", "v_pos_emb", "eos_tokens"):
                param = getattr(module, name, None)
                if param is not None:
                    nn.init.trunc_normal_(param, std=std)
            if isinstance(module, HoneybeeDAbstractor):
                module.reference_points.copy_(_initial_reference_points(module.grid, module.reference_points.shape[1]))


class HoneybeeForConditionalGeneration(HoneybeePreTrainedModel, GenerationMixin):
    """Honeybee: `vision_model` (CLIP) -> `abstractor` (C- or D-Abstractor) -> `language_model` (Llama).

    Example:
        >>> from transformers import AutoModelForImageTextToText, AutoProcessor
        >>> from PIL import Image
        >>> processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
        >>> model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True)
        >>> inputs = processor(images=Image.open("photo.jpg"), text="What is in the image?", return_tensors="pt")
        >>> answer = model.generate(**inputs, max_new_tokens=32)[:, inputs["input_ids"].shape[1]:]
        >>> processor.batch_decode(answer, skip_special_tokens=True)
    """

    # Quantizers (bitsandbytes, torchao) read this list, not `_keep_in_fp32_modules_strict`, and leave these modules
    # unquantized: only the language model is quantized (lm_head is skipped by the quantizers' own default). Its other
    # effect is transformers': a float16 load, or a bitsandbytes load on transformers 4, keeps these modules in fp32.
    _keep_in_fp32_modules = ["vision_model", "abstractor"]

    def __init__(self, config: HoneybeeConfig):
        super().__init__(config)
        vc, pc = config.vision_config, config.projector_config
        self.vision_model = HoneybeeVisionModel(vc)
        self.abstractor = PROJECTOR_CLASSES[pc.projector_type](
            pc, config.vision_grid**2, vc.hidden_size, config.text_config.hidden_size
        )
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()
        if pc.projector_type == "d-abs":
            # The official D-Abstractor always ran in fp32: half-precision loads (dtype=...) keep it there.
            # Set after post_init, which resets this attribute from the class on transformers 4 and 5.
            self._keep_in_fp32_modules_strict = {"abstractor"}

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.language_model.set_output_embeddings(value)

    def get_decoder(self):
        return self.language_model.get_decoder()

    def get_image_features(self, pixel_values):
        """(num_images, 3, S, S) normalised pixels -> (num_images, M + n_eos, D) visual tokens for the LLM."""
        S = self.config.vision_config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, S, S):
            raise ValueError(
                f"pixel_values must have shape (num_images, 3, {S}, {S}), got {tuple(pixel_values.shape)}; "
                f"prepare images with HoneybeeProcessor, which resizes them to {S}x{S}"
            )
        features = self.vision_model(pixel_values, self.config.projector_config.feature_layer_index)  # (n, N, Cv)
        return self.abstractor(features)

    def merge_image_features(self, slots, inputs_embeds, pixel_values):
        """Overwrite the `<image>` placeholders (`slots`, (B, L) bool) of `inputs_embeds` with the projector
        outputs, in order."""
        M = self.config.num_visual_tokens
        placeholders, images = int(slots.sum()), pixel_values.shape[0]
        if placeholders != images * M:
            raise ValueError(
                f"the prompt holds {placeholders} image placeholder tokens ({placeholders / M:g} images of {M} "
                f"tokens) but {images} images were given; give one image per <image> and build the inputs "
                f"with HoneybeeProcessor, which expands each <image> into {M} placeholders"
            )
        features = self.get_image_features(pixel_values)  # (n_img, M, D)
        features = features.reshape(-1, features.shape[-1]).to(inputs_embeds.dtype)  # (n_img*M, D)
        return inputs_embeds.masked_scatter(slots[..., None].expand_as(inputs_embeds), features), features.view(
            images, M, -1
        )

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
        **kwargs,
    ):
        r"""`input_ids` hold `num_visual_tokens` placeholders per image (HoneybeeProcessor writes them) and
        `pixel_values` the images in order. `labels` work as in `LlamaForCausalLM` (-100 is ignored).
        """
        return_dict = kwargs.pop("return_dict", None)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        image_features = None
        if inputs_embeds is None:
            slots = input_ids == self.config.image_token_id
            inputs_embeds = self.get_input_embeddings()(input_ids)
            # Decoding steps carry no placeholders; transformers 4 still passes pixel_values to them.
            if slots.any():
                if pixel_values is None:
                    raise ValueError("input_ids hold <image> placeholders but no pixel_values were given")
                inputs_embeds, image_features = self.merge_image_features(slots, inputs_embeds, pixel_values)
        elif pixel_values is not None:
            raise ValueError("pixel_values need input_ids (to find the <image> placeholders), not inputs_embeds")
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            return_dict=True,
            **kwargs,
        )
        outputs = HoneybeeCausalLMOutputWithPast(
            loss=outputs.loss,
            logits=outputs.logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
        )
        return outputs if return_dict is not False else outputs.to_tuple()

    def prepare_inputs_for_generation(self, input_ids, pixel_values=None, **kwargs):
        # kwargs differ between transformers 4 (cache_position) and 5 (next_sequence_length): pass them through.
        model_inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        cache = kwargs.get("past_key_values")
        prefill = cache is None or cache.get_seq_length() == 0
        model_inputs["pixel_values"] = pixel_values if prefill else None
        return model_inputs


__all__ = ["HoneybeeForConditionalGeneration", "HoneybeePreTrainedModel"]
