"""Multi-scale deformable attention (Deformable DETR, arXiv 2010.04159, eq. 3), softmax fused in: the PyTorch
reference (the default path, and the specification), the Triton kernels, and `msda`, which picks one.

Shape letters: B batch, S value tokens, Q queries, nh heads, hd head dim, L levels, P points.

The kernel's semantics are `msda_reference`'s: bilinear sampling with align_corners=False (pixel centres at
(i + 0.5) / size, so a location `loc` samples at `loc * size - 0.5`), zeros outside the map, a softmax over the L*P
logits of each (query, head), and fp32 accumulation for fp16/bf16/fp32 inputs (fp64 for fp64 inputs, so gradcheck
works).

A "row" is one (batch, query, head): the layout of sampling_locations, attention_logits and the output. One
program owns BLOCK_R consecutive rows and all head-dim channels, so tiles are [BLOCK_R, BLOCK_D]; each row
gathers its head's channels (hd contiguous elements) at the four corners of every sampling point.
Backward: grad_loc and grad_logits belong to one row and point, so they are reduced over the head dim in
registers and stored; grad_value gets scattered to the four corners of every sample, so it is
`tl.atomic_add`ed into a zeroed fp32 (fp64) buffer and cast at the end (atomics make it non-deterministic,
like grid_sample's backward).
"""

import torch
import torch.nn.functional as F

from .kernels_common import (
    HAS_TRITON,
    KERNELS_INTERPRETED,
    accumulation_dtype,
    check_kernel_inputs,
    compute_dtype,
    define_custom_op,
    new_output,
    next_pow2,
    op_namespace,
    sm_count,
    tl,
    triton,
    use_triton,
)

OP_NAMESPACE = op_namespace(__file__)


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
    out_dtype, acc_dtype = value.dtype, accumulation_dtype(value)
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


# ---- Triton ------------------------------------------------------------------------------------------------


@triton.jit
def _msda_rows(pid, R, Q, NH: tl.constexpr, BLOCK_R: tl.constexpr):
    """Rows of this program: flat (b, q, head) index (int64), mask, batch and head of each row."""
    row = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = row < R
    row = tl.minimum(row, R - 1).to(tl.int64)  # masked lanes keep in-range addresses
    return row, row_mask, row // (Q * NH), row % NH


@triton.jit
def _msda_softmax(LOGITS, row, row_mask, LP: tl.constexpr, LP_PAD: tl.constexpr, CT: tl.constexpr):
    """Softmax over the L*P logits of each row: the weights as a [BLOCK_R, LP_PAD] tile."""
    cols = tl.arange(0, LP_PAD)
    mask = row_mask[:, None] & (cols[None, :] < LP)
    logits = tl.load(LOGITS + row[:, None] * LP + cols[None, :], mask=mask, other=0.0).to(CT)
    logits = tl.where(cols[None, :] < LP, logits, float("-inf"))  # padding columns get zero weight
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def _msda_column(tile, k: tl.constexpr, LP_PAD: tl.constexpr):
    """Column k of a [BLOCK_R, LP_PAD] register tile (Triton has no dynamic register indexing)."""
    cols = tl.arange(0, LP_PAD)
    return tl.sum(tl.where(cols[None, :] == k, tile, 0.0), axis=1)


@triton.jit
def _msda_bilinear_corners(
    LOC,
    SHAPES,
    row,
    row_mask,
    b,
    m,
    S,
    level: tl.constexpr,
    k: tl.constexpr,
    LP: tl.constexpr,
    NH: tl.constexpr,
    HD: tl.constexpr,
    d,
    d_mask,
    CT: tl.constexpr,
):
    """Everything about sampling point k (of `level`) of each row except the values.

    Returns the element offsets into value (B, S, nh, hd) and the masks of the four corners (top-left, top-right,
    bottom-left, bottom-right), the fractional offsets fx, fy, and the level's W, H. Corners outside the map
    are masked (two-sided bounds: zero padding) and their addresses clamped, so no lane points outside.
    """
    H = tl.load(SHAPES + 3 * level)
    W = tl.load(SHAPES + 3 * level + 1)
    start = tl.load(SHAPES + 3 * level + 2)
    x = tl.load(LOC + (row * LP + k) * 2, mask=row_mask, other=0.0).to(CT) * W - 0.5  # align_corners=False
    y = tl.load(LOC + (row * LP + k) * 2 + 1, mask=row_mask, other=0.0).to(CT) * H - 0.5
    # Far-away samples are clamped so floor() fits int32; at -2 or size+1 both corners are already outside,
    # so the value (zero) and the gradient (zero) do not change.
    x = tl.minimum(tl.maximum(x, -2.0), W + 1.0)
    y = tl.minimum(tl.maximum(y, -2.0), H + 1.0)
    x0f = tl.floor(x)
    y0f = tl.floor(y)
    x0 = x0f.to(tl.int32)
    y0 = y0f.to(tl.int32)
    x0_in = row_mask & (x0 >= 0) & (x0 < W)
    x1_in = row_mask & (x0 + 1 >= 0) & (x0 + 1 < W)
    y0_in = (y0 >= 0) & (y0 < H)
    y1_in = (y0 + 1 >= 0) & (y0 + 1 < H)
    x0c = tl.minimum(tl.maximum(x0, 0), W - 1)
    x1c = tl.minimum(tl.maximum(x0 + 1, 0), W - 1)
    y0c = tl.minimum(tl.maximum(y0, 0), H - 1) * W
    y1c = tl.minimum(tl.maximum(y0 + 1, 0), H - 1) * W
    base = (b * S + start) * NH + m  # [BLOCK_R] (token 0 of the level, head m)
    d2 = d[None, :]
    dm = d_mask[None, :]
    o00 = ((base + (y0c + x0c) * NH) * HD)[:, None] + d2
    o01 = ((base + (y0c + x1c) * NH) * HD)[:, None] + d2
    o10 = ((base + (y1c + x0c) * NH) * HD)[:, None] + d2
    o11 = ((base + (y1c + x1c) * NH) * HD)[:, None] + d2
    m00 = (y0_in & x0_in)[:, None] & dm
    m01 = (y0_in & x1_in)[:, None] & dm
    m10 = (y1_in & x0_in)[:, None] & dm
    m11 = (y1_in & x1_in)[:, None] & dm
    return o00, o01, o10, o11, m00, m01, m10, m11, x - x0f, y - y0f, W, H


@triton.jit
def _msda_load_corners(VALUE, o00, o01, o10, o11, m00, m01, m10, m11, CT: tl.constexpr):
    """The value rows at the four corners of a sampling point (zero where masked), upcast to CT right after the
    load: fp16/bf16 math runs in fp32 (the interpreter also needs it for bf16)."""
    v00 = tl.load(VALUE + o00, mask=m00, other=0.0).to(CT)
    v01 = tl.load(VALUE + o01, mask=m01, other=0.0).to(CT)
    v10 = tl.load(VALUE + o10, mask=m10, other=0.0).to(CT)
    v11 = tl.load(VALUE + o11, mask=m11, other=0.0).to(CT)
    return v00, v01, v10, v11


@triton.jit
def _msda_fwd_fused_softmax_bilinear(
    VALUE,
    SHAPES,
    LOC,
    LOGITS,
    OUT,
    R,
    Q,
    S,
    NH: tl.constexpr,
    HD: tl.constexpr,
    L: tl.constexpr,
    P: tl.constexpr,
    LP_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CT: tl.constexpr,
):
    row, row_mask, b, m = _msda_rows(tl.program_id(0), R, Q, NH, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HD
    attn = _msda_softmax(LOGITS, row, row_mask, L * P, LP_PAD, CT)  # [BLOCK_R, LP_PAD]
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=CT)
    for level in tl.static_range(L):
        for p in tl.static_range(P):
            k = level * P + p  # constexpr: both loops are static
            o00, o01, o10, o11, m00, m01, m10, m11, fx, fy, W, H = _msda_bilinear_corners(
                LOC, SHAPES, row, row_mask, b, m, S, level, k, L * P, NH, HD, d, d_mask, CT
            )
            v00, v01, v10, v11 = _msda_load_corners(VALUE, o00, o01, o10, o11, m00, m01, m10, m11, CT)
            top = v00 + (v01 - v00) * fx[:, None]
            bottom = v10 + (v11 - v10) * fx[:, None]
            acc += _msda_column(attn, k, LP_PAD)[:, None] * (top + (bottom - top) * fy[:, None])
    tl.store(
        OUT + row[:, None] * HD + d[None, :], acc.to(OUT.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :]
    )


@triton.jit
def _msda_bwd_fused_softmax_bilinear(
    GRAD_OUT,
    VALUE,
    SHAPES,
    LOC,
    LOGITS,
    GRAD_VALUE_ACC,
    GRAD_LOC,
    GRAD_LOGITS,
    R,
    Q,
    S,
    NH: tl.constexpr,
    HD: tl.constexpr,
    L: tl.constexpr,
    P: tl.constexpr,
    LP_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CT: tl.constexpr,
):
    row, row_mask, b, m = _msda_rows(tl.program_id(0), R, Q, NH, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HD
    cols = tl.arange(0, LP_PAD)
    attn = _msda_softmax(LOGITS, row, row_mask, L * P, LP_PAD, CT)  # [BLOCK_R, LP_PAD]
    go_mask = row_mask[:, None] & d_mask[None, :]
    go = tl.load(GRAD_OUT + row[:, None] * HD + d[None, :], mask=go_mask, other=0.0).to(CT)  # [BLOCK_R, BLOCK_D]
    grad_attn = tl.zeros((BLOCK_R, LP_PAD), dtype=CT)  # d loss / d softmax weight
    for level in tl.static_range(L):
        for p in tl.static_range(P):
            k = level * P + p  # constexpr: both loops are static
            o00, o01, o10, o11, m00, m01, m10, m11, fx, fy, W, H = _msda_bilinear_corners(
                LOC, SHAPES, row, row_mask, b, m, S, level, k, L * P, NH, HD, d, d_mask, CT
            )
            v00, v01, v10, v11 = _msda_load_corners(VALUE, o00, o01, o10, o11, m00, m01, m10, m11, CT)
            fx2 = fx[:, None]
            fy2 = fy[:, None]
            top = v00 + (v01 - v00) * fx2
            bottom = v10 + (v11 - v10) * fx2
            sample = top + (bottom - top) * fy2
            grad_attn = tl.where(cols[None, :] == k, tl.sum(go * sample, axis=1)[:, None], grad_attn)

            # d sample / d x = (1-fy)(v01-v00) + fy(v11-v10) and d sample / d y = bottom - top, with
            # x = loc_x * W - 0.5 and y = loc_y * H - 0.5
            grad_sample = go * _msda_column(attn, k, LP_PAD)[:, None]
            grad_x = tl.sum(grad_sample * ((v01 - v00) * (1.0 - fy2) + (v11 - v10) * fy2), axis=1)
            grad_y = tl.sum(grad_sample * (bottom - top), axis=1)
            loc_offs = (row * (L * P) + k) * 2
            tl.store(GRAD_LOC + loc_offs, (grad_x * W).to(GRAD_LOC.dtype.element_ty), mask=row_mask)
            tl.store(GRAD_LOC + loc_offs + 1, (grad_y * H).to(GRAD_LOC.dtype.element_ty), mask=row_mask)

            # scatter to the four corners; zero-padding corners are masked off
            tl.atomic_add(GRAD_VALUE_ACC + o00, grad_sample * ((1.0 - fy2) * (1.0 - fx2)), mask=m00)
            tl.atomic_add(GRAD_VALUE_ACC + o01, grad_sample * ((1.0 - fy2) * fx2), mask=m01)
            tl.atomic_add(GRAD_VALUE_ACC + o10, grad_sample * (fy2 * (1.0 - fx2)), mask=m10)
            tl.atomic_add(GRAD_VALUE_ACC + o11, grad_sample * (fy2 * fx2), mask=m11)

    # softmax backward: d logit_k = a_k * (g_k - sum_j a_j g_j)
    grad_logits = attn * (grad_attn - tl.sum(attn * grad_attn, axis=1)[:, None])
    lp_mask = row_mask[:, None] & (cols[None, :] < L * P)
    tl.store(
        GRAD_LOGITS + row[:, None] * (L * P) + cols[None, :], grad_logits.to(GRAD_LOGITS.dtype.element_ty), mask=lp_mask
    )


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


def _msda_tiles(rows, hd, device, backward=False):
    """(BLOCK_R, BLOCK_D, num_warps). Heuristic, not autotuned: autotuning cannot run on the CPU CI."""
    block_d = next_pow2(hd)
    if KERNELS_INTERPRETED:
        # the interpreter costs about the same per program and op whatever the tile: few, large programs
        return min(next_pow2(rows), max(1, (1 << 18) // block_d)), block_d, 4
    # GPU, 4 warps: a [BLOCK_R, BLOCK_D] fp32 tile is 16 registers per thread at 2048 elements; the backward keeps
    # about ten such tiles live (four corners, grad_out, interpolation terms), the forward about six
    max_rows = max(1, (1024 if backward else 2048) // block_d)
    # the largest row tile that still gives every SM two programs: at B=1 (the projector at inference,
    # 144 queries x 8 heads) that means small tiles to fill the machine
    sms = sm_count(device)
    block_r = 1
    while 2 * block_r <= max_rows and triton.cdiv(rows, 2 * block_r) >= 2 * sms:
        block_r *= 2
    return block_r, block_d, 4 if block_r * block_d >= 1024 else 2


def _msda_check(value, spatial_shapes, sampling_locations, attention_logits):
    """Validate in Python (tl.device_assert does nothing under the interpreter) and return the sizes."""
    check_kernel_inputs("msda", value, sampling_locations, attention_logits)
    L = len(spatial_shapes) // 2
    if L == 0 or len(spatial_shapes) % 2:
        raise ValueError(f"msda: spatial_shapes must hold (H, W) per level, got {spatial_shapes}")
    if value.dim() != 4 or sampling_locations.dim() != 6:
        raise ValueError(
            "msda: expected value (B, S, nh, hd) and sampling_locations (B, Q, nh, L, P, 2), "
            f"got {tuple(value.shape)} and {tuple(sampling_locations.shape)}"
        )
    B, S, nh, hd = value.shape
    Q, P = sampling_locations.shape[1], sampling_locations.shape[4]
    if S != sum(h * w for h, w in zip(spatial_shapes[0::2], spatial_shapes[1::2])):
        raise ValueError(f"msda: value has {S} tokens, the levels {spatial_shapes} hold a different number")
    if tuple(sampling_locations.shape) != (B, Q, nh, L, P, 2):
        raise ValueError(
            f"msda: sampling_locations must be {(B, Q, nh, L, P, 2)}, got {tuple(sampling_locations.shape)}"
        )
    if tuple(attention_logits.shape) != (B, Q, nh, L * P):
        raise ValueError(f"msda: attention_logits must be {(B, Q, nh, L * P)}, got {tuple(attention_logits.shape)}")
    return B, S, nh, hd, Q, L, P


def _msda_forward(
    value: torch.Tensor, spatial_shapes: list[int], sampling_locations: torch.Tensor, attention_logits: torch.Tensor
) -> torch.Tensor:
    B, S, nh, hd, Q, L, P = _msda_check(value, spatial_shapes, sampling_locations, attention_logits)
    value, loc, logits = value.contiguous(), sampling_locations.contiguous(), attention_logits.contiguous()
    out = new_output((B, Q, nh * hd), value.dtype, value.device)
    if out.numel() == 0:
        return out
    rows = B * Q * nh
    block_r, block_d, num_warps = _msda_tiles(rows, hd, value.device)
    _, ct = compute_dtype(value, loc, logits)
    _msda_fwd_fused_softmax_bilinear[(triton.cdiv(rows, block_r),)](
        value,
        _msda_level_table(spatial_shapes, value.device),
        loc,
        logits,
        out,
        rows,
        Q,
        S,
        NH=nh,
        HD=hd,
        L=L,
        P=P,
        LP_PAD=next_pow2(L * P),
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        CT=ct,
        num_warps=num_warps,
    )
    return out


def _msda_backward(
    grad_out: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: list[int],
    sampling_locations: torch.Tensor,
    attention_logits: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, S, nh, hd, Q, L, P = _msda_check(value, spatial_shapes, sampling_locations, attention_logits)
    value, loc, logits = value.contiguous(), sampling_locations.contiguous(), attention_logits.contiguous()
    grad_out = grad_out.contiguous()
    acc_dtype, ct = compute_dtype(value, loc, logits, grad_out)
    grad_value_acc = torch.zeros(value.shape, dtype=acc_dtype, device=value.device)  # atomics target
    grad_loc = new_output(loc.shape, loc.dtype, loc.device)
    grad_logits = new_output(logits.shape, logits.dtype, logits.device)
    if grad_logits.numel() == 0:
        return grad_value_acc.to(value.dtype), grad_loc, grad_logits
    rows = B * Q * nh
    block_r, block_d, num_warps = _msda_tiles(rows, hd, value.device, backward=True)
    _msda_bwd_fused_softmax_bilinear[(triton.cdiv(rows, block_r),)](
        grad_out,
        value,
        _msda_level_table(spatial_shapes, value.device),
        loc,
        logits,
        grad_value_acc,
        grad_loc,
        grad_logits,
        rows,
        Q,
        S,
        NH=nh,
        HD=hd,
        L=L,
        P=P,
        LP_PAD=next_pow2(L * P),
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        CT=ct,
        num_warps=num_warps,
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
    msda_backward_op = define_custom_op(OP_NAMESPACE, "msda_backward", _msda_backward, _msda_backward_fake)
    msda_op = define_custom_op(
        OP_NAMESPACE, "msda", _msda_forward, _msda_fake, _msda_autograd_backward, _msda_setup_context
    )


def msda_triton(value, spatial_shapes, sampling_locations, attention_logits):
    """Triton `msda_reference`: same arguments (spatial_shapes a list of (H, W)), same result, with autograd."""
    flat_shapes = [int(s) for hw in spatial_shapes for s in hw]
    return msda_op(value, flat_shapes, sampling_locations, attention_logits)


def msda_canned_case():
    """`kernel_backend="auto"`'s start-up check of `msda_triton`: two levels, a ragged head dim, samples inside, on
    the border and outside the maps, each at least 0.25 px from a pixel centre line (where grad_loc jumps)."""
    g = torch.Generator().manual_seed(0)
    shapes, nh, hd, Q, P = [(4, 5), (2, 3)], 2, 12, 5, 3
    value = torch.randn(2, sum(h * w for h, w in shapes), nh, hd, generator=g, dtype=torch.float64)
    sizes = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float64)[:, None, :]  # (L, 1, 2): x, y
    # sample at pixel coordinate `pixel + offset` (pixel centres at integers): pixel in [-1, size - 1]
    pixel = torch.randint(0, 64, (2, Q, nh, len(shapes), P, 2), generator=g) % (sizes.long() + 1) - 1
    offset = 0.25 + 0.5 * torch.rand(pixel.shape, generator=g, dtype=torch.float64)
    locations = (pixel + offset + 0.5) / sizes  # align_corners=False: coordinate = location * size - 0.5
    logits = torch.randn(2, Q, nh, len(shapes) * P, generator=g, dtype=torch.float64)
    return msda_triton, msda_reference, (value, shapes, locations, logits)


def msda(value, spatial_shapes, sampling_locations, attention_logits, backend="auto"):
    """`msda_reference` or `msda_triton`, as `backend` ("auto", "triton", "torch") and the tensors' device say."""
    if use_triton(backend, msda_canned_case, value, sampling_locations, attention_logits):
        return msda_triton(value, spatial_shapes, sampling_locations, attention_logits)
    return msda_reference(value, spatial_shapes, sampling_locations, attention_logits)
