"""Multi-scale deformable attention (Deformable DETR, arXiv 2010.04159, eq. 3) in Triton, softmax fused in.

Semantics are `msda_reference`'s: bilinear sampling with align_corners=False (pixel centres at (i + 0.5) / size,
so a location `loc` samples at `loc * size - 0.5`), zeros outside the map, a softmax over the L*P logits of each
(query, head), and fp32 accumulation for fp16/bf16/fp32 inputs (fp64 for fp64 inputs, so gradcheck works).

One program owns BLOCK_Q queries of one (batch, head) and all head-dim channels: tiles are [BLOCK_Q, BLOCK_D].
Backward: grad_loc and grad_logits belong to one (b, q, head, level, point) and are reduced over the head dim
in registers; grad_value gets scattered to the four corners of every sample, so it is `tl.atomic_add`ed into a
zeroed fp32 (fp64) buffer and cast at the end (atomics make it non-deterministic, like grid_sample's backward).
"""

import torch

from .common import HAS_TRITON, KERNELS_INTERPRETED, check_kernel_inputs, compute_dtype, define_custom_op, new_output, next_pow2, tl, triton


@triton.jit
def _msda_level(SHAPES, level: tl.constexpr):
    """(H, W, first token) of one level, from the int32 (L, 3) table."""
    return tl.load(SHAPES + 3 * level), tl.load(SHAPES + 3 * level + 1), tl.load(SHAPES + 3 * level + 2)


@triton.jit
def _msda_softmax(LOGITS, row, q_mask, LP: tl.constexpr, LP_PAD: tl.constexpr, CT: tl.constexpr):
    """Softmax over the L*P logits of each query row: returns the weights as a [BLOCK_Q, LP_PAD] tile."""
    cols = tl.arange(0, LP_PAD)
    mask = q_mask[:, None] & (cols[None, :] < LP)
    logits = tl.load(LOGITS + row[:, None] * LP + cols[None, :], mask=mask, other=0.0).to(CT)
    logits = tl.where(cols[None, :] < LP, logits, float("-inf"))  # padding columns get zero weight
    logits = logits - tl.max(logits, axis=1)[:, None]
    e = tl.exp(logits)
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def _msda_column(tile, k: tl.constexpr, LP_PAD: tl.constexpr):
    """Column k of a [BLOCK_Q, LP_PAD] register tile (Triton has no dynamic register indexing)."""
    cols = tl.arange(0, LP_PAD)
    return tl.sum(tl.where(cols[None, :] == k, tile, 0.0), axis=1)


@triton.jit
def _msda_sample_point(LOC, row, k: tl.constexpr, q_mask, H, W, LP: tl.constexpr, CT: tl.constexpr):
    """Bilinear set-up for sampling point k of each query: top-left corner and fractional offsets.

    Returns x0, y0 (int32 pixel indices of the top-left corner) and fx, fy (in [0, 1)).
    """
    loc_x = tl.load(LOC + (row * LP + k) * 2, mask=q_mask, other=0.0).to(CT)
    loc_y = tl.load(LOC + (row * LP + k) * 2 + 1, mask=q_mask, other=0.0).to(CT)
    x = loc_x * W - 0.5  # align_corners=False
    y = loc_y * H - 0.5
    # Far-away samples are clamped so floor() fits int32; at -2 or size+1 both corners are already outside,
    # so the value (zero) and the gradient (zero) do not change.
    x = tl.minimum(tl.maximum(x, -2.0), W + 1.0)
    y = tl.minimum(tl.maximum(y, -2.0), H + 1.0)
    x0f = tl.floor(x)
    y0f = tl.floor(y)
    return x0f.to(tl.int32), y0f.to(tl.int32), x - x0f, y - y0f


@triton.jit
def _msda_corner(b, m, start, yi, xi, H, W, S, NH: tl.constexpr, HD: tl.constexpr, d, d_mask, q_mask):
    """Element offsets [BLOCK_Q, BLOCK_D] into value (B, S, nh, hd) of one bilinear corner, and its mask.

    Two-sided bounds per corner (zero padding) and clamped addresses, so masked lanes never point outside.
    """
    inside = (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H) & q_mask
    xc = tl.minimum(tl.maximum(xi, 0), W - 1)
    yc = tl.minimum(tl.maximum(yi, 0), H - 1)
    token = (b * S + start + yc * W + xc).to(tl.int64)
    offs = (token * NH + m)[:, None] * HD + d[None, :]
    return offs, inside[:, None] & d_mask[None, :]


@triton.jit
def _msda_fwd_fused_softmax_bilinear(
    VALUE, SHAPES, LOC, LOGITS, OUT,
    Q, S,
    NH: tl.constexpr, HD: tl.constexpr, L: tl.constexpr, P: tl.constexpr, LP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, CT: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_bm = tl.program_id(1)
    b = pid_bm // NH
    m = pid_bm % NH
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < Q
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HD
    row = ((b * Q + q) * NH + m).to(tl.int64)  # (b, q, head) row of loc / logits / out

    attn = _msda_softmax(LOGITS, row, q_mask, L * P, LP_PAD, CT)  # [BLOCK_Q, LP_PAD]
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=CT)
    for level in tl.static_range(L):
        H, W, start = _msda_level(SHAPES, level)
        for p in tl.static_range(P):
            k: tl.constexpr = level * P + p
            x0, y0, fx, fy = _msda_sample_point(LOC, row, k, q_mask, H, W, L * P, CT)
            o00, m00 = _msda_corner(b, m, start, y0, x0, H, W, S, NH, HD, d, d_mask, q_mask)
            o01, m01 = _msda_corner(b, m, start, y0, x0 + 1, H, W, S, NH, HD, d, d_mask, q_mask)
            o10, m10 = _msda_corner(b, m, start, y0 + 1, x0, H, W, S, NH, HD, d, d_mask, q_mask)
            o11, m11 = _msda_corner(b, m, start, y0 + 1, x0 + 1, H, W, S, NH, HD, d, d_mask, q_mask)
            # upcast right after the load: fp16/bf16 math in fp32 (the interpreter also needs it for bf16)
            v00 = tl.load(VALUE + o00, mask=m00, other=0.0).to(CT)
            v01 = tl.load(VALUE + o01, mask=m01, other=0.0).to(CT)
            v10 = tl.load(VALUE + o10, mask=m10, other=0.0).to(CT)
            v11 = tl.load(VALUE + o11, mask=m11, other=0.0).to(CT)
            top = v00 + (v01 - v00) * fx[:, None]
            bottom = v10 + (v11 - v10) * fx[:, None]
            sample = top + (bottom - top) * fy[:, None]
            acc += _msda_column(attn, k, LP_PAD)[:, None] * sample
    out_offs = row[:, None] * HD + d[None, :]
    tl.store(OUT + out_offs, acc.to(OUT.dtype.element_ty), mask=q_mask[:, None] & d_mask[None, :])


@triton.jit
def _msda_bwd_fused_softmax_bilinear(
    GRAD_OUT, VALUE, SHAPES, LOC, LOGITS, GRAD_VALUE_ACC, GRAD_LOC, GRAD_LOGITS,
    Q, S,
    NH: tl.constexpr, HD: tl.constexpr, L: tl.constexpr, P: tl.constexpr, LP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, CT: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_bm = tl.program_id(1)
    b = pid_bm // NH
    m = pid_bm % NH
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < Q
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HD
    row = ((b * Q + q) * NH + m).to(tl.int64)
    cols = tl.arange(0, LP_PAD)

    attn = _msda_softmax(LOGITS, row, q_mask, L * P, LP_PAD, CT)  # [BLOCK_Q, LP_PAD]
    go_mask = q_mask[:, None] & d_mask[None, :]
    go = tl.load(GRAD_OUT + row[:, None] * HD + d[None, :], mask=go_mask, other=0.0).to(CT)  # [BLOCK_Q, BLOCK_D]
    grad_attn = tl.zeros((BLOCK_Q, LP_PAD), dtype=CT)  # d loss / d softmax weight
    for level in tl.static_range(L):
        H, W, start = _msda_level(SHAPES, level)
        for p in tl.static_range(P):
            k: tl.constexpr = level * P + p
            a = _msda_column(attn, k, LP_PAD)
            x0, y0, fx, fy = _msda_sample_point(LOC, row, k, q_mask, H, W, L * P, CT)
            o00, m00 = _msda_corner(b, m, start, y0, x0, H, W, S, NH, HD, d, d_mask, q_mask)
            o01, m01 = _msda_corner(b, m, start, y0, x0 + 1, H, W, S, NH, HD, d, d_mask, q_mask)
            o10, m10 = _msda_corner(b, m, start, y0 + 1, x0, H, W, S, NH, HD, d, d_mask, q_mask)
            o11, m11 = _msda_corner(b, m, start, y0 + 1, x0 + 1, H, W, S, NH, HD, d, d_mask, q_mask)
            v00 = tl.load(VALUE + o00, mask=m00, other=0.0).to(CT)
            v01 = tl.load(VALUE + o01, mask=m01, other=0.0).to(CT)
            v10 = tl.load(VALUE + o10, mask=m10, other=0.0).to(CT)
            v11 = tl.load(VALUE + o11, mask=m11, other=0.0).to(CT)
            fx2 = fx[:, None]
            fy2 = fy[:, None]
            top = v00 + (v01 - v00) * fx2
            bottom = v10 + (v11 - v10) * fx2
            sample = top + (bottom - top) * fy2
            grad_attn = tl.where(cols[None, :] == k, tl.sum(go * sample, axis=1)[:, None], grad_attn)

            # d sample / d x = (1-fy)(v01-v00) + fy(v11-v10), and x = loc_x * W - 0.5 (same for y)
            ga = go * a[:, None]  # d loss / d sample
            grad_x = tl.sum(ga * ((v01 - v00) * (1.0 - fy2) + (v11 - v10) * fy2), axis=1)
            grad_y = tl.sum(ga * (bottom - top), axis=1)
            loc_offs = (row * (L * P) + k) * 2
            tl.store(GRAD_LOC + loc_offs, (grad_x * W).to(GRAD_LOC.dtype.element_ty), mask=q_mask)
            tl.store(GRAD_LOC + loc_offs + 1, (grad_y * H).to(GRAD_LOC.dtype.element_ty), mask=q_mask)

            # scatter to the four corners; zero-padding corners are masked off
            tl.atomic_add(GRAD_VALUE_ACC + o00, ga * ((1.0 - fy2) * (1.0 - fx2)), mask=m00)
            tl.atomic_add(GRAD_VALUE_ACC + o01, ga * ((1.0 - fy2) * fx2), mask=m01)
            tl.atomic_add(GRAD_VALUE_ACC + o10, ga * (fy2 * (1.0 - fx2)), mask=m10)
            tl.atomic_add(GRAD_VALUE_ACC + o11, ga * (fy2 * fx2), mask=m11)

    # softmax backward: d logit_k = a_k * (g_k - sum_j a_j g_j)
    grad_logits = attn * (grad_attn - tl.sum(attn * grad_attn, axis=1)[:, None])
    lp_mask = q_mask[:, None] & (cols[None, :] < L * P)
    tl.store(GRAD_LOGITS + row[:, None] * (L * P) + cols[None, :], grad_logits.to(GRAD_LOGITS.dtype.element_ty), mask=lp_mask)


# ---- launch ------------------------------------------------------------------------------------------------


_MSDA_LEVEL_TABLES = {}


def _msda_level_table(spatial_shapes, device):
    """int32 (L, 3) table of (H, W, first token) per level, cached per device.

    Cached so that a call inside CUDA-graph capture (after a warm-up call) does no host-to-device copy.
    """
    key = (tuple(spatial_shapes), str(device))
    if key not in _MSDA_LEVEL_TABLES:
        rows, start = [], 0
        for h, w in zip(spatial_shapes[0::2], spatial_shapes[1::2]):
            rows.append((h, w, start))
            start += h * w
        _MSDA_LEVEL_TABLES[key] = torch.tensor(rows, dtype=torch.int32, device=device)
    return _MSDA_LEVEL_TABLES[key]


_SM_COUNTS = {}


def _sm_count(device):
    if device not in _SM_COUNTS:
        _SM_COUNTS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNTS[device]


def _msda_tiles(B, Q, nh, hd, device):
    """(BLOCK_Q, BLOCK_D, num_warps). Heuristic, not autotuned: autotuning cannot run on the CPU CI."""
    block_d = next_pow2(hd)
    if KERNELS_INTERPRETED:
        # the interpreter costs about the same per program whatever its size: few, large programs
        return min(next_pow2(Q), 1024), block_d, 4
    # GPU: the largest query tile that still gives every SM two programs; small B (the projector at B=1) needs
    # small tiles to fill the machine, large B can afford [64, hd] tiles
    sms = _sm_count(device)
    for block_q in (64, 32, 16, 8, 4):
        if B * nh * triton.cdiv(Q, block_q) >= 2 * sms:
            break
    return block_q, block_d, 4 if block_q * block_d >= 2048 else 2


def _msda_check(value, spatial_shapes, sampling_locations, attention_logits):
    check_kernel_inputs("msda", value, sampling_locations, attention_logits)
    B, S, nh, hd = value.shape
    L = len(spatial_shapes) // 2
    if len(spatial_shapes) != 2 * L or L == 0:
        raise ValueError(f"msda: spatial_shapes must hold (H, W) per level, got {spatial_shapes}")
    if S != sum(h * w for h, w in zip(spatial_shapes[0::2], spatial_shapes[1::2])):
        raise ValueError(f"msda: value has {S} tokens, the levels {spatial_shapes} hold a different number")
    if sampling_locations.dim() != 6 or sampling_locations.shape[:4] != (B, sampling_locations.shape[1], nh, L) or sampling_locations.shape[-1] != 2:
        raise ValueError(f"msda: sampling_locations must be (B, Q, nh, L, P, 2), got {tuple(sampling_locations.shape)}")
    Q, P = sampling_locations.shape[1], sampling_locations.shape[4]
    if attention_logits.shape != (B, Q, nh, L * P):
        raise ValueError(f"msda: attention_logits must be {(B, Q, nh, L * P)}, got {tuple(attention_logits.shape)}")
    return B, S, nh, hd, Q, L, P


def _msda_forward(value: torch.Tensor, spatial_shapes: list[int], sampling_locations: torch.Tensor, attention_logits: torch.Tensor) -> torch.Tensor:
    B, S, nh, hd, Q, L, P = _msda_check(value, spatial_shapes, sampling_locations, attention_logits)
    value, loc, logits = value.contiguous(), sampling_locations.contiguous(), attention_logits.contiguous()
    out = new_output((B, Q, nh * hd), value.dtype, value.device)
    block_q, block_d, num_warps = _msda_tiles(B, Q, nh, hd, value.device)
    _, ct = compute_dtype(value, loc, logits)
    grid = (triton.cdiv(Q, block_q), B * nh)
    _msda_fwd_fused_softmax_bilinear[grid](
        value, _msda_level_table(spatial_shapes, value.device), loc, logits, out, Q, S,
        NH=nh, HD=hd, L=L, P=P, LP_PAD=next_pow2(L * P), BLOCK_Q=block_q, BLOCK_D=block_d, CT=ct, num_warps=num_warps,
    )
    return out


def _msda_backward(grad_out: torch.Tensor, value: torch.Tensor, spatial_shapes: list[int], sampling_locations: torch.Tensor, attention_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, S, nh, hd, Q, L, P = _msda_check(value, spatial_shapes, sampling_locations, attention_logits)
    value, loc, logits = value.contiguous(), sampling_locations.contiguous(), attention_logits.contiguous()
    grad_out = grad_out.contiguous()
    acc_dtype, ct = compute_dtype(value, loc, logits, grad_out)
    grad_value_acc = torch.zeros(value.shape, dtype=acc_dtype, device=value.device)  # atomics target
    grad_loc = new_output(loc.shape, loc.dtype, loc.device)
    grad_logits = new_output(logits.shape, logits.dtype, logits.device)
    block_q, block_d, num_warps = _msda_tiles(B, Q, nh, hd, value.device)
    grid = (triton.cdiv(Q, block_q), B * nh)
    _msda_bwd_fused_softmax_bilinear[grid](
        grad_out, value, _msda_level_table(spatial_shapes, value.device), loc, logits,
        grad_value_acc, grad_loc, grad_logits, Q, S,
        NH=nh, HD=hd, L=L, P=P, LP_PAD=next_pow2(L * P), BLOCK_Q=block_q, BLOCK_D=block_d, CT=ct, num_warps=num_warps,
    )
    return grad_value_acc.to(value.dtype), grad_loc, grad_logits


def _msda_fake(value, spatial_shapes, sampling_locations, attention_logits):
    B, _, nh, hd = value.shape
    return value.new_empty((B, sampling_locations.shape[1], nh * hd))


def _msda_backward_fake(grad_out, value, spatial_shapes, sampling_locations, attention_logits):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_logits)


def _msda_setup_context(ctx, inputs, output):
    value, spatial_shapes, sampling_locations, attention_logits = inputs
    ctx.save_for_backward(value, sampling_locations, attention_logits)
    ctx.spatial_shapes = spatial_shapes


def _msda_autograd_backward(ctx, grad_out):
    value, sampling_locations, attention_logits = ctx.saved_tensors
    grads = msda_backward_op(grad_out, value, ctx.spatial_shapes, sampling_locations, attention_logits)
    return grads[0], None, grads[1], grads[2]


if HAS_TRITON:
    msda_backward_op = define_custom_op("honeybee::msda_backward", _msda_backward, _msda_backward_fake)
    msda_op = define_custom_op(
        "honeybee::msda", _msda_forward, _msda_fake, _msda_autograd_backward, _msda_setup_context
    )


def msda_triton(value, spatial_shapes, sampling_locations, attention_logits):
    """Triton `msda_reference`: same arguments (spatial_shapes a list of (H, W)), same result, with autograd."""
    flat_shapes = [int(s) for hw in spatial_shapes for s in hw]
    return msda_op(value, flat_shapes, sampling_locations, attention_logits)
