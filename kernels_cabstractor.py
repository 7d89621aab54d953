"""C-Abstractor (Honeybee, arXiv 2312.06742 §3.2) fusions: the memory-bound middle and end of a RegNet bottleneck,
and the adaptive average pool between the two RegStages. PyTorch references (the default path, and the
specification), Triton kernels, and the entry points that pick one.

Every op works on token-major tensors (B, N = h*w, C) with row-major tokens, which is how CLIP hands the features
over; a 1x1 convolution is then a plain `F.linear` GEMM (kept outside these kernels) and a channel LayerNorm needs
no permute. What is fused (each is one kernel forward and one or two backward):

* `cabs_dwconv_block`: SiLU(LN1(x)) -> depthwise 3x3 (zero padding 1) -> SiLU(LN2(.)), plus the SE mean over
  tokens. A program owns BLOCK_T tokens x all C channels; each of the 9 taps reloads its neighbour tokens and
  re-applies LN1+SiLU (compute is cheap here, memory traffic is not).
* `ln_residual_silu_pool`: SiLU(LN(y) + residual), then PyTorch's adaptive average pool with its (possibly
  overlapping) windows [floor(i*in/out), ceil((i+1)*in/out)). With out == in it is plain `ln_residual_silu`;
  the pool-only variant (no LN) is `adaptive_avg_pool`.

Kernel math is fp32 for fp16/bf16/fp32 inputs and fp64 for fp64 inputs (`CT`); every load is upcast right away.
Backward recomputes the normalisations from the saved inputs. Per-channel reductions over tokens (SE mean,
weight gradients) are per-program partial rows with plain stores, finished by a `.sum`: no atomics anywhere,
so every result is deterministic.
"""

import functools
import itertools

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

# A token's channels must fit one register tile ([BLOCK_T, next_pow2(C)]): LayerNorm needs the whole row.
CABS_MAX_CHANNELS = 16384


# ---- PyTorch references -------------------------------------------------------------------------------------


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


# ---- Triton: shared pieces -----------------------------------------------------------------------------------------


@triton.jit
def _cabs_layer_norm(x, weight, bias, c_mask, C, eps):
    """Row LayerNorm of a [BLOCK_T, BLOCK_C] tile whose padding columns hold 0. Returns (out, xhat, mean, rstd)."""
    mean = tl.sum(x, axis=1) / C
    diff = tl.where(c_mask[None, :], x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / C + eps)
    xhat = diff * rstd[:, None]
    return xhat * weight[None, :] + bias[None, :], xhat, mean, rstd


@triton.jit
def _cabs_layer_norm_backward(grad_out, xhat, rstd, weight, C):
    """d loss / d x of LayerNorm, given d loss / d out: rstd * (g - mean(g) - xhat * mean(g * xhat)), g = grad*w."""
    g = grad_out * weight[None, :]
    mean_g = tl.sum(g, axis=1) / C
    mean_gx = tl.sum(g * xhat, axis=1) / C
    return rstd[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None])


@triton.jit
def _cabs_silu_grad(u):
    """d silu(u) / du = s * (1 + u * (1 - s)), s = sigmoid(u)."""
    s = tl.sigmoid(u)
    return s * (1.0 + u * (1.0 - s))


@triton.jit
def _cabs_load_rows(PTR, b, tokens, row_mask, N, c, c_mask, C, CT: tl.constexpr):
    """Load tokens [BLOCK_T] of image b from a (B, N, C) tensor as a [BLOCK_T, BLOCK_C] CT tile (0 where masked).

    `tokens` must already be clamped into [0, N): masked lanes still form addresses.
    """
    offs = (b * N + tokens).to(tl.int64)[:, None] * C + c[None, :]
    return tl.load(PTR + offs, mask=row_mask[:, None] & c_mask[None, :], other=0.0).to(CT)


@triton.jit
def _cabs_store_rows(PTR, b, tokens, row_mask, N, c, c_mask, C, value):
    offs = (b * N + tokens).to(tl.int64)[:, None] * C + c[None, :]
    tl.store(PTR + offs, value.to(PTR.dtype.element_ty), mask=row_mask[:, None] & c_mask[None, :])


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
    x = _cabs_load_rows(X, b, token, inside, N, c, c_mask, C, CT)
    u, _, _, _ = _cabs_layer_norm(x, w1, b1, c_mask, C, eps)
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


# ---- kernel (a): LN1+SiLU -> depthwise 3x3 -> LN2+SiLU -> SE mean -------------------------------------------
#
# Forward and backward part 1 loop over TILES token tiles of one image per program, so that their per-channel
# reductions (SE sum, LN2 weight gradients) are written once per program as a partial row: plain stores into a
# small (programs, rows, C) buffer that a `.sum` finishes. No atomics: deterministic, and the number of partial
# rows is bounded by the launch size, not by B*N.


@triton.jit
def _cabs_token_tile(tile, N, w, BLOCK_T: tl.constexpr):
    """Tokens of one tile of an image, clamped into [0, N), their mask, row and column."""
    t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < N
    t = tl.minimum(t, N - 1)
    return t, t_mask, t // w, t % w


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
        t, t_mask, r, col = _cabs_token_tile(tile, N, w, BLOCK_T)
        z = _cabs_dwconv3x3_of_ln1_silu(
            X, DW, b, r, col, t_mask, h, w, N, c, c_mask, C, w1, b1, eps, BLOCK_T, BLOCK_C, CT
        )
        v, _, _, _ = _cabs_layer_norm(z, w2, b2, c_mask, C, eps)
        y = v * tl.sigmoid(v)
        _cabs_store_rows(Y, b, t, t_mask, N, c, c_mask, C, y)
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
        t, t_mask, r, col = _cabs_token_tile(tile, N, w, BLOCK_T)
        z = _cabs_dwconv3x3_of_ln1_silu(
            X, DW, b, r, col, t_mask, h, w, N, c, c_mask, C, w1, b1, eps, BLOCK_T, BLOCK_C, CT
        )
        v, xhat2, _, rstd2 = _cabs_layer_norm(z, w2, b2, c_mask, C, eps)
        grad_y = _cabs_load_rows(GRAD_Y, b, t, t_mask, N, c, c_mask, C, CT) + grad_se[None, :]
        grad_v = tl.where(t_mask[:, None], grad_y * _cabs_silu_grad(v), 0.0)
        _cabs_store_rows(GRAD_Z, b, t, t_mask, N, c, c_mask, C, _cabs_layer_norm_backward(grad_v, xhat2, rstd2, w2, C))
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
    s, s_mask, r, col = _cabs_token_tile(tl.program_id(0), N, w, BLOCK_T)
    c = tl.arange(0, BLOCK_C)
    c_mask = c < C
    w1 = tl.load(LN1_W + c, mask=c_mask, other=0.0).to(CT)
    b1 = tl.load(LN1_B + c, mask=c_mask, other=0.0).to(CT)
    x = _cabs_load_rows(X, b, s, s_mask, N, c, c_mask, C, CT)
    u, xhat1, mean1, rstd1 = _cabs_layer_norm(x, w1, b1, c_mask, C, eps)
    stats = (b * N + s).to(tl.int64) * 2
    tl.store(LN1_STATS + stats, mean1, mask=s_mask)
    tl.store(LN1_STATS + stats + 1, rstd1, mask=s_mask)

    grad_a = tl.zeros((BLOCK_T, BLOCK_C), dtype=CT)
    for tap in tl.static_range(9):
        token, inside = _cabs_neighbour(r, col, 1 - tap // 3, 1 - tap % 3, s_mask, h, w)  # s - d_tap
        grad_z = _cabs_load_rows(GRAD_Z, b, token, inside, N, c, c_mask, C, CT)
        grad_a += grad_z * tl.load(DW + c * 9 + tap, mask=c_mask, other=0.0).to(CT)[None, :]
    grad_x = _cabs_layer_norm_backward(grad_a * _cabs_silu_grad(u), xhat1, rstd1, w1, C)
    _cabs_store_rows(GRAD_X, b, s, s_mask, N, c, c_mask, C, grad_x)


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
        grad_u = tl.sum(grad_z * dw[None, :, :], axis=1) * _cabs_silu_grad(u)  # rows outside the chunk: grad_z = 0
        grad_w1 += tl.sum(grad_u * xhat1, axis=0)
        grad_b1 += tl.sum(grad_u, axis=0)
    rows = chunk * 11
    tl.store(PARTIAL + (rows + taps[:, None]) * C + c[None, :], grad_dw, mask=tap_ok[:, None] & c_mask[None, :])
    tl.store(PARTIAL + (rows + 9) * C + c, grad_w1, mask=c_mask)
    tl.store(PARTIAL + (rows + 10) * C + c, grad_b1, mask=c_mask)


# ---- kernels (b)+(c): LN + residual + SiLU, then the adaptive average pool ---------------------------------


@triton.jit
def _cabs_pool_window(o, h_in, h_out):
    """PyTorch's adaptive pooling window along one axis: [floor(o*in/out), ceil((o+1)*in/out))."""
    return (o * h_in) // h_out, ((o + 1) * h_in + h_out - 1) // h_out


@triton.jit
def _cabs_ln_residual_silu_at(Y, R, b, token, valid, N, c, c_mask, C, weight, bias, eps, CT: tl.constexpr):
    """SiLU(LN(y) + r) at the given tokens. Returns (out, pre-activation, xhat, rstd)."""
    y = _cabs_load_rows(Y, b, token, valid, N, c, c_mask, C, CT)
    pre, xhat, _, rstd = _cabs_layer_norm(y, weight, bias, c_mask, C, eps)
    pre += _cabs_load_rows(R, b, token, valid, N, c, c_mask, C, CT)
    return pre * tl.sigmoid(pre), pre, xhat, rstd


@triton.jit
def _cabs_ln_residual_silu_avgpool_fwd(
    Y,
    W,
    BIAS,
    R,
    OUT,
    h,
    w,
    out_h,
    out_w,
    C,
    eps,
    LN_RESIDUAL_SILU: tl.constexpr,
    WIN_H: tl.constexpr,
    WIN_W: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    CT: tl.constexpr,
):
    """A tile of pooled output tokens: the mean of SiLU(LN(y) + r) (or of y alone) over each one's window.

    WIN_H x WIN_W bounds the largest window; lanes beyond a token's own window are masked. Overlapping windows
    recompute the normalisation of shared input tokens rather than storing the full-resolution output.
    """
    pid_o = tl.program_id(0)
    b = tl.program_id(1)
    N = h * w
    M = out_h * out_w
    o = pid_o * BLOCK_T + tl.arange(0, BLOCK_T)
    o_mask = o < M
    o = tl.minimum(o, M - 1)
    y0, y1 = _cabs_pool_window(o // out_w, h, out_h)
    x0, x1 = _cabs_pool_window(o % out_w, w, out_w)
    c = tl.arange(0, BLOCK_C)
    c_mask = c < C
    if LN_RESIDUAL_SILU:
        weight = tl.load(W + c, mask=c_mask, other=0.0).to(CT)
        bias = tl.load(BIAS + c, mask=c_mask, other=0.0).to(CT)

    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=CT)
    for ky in tl.static_range(WIN_H):
        for kx in tl.static_range(WIN_W):
            valid = o_mask & (y0 + ky < y1) & (x0 + kx < x1)
            token = tl.minimum(y0 + ky, h - 1) * w + tl.minimum(x0 + kx, w - 1)
            if LN_RESIDUAL_SILU:
                val, _, _, _ = _cabs_ln_residual_silu_at(Y, R, b, token, valid, N, c, c_mask, C, weight, bias, eps, CT)
            else:
                val = _cabs_load_rows(Y, b, token, valid, N, c, c_mask, C, CT)
            acc += tl.where(valid[:, None], val, 0.0)
    count = ((y1 - y0) * (x1 - x0)).to(CT)
    _cabs_store_rows(OUT, b, o, o_mask, M, c, c_mask, C, acc / count[:, None])


@triton.jit
def _cabs_pooled_grad(
    GRAD_OUT,
    b,
    iy,
    ix,
    t_mask,
    h,
    w,
    out_h,
    out_w,
    c,
    c_mask,
    C,
    FAN_H: tl.constexpr,
    FAN_W: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    CT: tl.constexpr,
):
    """d loss / d (pool input) for input tokens at (iy, ix): the sum over the windows holding each token of that
    window's output gradient / its size. Gathered, not scattered, so no atomics.

    The windows holding input row i are the outputs [floor(i*out/in), ...), at most FAN_H of them (FAN_W for
    columns); membership is tested with the exact window formula.
    """
    M = out_h * out_w
    grad = tl.zeros((BLOCK_T, BLOCK_C), dtype=CT)
    for jy in tl.static_range(FAN_H):
        oy = (iy * out_h) // h + jy
        wy0, wy1 = _cabs_pool_window(oy, h, out_h)
        for jx in tl.static_range(FAN_W):
            ox = (ix * out_w) // w + jx
            wx0, wx1 = _cabs_pool_window(ox, w, out_w)
            holds = t_mask & (oy < out_h) & (iy >= wy0) & (iy < wy1) & (ox < out_w) & (ix >= wx0) & (ix < wx1)
            o = tl.minimum(oy, out_h - 1) * out_w + tl.minimum(ox, out_w - 1)
            g = _cabs_load_rows(GRAD_OUT, b, o, holds, M, c, c_mask, C, CT)
            grad += g / ((wy1 - wy0) * (wx1 - wx0)).to(CT)[:, None]
    return grad


@triton.jit
def _cabs_ln_residual_silu_avgpool_bwd(
    GRAD_OUT,
    Y,
    W,
    BIAS,
    R,
    GRAD_Y,
    GRAD_R,
    PARTIAL,
    h,
    w,
    out_h,
    out_w,
    C,
    eps,
    TILES,
    LN_RESIDUAL_SILU: tl.constexpr,
    FAN_H: tl.constexpr,
    FAN_W: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    CT: tl.constexpr,
):
    """TILES tiles of input tokens of image b: the pooled gradient, then backward through SiLU(LN(y) + r).

    PARTIAL[b * programs + pid] rows: 0 = d weight, 1 = d bias (written once per program, like kernel (a)).
    """
    pid = tl.program_id(0)
    b = tl.program_id(1)
    N = h * w
    c = tl.arange(0, BLOCK_C)
    c_mask = c < C
    if LN_RESIDUAL_SILU:
        weight = tl.load(W + c, mask=c_mask, other=0.0).to(CT)
        bias = tl.load(BIAS + c, mask=c_mask, other=0.0).to(CT)
        grad_weight = tl.zeros((BLOCK_C,), dtype=CT)
        grad_bias = tl.zeros((BLOCK_C,), dtype=CT)
    for tile in range(pid * TILES, tl.minimum((pid + 1) * TILES, tl.cdiv(N, BLOCK_T))):
        t, t_mask, iy, ix = _cabs_token_tile(tile, N, w, BLOCK_T)
        grad = _cabs_pooled_grad(
            GRAD_OUT, b, iy, ix, t_mask, h, w, out_h, out_w, c, c_mask, C, FAN_H, FAN_W, BLOCK_T, BLOCK_C, CT
        )
        if LN_RESIDUAL_SILU:
            _, pre, xhat, rstd = _cabs_ln_residual_silu_at(Y, R, b, t, t_mask, N, c, c_mask, C, weight, bias, eps, CT)
            grad_pre = grad * _cabs_silu_grad(pre)  # grad is 0 on masked rows
            _cabs_store_rows(GRAD_R, b, t, t_mask, N, c, c_mask, C, grad_pre)
            _cabs_store_rows(
                GRAD_Y, b, t, t_mask, N, c, c_mask, C, _cabs_layer_norm_backward(grad_pre, xhat, rstd, weight, C)
            )
            grad_weight += tl.sum(grad_pre * xhat, axis=0)
            grad_bias += tl.sum(grad_pre, axis=0)
        else:
            _cabs_store_rows(GRAD_Y, b, t, t_mask, N, c, c_mask, C, grad)
    if LN_RESIDUAL_SILU:
        row = (b * tl.num_programs(0) + pid) * 2
        tl.store(PARTIAL + row * C + c, grad_weight, mask=c_mask)
        tl.store(PARTIAL + (row + 1) * C + c, grad_bias, mask=c_mask)


# ---- launch ------------------------------------------------------------------------------------------------


def _cabs_tiles(tokens, C, live_tiles):
    """(BLOCK_T, BLOCK_C, num_warps) for a [BLOCK_T tokens, all C channels] program.

    Heuristic, not autotuned (autotuning cannot run on the CPU CI). `live_tiles` is roughly how many
    [BLOCK_T, BLOCK_C] fp32 tiles a kernel keeps in registers, to size BLOCK_T on a GPU.
    """
    if C > CABS_MAX_CHANNELS:
        raise ValueError(f"C-Abstractor kernels hold a token's {C} channels in registers: at most {CABS_MAX_CHANNELS}")
    block_c = next_pow2(C)
    if KERNELS_INTERPRETED:
        # the interpreter costs about the same per program whatever its size: few, large programs
        return max(1, min(next_pow2(tokens), (1 << 18) // block_c)), block_c, 4
    num_warps = 8 if block_c >= 1024 else 4
    # keep the live tiles within about 64 fp32 registers per thread
    budget = num_warps * 32 * 64
    block_t = 1
    while block_t < tokens and 2 * block_t * block_c * live_tiles <= budget:
        block_t *= 2
    return block_t, block_c, num_warps


def _cabs_tiles_per_program(tokens, block_t, B, device):
    """(TILES, programs per image) for the kernels that loop over token tiles to write one partial row each.

    Interpreter: one program per image (the loop then runs over a few large tiles). GPU: about four programs
    per SM in total, so the partial-sum buffer stays small whatever B*N is.
    """
    tiles = triton.cdiv(tokens, block_t)
    per_program = tiles if KERNELS_INTERPRETED else max(1, triton.cdiv(tiles * B, 4 * sm_count(device)))
    return per_program, triton.cdiv(tiles, per_program)


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


@functools.lru_cache(maxsize=None)
def _cabs_pool_window_bounds(size_in, size_out):
    """(largest window, most windows holding one index) along one axis of PyTorch's adaptive pooling."""
    starts = [(o * size_in) // size_out for o in range(size_out)]
    ends = [-((-(o + 1) * size_in) // size_out) for o in range(size_out)]  # ceil
    cover = [0] * (size_in + 1)  # difference array: +1 where a window starts, -1 where it ends
    for start, end in zip(starts, ends):
        cover[start] += 1
        cover[end] -= 1
    return max(e - s for s, e in zip(starts, ends)), max(itertools.accumulate(cover[:-1]))


def _cabs_check_tokens(op_name, x, h, w):
    if x.dim() != 3 or x.shape[1] != h * w:
        raise ValueError(f"{op_name}: expected (B, h*w = {h * w}, C) token-major input, got {tuple(x.shape)}")
    if x.shape[0] == 0 or h <= 0 or w <= 0:
        raise ValueError(f"{op_name}: empty input {tuple(x.shape)}")


def _cabs_weight_grads(partial, rows, params):
    """Finish the partial sums: (programs, rows, C) -> one gradient per param, in the param's dtype."""
    return [partial[:, row].sum(0).to(p.dtype) for row, p in zip(rows, params)]  # separate tensors, no views


# (a) cabs_dwconv_block


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
    _cabs_check_tokens("cabs_dwconv_block", x, h, w)
    B, N, C = x.shape
    x = x.contiguous()
    acc_dtype, ct = compute_dtype(x)
    block_t, block_c, num_warps = _cabs_tiles(N, C, live_tiles=4)
    tiles, programs = _cabs_tiles_per_program(N, block_t, B, x.device)
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
    block_t, block_c, num_warps = _cabs_tiles(N, C, live_tiles=6)
    tiles, programs = _cabs_tiles_per_program(N, block_t, B, x.device)
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
    grad_ln2_weight, grad_ln2_bias = _cabs_weight_grads(partial_ln2, (0, 1), (ln2_weight, ln2_bias))
    grad_ln1_weight, grad_ln1_bias = _cabs_weight_grads(partial_ln1_dw, (9, 10), (ln1_weight, ln1_bias))
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


# (b) + (c): ln_residual_silu_pool and adaptive_avg_pool


def _cabs_pool_launch(x, h, w, out_h, out_w, ln_params, eps):
    """Forward of SiLU(LN(x) + residual) -> adaptive pool (ln_params = (weight, bias, residual)) or of the pool
    alone (ln_params = None)."""
    B, N, C = x.shape
    M = out_h * out_w
    x = x.contiguous()
    tensors = (x,) if ln_params is None else (x, *ln_params)
    acc_dtype, ct = compute_dtype(*tensors)
    out_dtype = x.dtype if ln_params is None else torch.promote_types(x.dtype, ln_params[2].dtype)
    out = new_output((B, M, C), out_dtype, x.device)
    weight, bias, residual = (x, x, x) if ln_params is None else (p.contiguous() for p in ln_params)
    win_h, _ = _cabs_pool_window_bounds(h, out_h)
    win_w, _ = _cabs_pool_window_bounds(w, out_w)
    block_t, block_c, num_warps = _cabs_tiles(M, C, live_tiles=4)
    _cabs_ln_residual_silu_avgpool_fwd[(triton.cdiv(M, block_t), B)](
        x,
        weight,
        bias,
        residual,
        out,
        h,
        w,
        out_h,
        out_w,
        C,
        eps,
        LN_RESIDUAL_SILU=ln_params is not None,
        WIN_H=win_h,
        WIN_W=win_w,
        BLOCK_T=block_t,
        BLOCK_C=block_c,
        CT=ct,
        num_warps=num_warps,
    )
    return out


def _cabs_pool_backward_launch(grad_out, x, h, w, out_h, out_w, ln_params, eps):
    """Backward of `_cabs_pool_launch`: grad_x, or (grad_y, grad_weight, grad_bias, grad_residual)."""
    B, N, C = x.shape
    grad_out, x = grad_out.contiguous(), x.contiguous()
    tensors = (x, grad_out) if ln_params is None else (x, grad_out, *ln_params)
    acc_dtype, ct = compute_dtype(*tensors)
    _, fan_h = _cabs_pool_window_bounds(h, out_h)
    _, fan_w = _cabs_pool_window_bounds(w, out_w)
    block_t, block_c, num_warps = _cabs_tiles(N, C, live_tiles=5)
    tiles, programs = _cabs_tiles_per_program(N, block_t, B, x.device)
    grad_x = new_output((B, N, C), x.dtype, x.device)
    if ln_params is None:
        weight, bias, residual, grad_residual, partial = x, x, x, grad_x, grad_x  # unused by the pool-only kernel
    else:
        weight, bias, residual = (p.contiguous() for p in ln_params)
        grad_residual = new_output((B, N, C), residual.dtype, x.device)
        partial = new_output((B * programs, 2, C), acc_dtype, x.device)
    _cabs_ln_residual_silu_avgpool_bwd[(programs, B)](
        grad_out,
        x,
        weight,
        bias,
        residual,
        grad_x,
        grad_residual,
        partial,
        h,
        w,
        out_h,
        out_w,
        C,
        eps,
        tiles,
        LN_RESIDUAL_SILU=ln_params is not None,
        FAN_H=fan_h,
        FAN_W=fan_w,
        BLOCK_T=block_t,
        BLOCK_C=block_c,
        CT=ct,
        num_warps=num_warps,
    )
    if ln_params is None:
        return grad_x
    grad_weight, grad_bias = _cabs_weight_grads(partial, (0, 1), ln_params[:2])
    return grad_x, grad_weight, grad_bias, grad_residual


def _cabs_check_ln_residual(y, weight, bias, residual, h, w, out_h, out_w):
    check_kernel_inputs("ln_residual_silu", y, weight, bias, residual)
    _cabs_check_tokens("ln_residual_silu", y, h, w)
    if residual.shape != y.shape or weight.shape != (y.shape[2],) or bias.shape != (y.shape[2],):
        raise ValueError(
            f"ln_residual_silu: shapes y {tuple(y.shape)}, residual {tuple(residual.shape)}, "
            f"weight {tuple(weight.shape)}, bias {tuple(bias.shape)} do not match"
        )
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"ln_residual_silu: pooled size must be positive, got {(out_h, out_w)}")


def _cabs_ln_residual_silu_pool_forward(
    y: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor,
    eps: float,
    h: int,
    w: int,
    out_h: int,
    out_w: int,
) -> torch.Tensor:
    _cabs_check_ln_residual(y, weight, bias, residual, h, w, out_h, out_w)
    return _cabs_pool_launch(y, h, w, out_h, out_w, (weight, bias, residual), eps)


def _cabs_ln_residual_silu_pool_backward(
    grad_out: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor,
    eps: float,
    h: int,
    w: int,
    out_h: int,
    out_w: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _cabs_check_ln_residual(y, weight, bias, residual, h, w, out_h, out_w)
    check_kernel_inputs("ln_residual_silu", y, grad_out)
    return _cabs_pool_backward_launch(grad_out, y, h, w, out_h, out_w, (weight, bias, residual), eps)


def _cabs_ln_residual_silu_pool_fake(y, weight, bias, residual, eps, h, w, out_h, out_w):
    return y.new_empty((y.shape[0], out_h * out_w, y.shape[2]), dtype=torch.promote_types(y.dtype, residual.dtype))


def _cabs_ln_residual_silu_pool_backward_fake(grad_out, y, weight, bias, residual, eps, h, w, out_h, out_w):
    return torch.empty_like(y), torch.empty_like(weight), torch.empty_like(bias), torch.empty_like(residual)


def _cabs_ln_residual_silu_pool_setup_context(ctx, inputs, output):
    y, weight, bias, residual, eps, h, w, out_h, out_w = inputs
    ctx.save_for_backward(y, weight, bias, residual)
    ctx.args = (eps, h, w, out_h, out_w)


def _cabs_ln_residual_silu_pool_autograd_backward(ctx, grad_out):
    y, weight, bias, residual = ctx.saved_tensors
    grads = ln_residual_silu_pool_backward_op(grad_out, y, weight, bias, residual, *ctx.args)
    return grads[0], grads[1], grads[2], grads[3], None, None, None, None, None


def _cabs_check_pool(x, h, w, out_h, out_w):
    check_kernel_inputs("adaptive_avg_pool", x)
    _cabs_check_tokens("adaptive_avg_pool", x, h, w)
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"adaptive_avg_pool: pooled size must be positive, got {(out_h, out_w)}")


def _cabs_adaptive_avg_pool_forward(x: torch.Tensor, h: int, w: int, out_h: int, out_w: int) -> torch.Tensor:
    _cabs_check_pool(x, h, w, out_h, out_w)
    return _cabs_pool_launch(x, h, w, out_h, out_w, None, 0.0)


def _cabs_adaptive_avg_pool_backward(
    grad_out: torch.Tensor, x: torch.Tensor, h: int, w: int, out_h: int, out_w: int
) -> torch.Tensor:
    _cabs_check_pool(x, h, w, out_h, out_w)
    check_kernel_inputs("adaptive_avg_pool", x, grad_out)
    return _cabs_pool_backward_launch(grad_out, x, h, w, out_h, out_w, None, 0.0)


def _cabs_adaptive_avg_pool_fake(x, h, w, out_h, out_w):
    return x.new_empty((x.shape[0], out_h * out_w, x.shape[2]))


def _cabs_adaptive_avg_pool_backward_fake(grad_out, x, h, w, out_h, out_w):
    return torch.empty_like(x)


def _cabs_adaptive_avg_pool_setup_context(ctx, inputs, output):
    x, h, w, out_h, out_w = inputs
    ctx.save_for_backward(x)  # only its shape is read; saving it keeps the op's schema simple
    ctx.args = (h, w, out_h, out_w)


def _cabs_adaptive_avg_pool_autograd_backward(ctx, grad_out):
    (x,) = ctx.saved_tensors
    return adaptive_avg_pool_backward_op(grad_out, x, *ctx.args), None, None, None, None


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
    ln_residual_silu_pool_backward_op = define_custom_op(
        OP_NAMESPACE,
        "ln_residual_silu_pool_backward",
        _cabs_ln_residual_silu_pool_backward,
        _cabs_ln_residual_silu_pool_backward_fake,
    )
    ln_residual_silu_pool_op = define_custom_op(
        OP_NAMESPACE,
        "ln_residual_silu_pool",
        _cabs_ln_residual_silu_pool_forward,
        _cabs_ln_residual_silu_pool_fake,
        _cabs_ln_residual_silu_pool_autograd_backward,
        _cabs_ln_residual_silu_pool_setup_context,
    )
    adaptive_avg_pool_backward_op = define_custom_op(
        OP_NAMESPACE,
        "adaptive_avg_pool_backward",
        _cabs_adaptive_avg_pool_backward,
        _cabs_adaptive_avg_pool_backward_fake,
    )
    adaptive_avg_pool_op = define_custom_op(
        OP_NAMESPACE,
        "adaptive_avg_pool",
        _cabs_adaptive_avg_pool_forward,
        _cabs_adaptive_avg_pool_fake,
        _cabs_adaptive_avg_pool_autograd_backward,
        _cabs_adaptive_avg_pool_setup_context,
    )


def cabs_dwconv_block_triton(x, h, w, ln1_weight, ln1_bias, dw_weight, ln2_weight, ln2_bias, eps):
    """Triton `cabs_dwconv_block_reference`: returns (y, se_mean), with autograd."""
    return cabs_dwconv_block_op(x, h, w, ln1_weight, ln1_bias, dw_weight, ln2_weight, ln2_bias, eps)


def ln_residual_silu_pool_triton(y, weight, bias, residual, eps, h, w, out_h, out_w):
    """SiLU(LN(y) + residual) on an h x w token grid, average-pooled to out_h x out_w; with autograd."""
    return ln_residual_silu_pool_op(y, weight, bias, residual, eps, h, w, out_h, out_w)


def ln_residual_silu_triton(y, weight, bias, residual, eps):
    """Triton `ln_residual_silu_reference`: the fused kernel with an identity pool (a 1 x N grid)."""
    N = y.shape[1]
    return ln_residual_silu_pool_op(y, weight, bias, residual, eps, 1, N, 1, N)


def adaptive_avg_pool_triton(x, h, w, out_h, out_w):
    """Triton `adaptive_avg_pool_reference`, with autograd."""
    return adaptive_avg_pool_op(x, h, w, out_h, out_w)


# ---- start-up checks: each kernel on a small input, for kernel_backend="auto" (kernels_common.use_triton) -----
# A 3 x 5 grid of 24 channels (a ragged channel tile), pooled to 2 x 3 (overlapping windows).


def _cabs_canned_tensors(*shapes):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for shape in shapes]


def _cabs_canned_norm(seed=1, C=24):
    g = torch.Generator().manual_seed(seed)
    return 0.5 + torch.rand(C, generator=g, dtype=torch.float64), torch.randn(C, generator=g, dtype=torch.float64)


def cabs_dwconv_block_canned_case():
    x, dw = _cabs_canned_tensors((2, 15, 24), (24, 1, 3, 3))
    args = (x, 3, 5, *_cabs_canned_norm(1), dw, *_cabs_canned_norm(2), 1e-5)
    return cabs_dwconv_block_triton, cabs_dwconv_block_reference, args


def ln_residual_silu_canned_case():
    y, residual = _cabs_canned_tensors((2, 15, 24), (2, 15, 24))
    return ln_residual_silu_triton, ln_residual_silu_reference, (y, *_cabs_canned_norm(), residual, 1e-5)


def ln_residual_silu_pool_canned_case():
    y, residual = _cabs_canned_tensors((2, 15, 24), (2, 15, 24))
    args = (y, *_cabs_canned_norm(), residual, 1e-5, 3, 5, 2, 3)
    return ln_residual_silu_pool_triton, ln_residual_silu_pool_reference, args


def adaptive_avg_pool_canned_case():
    (x,) = _cabs_canned_tensors((2, 15, 24))
    return adaptive_avg_pool_triton, adaptive_avg_pool_reference, (x, 3, 5, 2, 3)


# ---- entry points: the Triton kernel or the reference, as the backend and the tensors' device say -------------


def cabs_dwconv_block(x, h, w, ln1_weight, ln1_bias, dw_weight, ln2_weight, ln2_bias, eps, backend="auto"):
    if use_triton(backend, cabs_dwconv_block_canned_case, x):
        return cabs_dwconv_block_triton(x, h, w, ln1_weight, ln1_bias, dw_weight, ln2_weight, ln2_bias, eps)
    return cabs_dwconv_block_reference(x, h, w, ln1_weight, ln1_bias, dw_weight, ln2_weight, ln2_bias, eps)


def ln_residual_silu(y, weight, bias, residual, eps, backend="auto"):
    if use_triton(backend, ln_residual_silu_canned_case, y):
        return ln_residual_silu_triton(y, weight, bias, residual, eps)
    return ln_residual_silu_reference(y, weight, bias, residual, eps)


def ln_residual_silu_pool(y, weight, bias, residual, eps, h, w, out_h, out_w, backend="auto"):
    """`ln_residual_silu` then `adaptive_avg_pool`, fused on the Triton path (the full-resolution output is never
    written): for the last block of the first RegStage, whose output only feeds the pool."""
    if use_triton(backend, ln_residual_silu_pool_canned_case, y):
        return ln_residual_silu_pool_triton(y, weight, bias, residual, eps, h, w, out_h, out_w)
    return ln_residual_silu_pool_reference(y, weight, bias, residual, eps, h, w, out_h, out_w)


def adaptive_avg_pool(x, h, w, out_h, out_w, backend="auto"):
    if use_triton(backend, adaptive_avg_pool_canned_case, x):
        return adaptive_avg_pool_triton(x, h, w, out_h, out_w)
    return adaptive_avg_pool_reference(x, h, w, out_h, out_w)
