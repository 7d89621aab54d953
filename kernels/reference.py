"""PyTorch references for the projector kernels: the default path, and the specification of the Triton one.

Every op works on token-major tensors (B, N, C) with N = h*w in row-major order, which is how CLIP hands
the features over; a 1x1 convolution is then a plain `F.linear` and a channel LayerNorm needs no permute.

Shape letters: B batch, N = h*w tokens, C channels, Q queries, nh heads, hd head dim, L levels, P points.
"""

import torch
import torch.nn.functional as F


def _accumulation_dtype(t):
    """fp32 for fp16/bf16/fp32 inputs, fp64 for fp64 inputs (so the references double as fp64 references)."""
    return torch.promote_types(t.dtype, torch.float32)


def msda_reference(value, spatial_shapes, sampling_locations, attention_logits):
    """Multi-scale deformable attention (Deformable DETR, arXiv 2010.04159, eq. 3) with the softmax fused in.

    value:              (B, S, nh, hd), S = sum of H_l*W_l, levels stacked in order, each row-major
    spatial_shapes:     list of (H_l, W_l) python ints
    sampling_locations: (B, Q, nh, L, P, 2), (x, y) normalised to [0, 1]; outside samples read zeros
    attention_logits:   (B, Q, nh, L*P), softmax over L*P per head
    returns             (B, Q, nh*hd), accumulated in fp32 (fp64 for fp64 value), in value's dtype
    """
    B, S, nh, hd = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    out_dtype, acc_dtype = value.dtype, _accumulation_dtype(value)
    value, sampling_locations = value.to(acc_dtype), sampling_locations.to(acc_dtype)
    weights = attention_logits.to(acc_dtype).softmax(-1).view(B, Q, nh, L, P)
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    sizes = [h * w for h, w in spatial_shapes]
    sampled = []
    for level, (v, (h, w)) in enumerate(zip(value.split(sizes, dim=1), spatial_shapes)):
        v = v.permute(0, 2, 3, 1).reshape(B * nh, hd, h, w)  # (B*nh, hd, H_l, W_l)
        g = grids[:, :, :, level].transpose(1, 2).reshape(B * nh, Q, P, 2)  # (B*nh, Q, P, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    sampled = torch.stack(sampled, dim=-2)  # (B*nh, hd, Q, L, P)
    w = weights.transpose(1, 2).reshape(B * nh, 1, Q, L, P)
    out = (sampled * w).sum((-2, -1))  # (B*nh, hd, Q)
    return out.view(B, nh * hd, Q).transpose(1, 2).to(out_dtype).contiguous()  # (B, Q, nh*hd)


def cabs_dwconv_block_reference(x, h, w, ln1_weight, ln1_bias, dw_weight, ln2_weight, ln2_bias, eps):
    """The middle of a RegNet bottleneck: SiLU(LN1(x)) -> depthwise 3x3 -> SiLU(LN2(.)), plus the SE mean.

    x: (B, N, C) the conv1 output before its norm; dw_weight: (C, 1, 3, 3).
    returns y (B, N, C) in x's dtype, and se_mean (B, C) = mean of y over the tokens, in fp32 (fp64 for fp64 x).
    """
    B, N, C = x.shape
    t = F.silu(F.layer_norm(x, (C,), ln1_weight, ln1_bias, eps))
    t = t.reshape(B, h, w, C).permute(0, 3, 1, 2)  # (B, N, C) -> (B, C, h, w), a channels-last view: no copy
    t = F.conv2d(t, dw_weight, padding=1, groups=C)
    t = t.permute(0, 2, 3, 1).reshape(B, N, C)  # (B, C, h, w) -> (B, N, C), a view: the conv kept channels-last
    y = F.silu(F.layer_norm(t, (C,), ln2_weight, ln2_bias, eps))
    return y, y.to(_accumulation_dtype(y)).mean(1)


def ln_residual_silu_reference(y, weight, bias, residual, eps):
    """The end of a RegNet bottleneck: SiLU(LN(y) + residual), all (B, N, C)."""
    return F.silu(F.layer_norm(y, (y.shape[-1],), weight, bias, eps) + residual)


def adaptive_avg_pool_reference(x, h, w, out_h, out_w):
    """`nn.AdaptiveAvgPool2d` on token-major input, with PyTorch's (possibly overlapping) windows.

    x: (B, h*w, C) -> (B, out_h*out_w, C)
    """
    B, N, C = x.shape
    t = x.reshape(B, h, w, C).permute(0, 3, 1, 2)  # (B, C, h, w), a channels-last view
    return F.adaptive_avg_pool2d(t, (out_h, out_w)).permute(0, 2, 3, 1).reshape(B, out_h * out_w, C)  # (B, M, C)


def ln_residual_silu_pool_reference(y, weight, bias, residual, eps, h, w, out_h, out_w):
    """`ln_residual_silu` followed by `adaptive_avg_pool`: the end of the last block before the pool, fused."""
    return adaptive_avg_pool_reference(ln_residual_silu_reference(y, weight, bias, residual, eps), h, w, out_h, out_w)
