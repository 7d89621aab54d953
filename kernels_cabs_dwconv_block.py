"""C-Abstractor (Honeybee, arXiv 2312.06742 §3.2) fusion of the memory-bound middle of a RegNet bottleneck:
`cabs_dwconv_block` = SiLU(LN1(x)) -> depthwise 3x3 (zero padding 1) -> SiLU(LN2(.)), plus the SE mean over
tokens. A PyTorch reference (the default path, and the specification), the Triton kernels, and the entry point that
picks one.

Token-major tensors (B, N = h*w, C) with row-major tokens, as CLIP hands the features over; the 1x1 convolutions
around this op are plain `F.linear` GEMMs outside it. A program owns BLOCK_T tokens x all C channels; each of the 9
taps reloads its neighbour tokens and re-applies LN1+SiLU (compute is cheap here, memory traffic is not).

Kernel math is fp32 for fp16/bf16/fp32 inputs and fp64 for fp64 inputs (`CT`); every load is upcast right away.
Backward recomputes the normalisations from the saved inputs. Per-channel reductions over tokens (SE mean, weight
gradients) are per-program partial rows with plain stores, finished by a `.sum`: no atomics anywhere, so every result
is deterministic.
"""

import torch
import torch.nn.functional as F

from .kernels_common import (
    HAS_TRITON,
    KERNELS_INTERPRETED,
    accumulation_dtype,
    cabs_check_tokens,
    cabs_layer_norm,
    cabs_layer_norm_backward,
    cabs_load_rows,
    cabs_silu_grad,
    cabs_store_rows,
    cabs_tiles,
    cabs_tiles_per_program,
    cabs_token_tile,
    cabs_weight_grads,
    canned_norm,
    canned_tensors,
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


# ---- PyTorch reference --------------------------------------------------------------------------------------------


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
    return y, y.to(accumulation_dtype(y)).mean(1)


# ---- Triton kernels -----------------------------------------------------------------------------------------------


@triton.jit
def _cabs_neighbour(r, col, dy: tl.constexpr, dx: tl.constexpr, t_mask, h, w):
    """Token at (r + dy, col + dx), clamped into the image, and whether it is inside (zero padding otherwise)."""
    nr = r + dy
    nc = col + dx
    inside = t_mask & (nr >= 0) & (nr < h) & (nc >= 0) & (nc < w)
    token = tl.minimum(tl.maximum(nr, 0), h - 1) * w + tl.minimum(tl.maximum(nc, 0), w - 1)
    return token, inside


@triton.jit
def _cabs_ln1_silu_at(X, b, token, inside, N, c, c_mask, C, w1, b1, eps, CT: tl.constexpr):
    """SiLU(LN1(x)) at the given tokens, zero outside the image: the depthwise conv's zero-padded input."""
    x = cabs_load_rows(X, b, token, inside, N, c, c_mask, C, CT)
    u, _, _, _ = cabs_layer_norm(x, w1, b1, c_mask, C, eps)
    return tl.where(inside[:, None], u * tl.sigmoid(u), 0.0)


@triton.jit
def _cabs_dwconv3x3_of_ln1_silu(
    X,
    DW,
    b,
    r,
    col,
    t_mask,
    h,
    w,
    N,
    c,
    c_mask,
    C,
    w1,
    b1,
    eps,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    CT: tl.constexpr,
):
    """z = depthwise3x3(SiLU(LN1(x))) for a tile of tokens: [BLOCK_T, BLOCK_C]."""
    z = tl.zeros((BLOCK_T, BLOCK_C), dtype=CT)
    for tap in tl.static_range(9):
        token, inside = _cabs_neighbour(r, col, tap // 3 - 1, tap % 3 - 1, t_mask, h, w)
        a = _cabs_ln1_silu_at(X, b, token, inside, N, c, c_mask, C, w1, b1, eps, CT)
        z += a * tl.load(DW + c * 9 + tap, mask=c_mask, other=0.0).to(CT)[None, :]
    return z


@triton.jit
def _cabs_ln_silu_dwconv3x3_ln_silu_sepool_fwd(
    X,
    LN1_W,
    LN1_B,
    DW,
    LN2_W,
    LN2_B,
    Y,
    SE_PARTIAL,
    N,
    h,
    w,
    C,
    eps,
    TILES,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    CT: tl.constexpr,
):
    """y = SiLU(LN2(dw3x3(SiLU(LN1(x))))) for TILES token tiles of image b; SE_PARTIAL[b, pid] = sum of y / N."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    c = tl.arange(0, BLOCK_C)
    c_mask = c < C
    w1 = tl.load(LN1_W + c, mask=c_mask, other=0.0).to(CT)
    b1 = tl.load(LN1_B + c, mask=c_mask, other=0.0).to(CT)
    w2 = tl.load(LN2_W + c, mask=c_mask, other=0.0).to(CT)
    b2 = tl.load(LN2_B + c, mask=c_mask, other=0.0).to(CT)
    se = tl.zeros((BLOCK_C,), dtype=CT)
    for tile in range(pid * TILES, tl.minimum((pid + 1) * TILES, tl.cdiv(N, BLOCK_T))):
        t, t_mask, r, col = cabs_token_tile(tile, N, w, BLOCK_T)
        z = _cabs_dwconv3x3_of_ln1_silu(
            X, DW, b, r, col, t_mask, h, w, N, c, c_mask, C, w1, b1, eps, BLOCK_T, BLOCK_C, CT
        )
        v, _, _, _ = cabs_layer_norm(z, w2, b2, c_mask, C, eps)
        y = v * tl.sigmoid(v)
        cabs_store_rows(Y, b, t, t_mask, N, c, c_mask, C, y)
        se += tl.sum(tl.where(t_mask[:, None], y, 0.0), axis=0)
    tl.store(SE_PARTIAL + (b * tl.num_programs(0) + pid) * C + c, se / N, mask=c_mask)


@triton.jit
def _cabs_dwconv_ln_silu_sepool_bwd_to_conv_out(
    GRAD_Y,
    GRAD_SE,
    X,
    LN1_W,
    LN1_B,
    DW,
    LN2_W,
    LN2_B,
    GRAD_Z,
    PARTIAL,
    N,
    h,
    w,
    C,
    eps,
    TILES,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    CT: tl.constexpr,
):
    """Backward, part 1: d loss / d z (z = the depthwise conv output) through LN2, SiLU and the SE mean.

    Recomputes z from x. PARTIAL[b * programs + pid] rows: 0 = d ln2_weight, 1 = d ln2_bias.
    """
    pid = tl.program_id(0)
    b = tl.program_id(1)
    c = tl.arange(0, BLOCK_C)
    c_mask = c < C
    w1 = tl.load(LN1_W + c, mask=c_mask, other=0.0).to(CT)
    b1 = tl.load(LN1_B + c, mask=c_mask, other=0.0).to(CT)
    w2 = tl.load(LN2_W + c, mask=c_mask, other=0.0).to(CT)
    b2 = tl.load(LN2_B + c, mask=c_mask, other=0.0).to(CT)
    # every token receives 1/N of the SE mean's gradient
    grad_se = tl.load(GRAD_SE + b * C + c, mask=c_mask, other=0.0).to(CT) / N
    grad_w2 = tl.zeros((BLOCK_C,), dtype=CT)
    grad_b2 = tl.zeros((BLOCK_C,), dtype=CT)
    for tile in range(pid * TILES, tl.minimum((pid + 1) * TILES, tl.cdiv(N, BLOCK_T))):
        t, t_mask, r, col = cabs_token_tile(tile, N, w, BLOCK_T)
        z = _cabs_dwconv3x3_of_ln1_silu(
            X, DW, b, r, col, t_mask, h, w, N, c, c_mask, C, w1, b1, eps, BLOCK_T, BLOCK_C, CT
        )
        v, xhat2, _, rstd2 = cabs_layer_norm(z, w2, b2, c_mask, C, eps)
        grad_y = cabs_load_rows(GRAD_Y, b, t, t_mask, N, c, c_mask, C, CT) + grad_se[None, :]
        grad_v = tl.where(t_mask[:, None], grad_y * cabs_silu_grad(v), 0.0)
        cabs_store_rows(GRAD_Z, b, t, t_mask, N, c, c_mask, C, cabs_layer_norm_backward(grad_v, xhat2, rstd2, w2, C))
        grad_w2 += tl.sum(grad_v * xhat2, axis=0)
        grad_b2 += tl.sum(grad_v, axis=0)
    row = (b * tl.num_programs(0) + pid) * 2
    tl.store(PARTIAL + row * C + c, grad_w2, mask=c_mask)
    tl.store(PARTIAL + (row + 1) * C + c, grad_b2, mask=c_mask)


@triton.jit
def _cabs_ln_silu_dwconv3x3_bwd_to_input(
    GRAD_Z,
    X,
    LN1_W,
    LN1_B,
    DW,
    GRAD_X,
    LN1_STATS,
    N,
    h,
    w,
    C,
    eps,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    CT: tl.constexpr,
):
    """Backward, part 2: d loss / d x through the depthwise conv (its transpose: taps mirrored), SiLU and LN1.

    With z[t] = sum_tap dw[tap] * a[t + d_tap]: d a[s] = sum_tap dw[tap] * dz[s - d_tap]. Also stores LN1's
    (mean, rstd) per token for part 3.
    """
    b = tl.program_id(1)
    s, s_mask, r, col = cabs_token_tile(tl.program_id(0), N, w, BLOCK_T)
    c = tl.arange(0, BLOCK_C)
    c_mask = c < C
    w1 = tl.load(LN1_W + c, mask=c_mask, other=0.0).to(CT)
    b1 = tl.load(LN1_B + c, mask=c_mask, other=0.0).to(CT)
    x = cabs_load_rows(X, b, s, s_mask, N, c, c_mask, C, CT)
    u, xhat1, mean1, rstd1 = cabs_layer_norm(x, w1, b1, c_mask, C, eps)
    stats = (b * N + s).to(tl.int64) * 2
    tl.store(LN1_STATS + stats, mean1, mask=s_mask)
    tl.store(LN1_STATS + stats + 1, rstd1, mask=s_mask)

    grad_a = tl.zeros((BLOCK_T, BLOCK_C), dtype=CT)
    for tap in tl.static_range(9):
        token, inside = _cabs_neighbour(r, col, 1 - tap // 3, 1 - tap % 3, s_mask, h, w)  # s - d_tap
        grad_z = cabs_load_rows(GRAD_Z, b, token, inside, N, c, c_mask, C, CT)
        grad_a += grad_z * tl.load(DW + c * 9 + tap, mask=c_mask, other=0.0).to(CT)[None, :]
    grad_x = cabs_layer_norm_backward(grad_a * cabs_silu_grad(u), xhat1, rstd1, w1, C)
    cabs_store_rows(GRAD_X, b, s, s_mask, N, c, c_mask, C, grad_x)


@triton.jit
def _cabs_dwconv_ln1_weight_grads(
    GRAD_Z,
    X,
    LN1_STATS,
    LN1_W,
    LN1_B,
    DW,
    PARTIAL,
    N,
    h,
    w,
    C,
    TOTAL,
    TOKENS_PER_CHUNK,
    BLOCK_T: tl.constexpr,
    BLOCK_CW: tl.constexpr,
    CT: tl.constexpr,
):
    """Backward, part 3: gradients of the depthwise weights and of LN1's weight and bias, for a block of BLOCK_CW
    channels summed over one chunk of the B*N tokens (all images), written as PARTIAL[chunk] rows
    0..8 = d dw taps, 9 = d ln1_weight, 10 = d ln1_bias.

    d dw[tap] = sum_s a[s] * dz[s - d_tap] and d a[s] = sum_tap dw[tap] * dz[s - d_tap] are channel-wise, so
    with LN1's row statistics from part 2 a program needs only its channels. The 9 taps are the middle axis
    of a [BLOCK_T, 16, BLOCK_CW] tile (padded to 16), which keeps all 9 tap sums in one register tile.
    """
    pid_c = tl.program_id(0)
    chunk = tl.program_id(1)
    c = pid_c * BLOCK_CW + tl.arange(0, BLOCK_CW)
    c_mask = c < C
    taps = tl.arange(0, 16)
    tap_ok = taps < 9
    dy = taps // 3 - 1
    dx = taps % 3 - 1
    dw = tl.load(DW + c[None, :] * 9 + taps[:, None], mask=tap_ok[:, None] & c_mask[None, :], other=0.0).to(
        CT
    )  # [16, BLOCK_CW]
    w1 = tl.load(LN1_W + c, mask=c_mask, other=0.0).to(CT)
    b1 = tl.load(LN1_B + c, mask=c_mask, other=0.0).to(CT)

    grad_dw = tl.zeros((16, BLOCK_CW), dtype=CT)
    grad_w1 = tl.zeros((BLOCK_CW,), dtype=CT)
    grad_b1 = tl.zeros((BLOCK_CW,), dtype=CT)
    end = tl.minimum((chunk + 1) * TOKENS_PER_CHUNK, TOTAL)
    for first in range(chunk * TOKENS_PER_CHUNK, end, BLOCK_T):
        g = first + tl.arange(0, BLOCK_T)  # flat (b, token) index
        g_mask = g < end
        g = tl.minimum(g, TOTAL - 1)
        b = g // N
        r = (g % N) // w
        col = g % w
        x = tl.load(X + g.to(tl.int64)[:, None] * C + c[None, :], mask=g_mask[:, None] & c_mask[None, :], other=0.0).to(
            CT
        )
        mean1 = tl.load(LN1_STATS + g.to(tl.int64) * 2, mask=g_mask, other=0.0)
        rstd1 = tl.load(LN1_STATS + g.to(tl.int64) * 2 + 1, mask=g_mask, other=0.0)
        xhat1 = (x - mean1[:, None]) * rstd1[:, None]
        u = xhat1 * w1[None, :] + b1[None, :]
        a = u * tl.sigmoid(u)

        # dz at s - d_tap for every tap: [BLOCK_T, 16, BLOCK_CW], zero outside the image
        nr = r[:, None] - dy[None, :]
        nc = col[:, None] - dx[None, :]
        inside = g_mask[:, None] & tap_ok[None, :] & (nr >= 0) & (nr < h) & (nc >= 0) & (nc < w)
        token = b[:, None] * N + tl.minimum(tl.maximum(nr, 0), h - 1) * w + tl.minimum(tl.maximum(nc, 0), w - 1)
        offs = token.to(tl.int64)[:, :, None] * C + c[None, None, :]
        grad_z = tl.load(GRAD_Z + offs, mask=inside[:, :, None] & c_mask[None, None, :], other=0.0).to(CT)

        grad_dw += tl.sum(a[:, None, :] * grad_z, axis=0)
        grad_u = tl.sum(grad_z * dw[None, :, :], axis=1) * cabs_silu_grad(u)  # rows outside the chunk: grad_z = 0
        grad_w1 += tl.sum(grad_u * xhat1, axis=0)
        grad_b1 += tl.sum(grad_u, axis=0)
    rows = chunk * 11
    tl.store(PARTIAL + (rows + taps[:, None]) * C + c[None, :], grad_dw, mask=tap_ok[:, None] & c_mask[None, :])
    tl.store(PARTIAL + (rows + 9) * C + c, grad_w1, mask=c_mask)
    tl.store(PARTIAL + (rows + 10) * C + c, grad_b1, mask=c_mask)


# ---- launch -------------------------------------------------------------------------------------------------------


def _cabs_weight_grad_launch(C, total_tokens, device):
    """(BLOCK_T, BLOCK_CW, chunks, tokens per chunk, num_warps) of the channel-blocked weight-gradient kernel."""
    if KERNELS_INTERPRETED:
        block_cw = next_pow2(C)
        block_t = max(1, min(next_pow2(total_tokens), (1 << 20) // (16 * block_cw)))
        return block_t, block_cw, 1, total_tokens, 4
    block_t, block_cw = 8, min(32, next_pow2(C))  # [8, 16, 32] tap tile: 32 fp32 registers per thread
    chunks = max(1, min(triton.cdiv(total_tokens, 64), (4 * sm_count(device)) // triton.cdiv(C, block_cw)))
    per_chunk = triton.cdiv(triton.cdiv(total_tokens, chunks), block_t) * block_t
    return block_t, block_cw, triton.cdiv(total_tokens, per_chunk), per_chunk, 4


def _cabs_dwconv_block_forward(
    x: torch.Tensor,
    h: int,
    w: int,
    ln1_weight: torch.Tensor,
    ln1_bias: torch.Tensor,
    dw_weight: torch.Tensor,
    ln2_weight: torch.Tensor,
    ln2_bias: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_kernel_inputs("cabs_dwconv_block", x, ln1_weight, ln1_bias, dw_weight, ln2_weight, ln2_bias)
    cabs_check_tokens("cabs_dwconv_block", x, h, w)
    B, N, C = x.shape
    x = x.contiguous()
    acc_dtype, ct = compute_dtype(x)
    block_t, block_c, num_warps = cabs_tiles(N, C, live_tiles=4)
    tiles, programs = cabs_tiles_per_program(N, block_t, B, x.device)
    y = new_output((B, N, C), x.dtype, x.device)
    se_partial = new_output((B, programs, C), acc_dtype, x.device)
    _cabs_ln_silu_dwconv3x3_ln_silu_sepool_fwd[(programs, B)](
        x,
        ln1_weight.contiguous(),
        ln1_bias.contiguous(),
        dw_weight.reshape(C, 9).contiguous(),
        ln2_weight.contiguous(),
        ln2_bias.contiguous(),
        y,
        se_partial,
        N,
        h,
        w,
        C,
        eps,
        tiles,
        BLOCK_T=block_t,
        BLOCK_C=block_c,
        CT=ct,
        num_warps=num_warps,
    )
    return y, se_partial.sum(1)


def _cabs_dwconv_block_backward(
    grad_y: torch.Tensor,
    grad_se_mean: torch.Tensor,
    x: torch.Tensor,
    h: int,
    w: int,
    ln1_weight: torch.Tensor,
    ln1_bias: torch.Tensor,
    dw_weight: torch.Tensor,
    ln2_weight: torch.Tensor,
    ln2_bias: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_kernel_inputs(
        "cabs_dwconv_block", x, grad_y, grad_se_mean, ln1_weight, ln1_bias, dw_weight, ln2_weight, ln2_bias
    )
    B, N, C = x.shape
    x, grad_y, grad_se_mean = x.contiguous(), grad_y.contiguous(), grad_se_mean.contiguous()
    w1, b1, w2, b2 = (p.contiguous() for p in (ln1_weight, ln1_bias, ln2_weight, ln2_bias))
    dw = dw_weight.reshape(C, 9).contiguous()
    acc_dtype, ct = compute_dtype(x, grad_y)

    # part 1: d loss / d (depthwise conv output), kept in fp32, and the LN2 weight gradients
    block_t, block_c, num_warps = cabs_tiles(N, C, live_tiles=6)
    tiles, programs = cabs_tiles_per_program(N, block_t, B, x.device)
    grad_z = new_output((B, N, C), acc_dtype, x.device)
    partial_ln2 = new_output((B * programs, 2, C), acc_dtype, x.device)
    _cabs_dwconv_ln_silu_sepool_bwd_to_conv_out[(programs, B)](
        grad_y,
        grad_se_mean,
        x,
        w1,
        b1,
        dw,
        w2,
        b2,
        grad_z,
        partial_ln2,
        N,
        h,
        w,
        C,
        eps,
        tiles,
        BLOCK_T=block_t,
        BLOCK_C=block_c,
        CT=ct,
        num_warps=num_warps,
    )
    # part 2: d loss / d x, and LN1's row statistics for part 3
    grad_x = new_output((B, N, C), x.dtype, x.device)
    ln1_stats = new_output((B * N, 2), acc_dtype, x.device)
    _cabs_ln_silu_dwconv3x3_bwd_to_input[(triton.cdiv(N, block_t), B)](
        grad_z,
        x,
        w1,
        b1,
        dw,
        grad_x,
        ln1_stats,
        N,
        h,
        w,
        C,
        eps,
        BLOCK_T=block_t,
        BLOCK_C=block_c,
        CT=ct,
        num_warps=num_warps,
    )
    # part 3: depthwise and LN1 weight gradients, channel-blocked
    block_tw, block_cw, chunks, per_chunk, warps_w = _cabs_weight_grad_launch(C, B * N, x.device)
    partial_ln1_dw = new_output((chunks, 11, C), acc_dtype, x.device)
    _cabs_dwconv_ln1_weight_grads[(triton.cdiv(C, block_cw), chunks)](
        grad_z,
        x,
        ln1_stats,
        w1,
        b1,
        dw,
        partial_ln1_dw,
        N,
        h,
        w,
        C,
        B * N,
        per_chunk,
        BLOCK_T=block_tw,
        BLOCK_CW=block_cw,
        CT=ct,
        num_warps=warps_w,
    )
    grad_ln2_weight, grad_ln2_bias = cabs_weight_grads(partial_ln2, (0, 1), (ln2_weight, ln2_bias))
    grad_ln1_weight, grad_ln1_bias = cabs_weight_grads(partial_ln1_dw, (9, 10), (ln1_weight, ln1_bias))
    grad_dw = (
        partial_ln1_dw[:, :9].sum(0).t().contiguous().view(dw_weight.shape).to(dw_weight.dtype)
    )  # (9, C) -> (C, 1, 3, 3)
    return grad_x, grad_ln1_weight, grad_ln1_bias, grad_dw, grad_ln2_weight, grad_ln2_bias


def _cabs_dwconv_block_fake(x, h, w, ln1_weight, ln1_bias, dw_weight, ln2_weight, ln2_bias, eps):
    return torch.empty_like(x), x.new_empty((x.shape[0], x.shape[2]), dtype=accumulation_dtype(x))


def _cabs_dwconv_block_backward_fake(
    grad_y, grad_se_mean, x, h, w, ln1_weight, ln1_bias, dw_weight, ln2_weight, ln2_bias, eps
):
    return tuple(torch.empty_like(t) for t in (x, ln1_weight, ln1_bias, dw_weight, ln2_weight, ln2_bias))


def _cabs_dwconv_block_setup_context(ctx, inputs, output):
    x, h, w, ln1_weight, ln1_bias, dw_weight, ln2_weight, ln2_bias, eps = inputs
    ctx.save_for_backward(x, ln1_weight, ln1_bias, dw_weight, ln2_weight, ln2_bias)
    ctx.h, ctx.w, ctx.eps = h, w, eps


def _cabs_dwconv_block_autograd_backward(ctx, grad_y, grad_se_mean):
    x, ln1_weight, ln1_bias, dw_weight, ln2_weight, ln2_bias = ctx.saved_tensors
    grads = cabs_dwconv_block_backward_op(
        grad_y, grad_se_mean, x, ctx.h, ctx.w, ln1_weight, ln1_bias, dw_weight, ln2_weight, ln2_bias, ctx.eps
    )
    grad_x, grad_ln1_weight, grad_ln1_bias, grad_dw, grad_ln2_weight, grad_ln2_bias = grads
    return grad_x, None, None, grad_ln1_weight, grad_ln1_bias, grad_dw, grad_ln2_weight, grad_ln2_bias, None


if HAS_TRITON:
    cabs_dwconv_block_backward_op = define_custom_op(
        OP_NAMESPACE, "cabs_dwconv_block_backward", _cabs_dwconv_block_backward, _cabs_dwconv_block_backward_fake
    )
    cabs_dwconv_block_op = define_custom_op(
        OP_NAMESPACE,
        "cabs_dwconv_block",
        _cabs_dwconv_block_forward,
        _cabs_dwconv_block_fake,
        _cabs_dwconv_block_autograd_backward,
        _cabs_dwconv_block_setup_context,
    )


# ---- entry points: the Triton kernel or the reference, as the backend and the tensors' device say -----------------


def cabs_dwconv_block_triton(x, h, w, ln1_weight, ln1_bias, dw_weight, ln2_weight, ln2_bias, eps):
    """Triton `cabs_dwconv_block_reference`: returns (y, se_mean), with autograd."""
    return cabs_dwconv_block_op(x, h, w, ln1_weight, ln1_bias, dw_weight, ln2_weight, ln2_bias, eps)


# The canned case for kernel_backend="auto"'s start-up check (kernels_common.use_triton): a 3 x 5 grid of 24
# channels (a ragged channel tile).
def cabs_dwconv_block_canned_case():
    x, dw = canned_tensors((2, 15, 24), (24, 1, 3, 3))
    args = (x, 3, 5, *canned_norm(24, seed=1), dw, *canned_norm(24, seed=2), 1e-5)
    return cabs_dwconv_block_triton, cabs_dwconv_block_reference, args


def cabs_dwconv_block(x, h, w, ln1_weight, ln1_bias, dw_weight, ln2_weight, ln2_bias, eps, backend="auto"):
    if use_triton(backend, cabs_dwconv_block_canned_case, x):
        return cabs_dwconv_block_triton(x, h, w, ln1_weight, ln1_bias, dw_weight, ln2_weight, ln2_bias, eps)
    return cabs_dwconv_block_reference(x, h, w, ln1_weight, ln1_bias, dw_weight, ln2_weight, ln2_bias, eps)
