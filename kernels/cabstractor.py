"""C-Abstractor (Honeybee, arXiv 2312.06742 §3.2) fusions in Triton: the memory-bound middle and end of a RegNet
bottleneck, and the adaptive average pool between the two RegStages.

All tensors are token-major (B, N = h*w, C), row-major tokens, as CLIP hands them over; the 1x1 convolutions
stay `F.linear` GEMMs outside these kernels. What is fused (each is one kernel forward and one or two backward):

* `cabs_dwconv_block`: SiLU(LN1(x)) -> depthwise 3x3 (zero padding 1) -> SiLU(LN2(.)), plus the SE mean over
  tokens. A program owns BLOCK_T tokens x all C channels; each of the 9 taps reloads its neighbour tokens and
  re-applies LN1+SiLU (compute is cheap here, memory traffic is not).
* `ln_residual_silu_pool`: SiLU(LN(y) + residual), then PyTorch's adaptive average pool with its (possibly
  overlapping) windows [floor(i*in/out), ceil((i+1)*in/out)). With out == in it is plain `ln_residual_silu`;
  the pool-only variant (no LN) is `adaptive_avg_pool`.

Math is fp32 for fp16/bf16/fp32 inputs and fp64 for fp64 inputs (`CT`); every load is upcast right away.
Backward recomputes the normalisations from the saved inputs. Weight gradients are per-program partial sums,
atomically added into a small (groups, C) fp32 buffer and summed at the end.
"""

import torch

from .common import HAS_TRITON, KERNELS_INTERPRETED, check_kernel_inputs, compute_dtype, define_custom_op, new_output, next_pow2, tl, triton, weight_grad_groups

# A token's channels must fit one register tile ([BLOCK_T, next_pow2(C)]): LayerNorm needs the whole row.
CABS_MAX_CHANNELS = 16384


# ---- shared pieces -----------------------------------------------------------------------------------------


@triton.jit
def _cabs_layer_norm(x, weight, bias, c_mask, C, eps):
    """Row LayerNorm of a [BLOCK_T, BLOCK_C] tile whose padding columns hold 0. Returns (out, xhat, rstd)."""
    mean = tl.sum(x, axis=1) / C
    diff = tl.where(c_mask[None, :], x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / C + eps)
    xhat = diff * rstd[:, None]
    return xhat * weight[None, :] + bias[None, :], xhat, rstd


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
def _cabs_add_partial(PARTIAL, group, row: tl.constexpr, ROWS: tl.constexpr, c, c_mask, C, value):
    """Atomically add a [BLOCK_C] partial sum into row `row` of group `group` of a (groups, ROWS, C) buffer."""
    tl.atomic_add(PARTIAL + (group * ROWS + row) * C + c, value, mask=c_mask)


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
    u, xhat, rstd = _cabs_layer_norm(x, w1, b1, c_mask, C, eps)
    return tl.where(inside[:, None], u * tl.sigmoid(u), 0.0)


@triton.jit
def _cabs_dwconv3x3_of_ln1_silu(X, DW, b, r, col, t_mask, h, w, N, c, c_mask, C, w1, b1, eps,
                                BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, CT: tl.constexpr):
    """z = depthwise3x3(SiLU(LN1(x))) for a tile of tokens: [BLOCK_T, BLOCK_C]."""
    z = tl.zeros((BLOCK_T, BLOCK_C), dtype=CT)
    for tap in tl.static_range(9):
        token, inside = _cabs_neighbour(r, col, tap // 3 - 1, tap % 3 - 1, t_mask, h, w)
        a = _cabs_ln1_silu_at(X, b, token, inside, N, c, c_mask, C, w1, b1, eps, CT)
        z += a * tl.load(DW + c * 9 + tap, mask=c_mask, other=0.0).to(CT)[None, :]
    return z


# ---- kernel (a): LN1+SiLU -> depthwise 3x3 -> LN2+SiLU -> SE mean -------------------------------------------


@triton.jit
def _cabs_ln_silu_dwconv3x3_ln_silu_sepool_fwd(
    X, LN1_W, LN1_B, DW, LN2_W, LN2_B, Y, SE_MEAN,
    N, h, w, C, eps,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, CT: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < N
    t = tl.minimum(t, N - 1)
    r = t // w
    col = t % w
    c = tl.arange(0, BLOCK_C)
    c_mask = c < C
    w1 = tl.load(LN1_W + c, mask=c_mask, other=0.0).to(CT)
    b1 = tl.load(LN1_B + c, mask=c_mask, other=0.0).to(CT)
    w2 = tl.load(LN2_W + c, mask=c_mask, other=0.0).to(CT)
    b2 = tl.load(LN2_B + c, mask=c_mask, other=0.0).to(CT)

    z = _cabs_dwconv3x3_of_ln1_silu(X, DW, b, r, col, t_mask, h, w, N, c, c_mask, C, w1, b1, eps, BLOCK_T, BLOCK_C, CT)
    v, _, _ = _cabs_layer_norm(z, w2, b2, c_mask, C, eps)
    y = v * tl.sigmoid(v)
    _cabs_store_rows(Y, b, t, t_mask, N, c, c_mask, C, y)
    # SE squeeze: this tile's share of the mean over the image's tokens
    se = tl.sum(tl.where(t_mask[:, None], y, 0.0), axis=0) / N
    tl.atomic_add(SE_MEAN + b * C + c, se, mask=c_mask)


@triton.jit
def _cabs_dwconv_ln_silu_sepool_bwd_to_conv_out(
    GRAD_Y, GRAD_SE, X, LN1_W, LN1_B, DW, LN2_W, LN2_B, GRAD_Z, PARTIAL,
    N, h, w, C, eps, GROUPS,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, CT: tl.constexpr,
):
    """Backward, part 1: d loss / d z (the depthwise conv output) through LN2, SiLU and the SE mean.

    Recomputes z from x. PARTIAL rows: 0 = d ln2_weight, 1 = d ln2_bias.
    """
    pid_t = tl.program_id(0)
    b = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < N
    t = tl.minimum(t, N - 1)
    r = t // w
    col = t % w
    c = tl.arange(0, BLOCK_C)
    c_mask = c < C
    w1 = tl.load(LN1_W + c, mask=c_mask, other=0.0).to(CT)
    b1 = tl.load(LN1_B + c, mask=c_mask, other=0.0).to(CT)
    w2 = tl.load(LN2_W + c, mask=c_mask, other=0.0).to(CT)
    b2 = tl.load(LN2_B + c, mask=c_mask, other=0.0).to(CT)

    z = _cabs_dwconv3x3_of_ln1_silu(X, DW, b, r, col, t_mask, h, w, N, c, c_mask, C, w1, b1, eps, BLOCK_T, BLOCK_C, CT)
    v, xhat2, rstd2 = _cabs_layer_norm(z, w2, b2, c_mask, C, eps)
    # every token receives 1/N of the SE mean's gradient
    grad_se = tl.load(GRAD_SE + b * C + c, mask=c_mask, other=0.0).to(CT) / N
    grad_y = _cabs_load_rows(GRAD_Y, b, t, t_mask, N, c, c_mask, C, CT) + grad_se[None, :]
    grad_v = tl.where(t_mask[:, None], grad_y * _cabs_silu_grad(v), 0.0)
    grad_z = _cabs_layer_norm_backward(grad_v, xhat2, rstd2, w2, C)
    _cabs_store_rows(GRAD_Z, b, t, t_mask, N, c, c_mask, C, grad_z)

    group = (b * tl.num_programs(0) + pid_t) % GROUPS
    _cabs_add_partial(PARTIAL, group, 0, 2, c, c_mask, C, tl.sum(grad_v * xhat2, axis=0))
    _cabs_add_partial(PARTIAL, group, 1, 2, c, c_mask, C, tl.sum(grad_v, axis=0))


@triton.jit
def _cabs_ln_silu_dwconv3x3_bwd_to_input(
    GRAD_Z, X, LN1_W, LN1_B, DW, GRAD_X, PARTIAL,
    N, h, w, C, eps, GROUPS,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, CT: tl.constexpr,
):
    """Backward, part 2: d loss / d x through the depthwise conv (its transpose: taps mirrored), SiLU and LN1.

    With z[t] = sum_tap dw[tap] * a[t + d_tap]: d a[s] = sum_tap dw[tap] * dz[s - d_tap] and
    d dw[tap] = sum_s a[s] * dz[s - d_tap]. PARTIAL rows: 0..8 = d dw taps, 9 = d ln1_weight, 10 = d ln1_bias.
    """
    pid_t = tl.program_id(0)
    b = tl.program_id(1)
    s = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    s_mask = s < N
    s = tl.minimum(s, N - 1)
    r = s // w
    col = s % w
    c = tl.arange(0, BLOCK_C)
    c_mask = c < C
    w1 = tl.load(LN1_W + c, mask=c_mask, other=0.0).to(CT)
    b1 = tl.load(LN1_B + c, mask=c_mask, other=0.0).to(CT)

    x = _cabs_load_rows(X, b, s, s_mask, N, c, c_mask, C, CT)
    u, xhat1, rstd1 = _cabs_layer_norm(x, w1, b1, c_mask, C, eps)
    a = tl.where(s_mask[:, None], u * tl.sigmoid(u), 0.0)

    group = (b * tl.num_programs(0) + pid_t) % GROUPS
    grad_a = tl.zeros((BLOCK_T, BLOCK_C), dtype=CT)
    for tap in tl.static_range(9):
        token, inside = _cabs_neighbour(r, col, 1 - tap // 3, 1 - tap % 3, s_mask, h, w)  # s - d_tap
        grad_z = _cabs_load_rows(GRAD_Z, b, token, inside, N, c, c_mask, C, CT)
        grad_a += grad_z * tl.load(DW + c * 9 + tap, mask=c_mask, other=0.0).to(CT)[None, :]
        _cabs_add_partial(PARTIAL, group, tap, 11, c, c_mask, C, tl.sum(a * grad_z, axis=0))

    grad_u = grad_a * _cabs_silu_grad(u)
    grad_x = _cabs_layer_norm_backward(grad_u, xhat1, rstd1, w1, C)
    _cabs_store_rows(GRAD_X, b, s, s_mask, N, c, c_mask, C, grad_x)
    _cabs_add_partial(PARTIAL, group, 9, 11, c, c_mask, C, tl.sum(grad_u * xhat1, axis=0))
    _cabs_add_partial(PARTIAL, group, 10, 11, c, c_mask, C, tl.sum(grad_u, axis=0))


# ---- kernels (b)+(c): LN + residual + SiLU, then the adaptive average pool ---------------------------------


@triton.jit
def _cabs_pool_window(o, h_in, h_out):
    """PyTorch's adaptive pooling window along one axis: [floor(o*in/out), ceil((o+1)*in/out))."""
    return (o * h_in) // h_out, ((o + 1) * h_in + h_out - 1) // h_out


@triton.jit
def _cabs_ln_residual_silu_at(Y, R, b, token, valid, N, c, c_mask, C, weight, bias, eps, CT: tl.constexpr):
    """SiLU(LN(y) + r) at the given tokens. Returns (out, pre-activation, xhat, rstd)."""
    y = _cabs_load_rows(Y, b, token, valid, N, c, c_mask, C, CT)
    pre, xhat, rstd = _cabs_layer_norm(y, weight, bias, c_mask, C, eps)
    pre += _cabs_load_rows(R, b, token, valid, N, c, c_mask, C, CT)
    return pre * tl.sigmoid(pre), pre, xhat, rstd


@triton.jit
def _cabs_ln_residual_silu_avgpool_fwd(
    Y, W, BIAS, R, OUT,
    h, w, out_h, out_w, C, eps,
    LN_RESIDUAL_SILU: tl.constexpr, WIN_H: tl.constexpr, WIN_W: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, CT: tl.constexpr,
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
def _cabs_ln_residual_silu_avgpool_bwd(
    GRAD_OUT, Y, W, BIAS, R, GRAD_Y, GRAD_R, PARTIAL,
    h, w, out_h, out_w, C, eps, GROUPS,
    LN_RESIDUAL_SILU: tl.constexpr, FAN_H: tl.constexpr, FAN_W: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, CT: tl.constexpr,
):
    """A tile of input tokens: gather the pooled gradient from every window that holds each token (no atomics),
    then backpropagate through SiLU(LN(y) + r). PARTIAL rows: 0 = d weight, 1 = d bias.

    The windows holding input row i are the outputs [floor(i*out/in), ...), at most FAN_H of them (FAN_W for
    columns); membership is tested with the exact window formula.
    """
    pid_t = tl.program_id(0)
    b = tl.program_id(1)
    N = h * w
    M = out_h * out_w
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < N
    t = tl.minimum(t, N - 1)
    iy = t // w
    ix = t % w
    c = tl.arange(0, BLOCK_C)
    c_mask = c < C

    grad = tl.zeros((BLOCK_T, BLOCK_C), dtype=CT)  # d loss / d (pool input)
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

    if LN_RESIDUAL_SILU:
        weight = tl.load(W + c, mask=c_mask, other=0.0).to(CT)
        bias = tl.load(BIAS + c, mask=c_mask, other=0.0).to(CT)
        _, pre, xhat, rstd = _cabs_ln_residual_silu_at(Y, R, b, t, t_mask, N, c, c_mask, C, weight, bias, eps, CT)
        grad_pre = grad * _cabs_silu_grad(pre)
        _cabs_store_rows(GRAD_R, b, t, t_mask, N, c, c_mask, C, grad_pre)
        _cabs_store_rows(GRAD_Y, b, t, t_mask, N, c, c_mask, C, _cabs_layer_norm_backward(grad_pre, xhat, rstd, weight, C))
        group = (b * tl.num_programs(0) + pid_t) % GROUPS
        _cabs_add_partial(PARTIAL, group, 0, 2, c, c_mask, C, tl.sum(grad_pre * xhat, axis=0))
        _cabs_add_partial(PARTIAL, group, 1, 2, c, c_mask, C, tl.sum(grad_pre, axis=0))
    else:
        _cabs_store_rows(GRAD_Y, b, t, t_mask, N, c, c_mask, C, grad)


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
        return max(1, min(next_pow2(tokens), (1 << 20) // block_c)), block_c, 4
    num_warps = 8 if block_c >= 1024 else 4
    # keep the live tiles within about 64 fp32 registers per thread
    budget = num_warps * 32 * 64
    block_t = 1
    while block_t < tokens and 2 * block_t * block_c * live_tiles <= budget:
        block_t *= 2
    return block_t, block_c, num_warps


def _cabs_pool_window_bounds(size_in, size_out):
    """(largest window, most windows holding one index) along one axis of PyTorch's adaptive pooling."""
    starts = [(o * size_in) // size_out for o in range(size_out)]
    ends = [-((-(o + 1) * size_in) // size_out) for o in range(size_out)]
    fan = max(sum(s <= i < e for s, e in zip(starts, ends)) for i in range(size_in))
    return max(e - s for s, e in zip(starts, ends)), fan


def _cabs_check_tokens(op_name, x, h, w):
    if x.dim() != 3 or x.shape[1] != h * w:
        raise ValueError(f"{op_name}: expected (B, h*w = {h * w}, C) token-major input, got {tuple(x.shape)}")
    if x.shape[0] == 0 or h <= 0 or w <= 0:
        raise ValueError(f"{op_name}: empty input {tuple(x.shape)}")


def _cabs_weight_grads(partial, rows, params):
    """Finish the grouped partial sums: (groups, rows, C) -> one gradient per param, in the param's dtype."""
    return [partial[:, row].sum(0).to(p.dtype) for row, p in zip(rows, params)]  # separate tensors, no views


# (a) cabs_dwconv_block


def _cabs_dwconv_block_forward(x: torch.Tensor, h: int, w: int, ln1_weight: torch.Tensor, ln1_bias: torch.Tensor, dw_weight: torch.Tensor, ln2_weight: torch.Tensor, ln2_bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    check_kernel_inputs("cabs_dwconv_block", x, ln1_weight, ln1_bias, dw_weight, ln2_weight, ln2_bias)
    _cabs_check_tokens("cabs_dwconv_block", x, h, w)
    B, N, C = x.shape
    x = x.contiguous()
    acc_dtype, ct = compute_dtype(x)
    y = new_output((B, N, C), x.dtype, x.device)
    se_mean = torch.zeros((B, C), dtype=acc_dtype, device=x.device)  # atomics target
    block_t, block_c, num_warps = _cabs_tiles(N, C, live_tiles=4)
    _cabs_ln_silu_dwconv3x3_ln_silu_sepool_fwd[(triton.cdiv(N, block_t), B)](
        x, ln1_weight.contiguous(), ln1_bias.contiguous(), dw_weight.reshape(C, 9).contiguous(),
        ln2_weight.contiguous(), ln2_bias.contiguous(), y, se_mean, N, h, w, C, eps,
        BLOCK_T=block_t, BLOCK_C=block_c, CT=ct, num_warps=num_warps,
    )
    return y, se_mean


def _cabs_dwconv_block_backward(grad_y: torch.Tensor, grad_se_mean: torch.Tensor, x: torch.Tensor, h: int, w: int, ln1_weight: torch.Tensor, ln1_bias: torch.Tensor, dw_weight: torch.Tensor, ln2_weight: torch.Tensor, ln2_bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_kernel_inputs("cabs_dwconv_block", x, grad_y, grad_se_mean, ln1_weight, ln1_bias, dw_weight, ln2_weight, ln2_bias)
    B, N, C = x.shape
    x, grad_y, grad_se_mean = x.contiguous(), grad_y.contiguous(), grad_se_mean.contiguous()
    params = [p.contiguous() for p in (ln1_weight, ln1_bias, ln2_weight, ln2_bias)]
    dw = dw_weight.reshape(C, 9).contiguous()
    acc_dtype, ct = compute_dtype(x, grad_y)
    grad_z = new_output((B, N, C), acc_dtype, x.device)  # d loss / d (depthwise conv output), kept in fp32
    grad_x = new_output((B, N, C), x.dtype, x.device)
    block_t, block_c, num_warps = _cabs_tiles(N, C, live_tiles=6)
    grid = (triton.cdiv(N, block_t), B)
    groups = weight_grad_groups(grid[0] * grid[1])
    partial_ln2 = torch.zeros((groups, 2, C), dtype=acc_dtype, device=x.device)
    partial_ln1_dw = torch.zeros((groups, 11, C), dtype=acc_dtype, device=x.device)
    meta = dict(BLOCK_T=block_t, BLOCK_C=block_c, CT=ct, num_warps=num_warps)
    _cabs_dwconv_ln_silu_sepool_bwd_to_conv_out[grid](
        grad_y, grad_se_mean, x, params[0], params[1], dw, params[2], params[3], grad_z, partial_ln2,
        N, h, w, C, eps, groups, **meta,
    )
    _cabs_ln_silu_dwconv3x3_bwd_to_input[grid](
        grad_z, x, params[0], params[1], dw, grad_x, partial_ln1_dw, N, h, w, C, eps, groups, **meta,
    )
    grad_ln2_weight, grad_ln2_bias = _cabs_weight_grads(partial_ln2, (0, 1), (ln2_weight, ln2_bias))
    grad_ln1_weight, grad_ln1_bias = _cabs_weight_grads(partial_ln1_dw, (9, 10), (ln1_weight, ln1_bias))
    grad_dw = partial_ln1_dw[:, :9].sum(0).t().reshape(dw_weight.shape).to(dw_weight.dtype)  # (9, C) -> (C, 1, 3, 3)
    return grad_x, grad_ln1_weight, grad_ln1_bias, grad_dw, grad_ln2_weight, grad_ln2_bias


def _cabs_dwconv_block_fake(x, h, w, ln1_weight, ln1_bias, dw_weight, ln2_weight, ln2_bias, eps):
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    return torch.empty_like(x), x.new_empty((x.shape[0], x.shape[2]), dtype=acc_dtype)


def _cabs_dwconv_block_backward_fake(grad_y, grad_se_mean, x, h, w, ln1_weight, ln1_bias, dw_weight, ln2_weight, ln2_bias, eps):
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
        x, weight, bias, residual, out, h, w, out_h, out_w, C, eps,
        LN_RESIDUAL_SILU=ln_params is not None, WIN_H=win_h, WIN_W=win_w,
        BLOCK_T=block_t, BLOCK_C=block_c, CT=ct, num_warps=num_warps,
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
    grid = (triton.cdiv(N, block_t), B)
    groups = weight_grad_groups(grid[0] * grid[1])
    grad_x = new_output((B, N, C), x.dtype, x.device)
    if ln_params is None:
        weight, bias, residual, grad_residual, partial = x, x, x, grad_x, grad_x  # unused by the pool-only kernel
    else:
        weight, bias, residual = (p.contiguous() for p in ln_params)
        grad_residual = new_output((B, N, C), residual.dtype, x.device)
        partial = torch.zeros((groups, 2, C), dtype=acc_dtype, device=x.device)
    _cabs_ln_residual_silu_avgpool_bwd[grid](
        grad_out, x, weight, bias, residual, grad_x, grad_residual, partial,
        h, w, out_h, out_w, C, eps, groups,
        LN_RESIDUAL_SILU=ln_params is not None, FAN_H=fan_h, FAN_W=fan_w,
        BLOCK_T=block_t, BLOCK_C=block_c, CT=ct, num_warps=num_warps,
    )
    if ln_params is None:
        return grad_x
    grad_weight, grad_bias = _cabs_weight_grads(partial, (0, 1), ln_params[:2])
    return grad_x, grad_weight, grad_bias, grad_residual


def _cabs_check_ln_residual(y, weight, bias, residual, h, w, out_h, out_w):
    check_kernel_inputs("ln_residual_silu", y, weight, bias, residual)
    _cabs_check_tokens("ln_residual_silu", y, h, w)
    if residual.shape != y.shape or weight.shape != (y.shape[2],) or bias.shape != (y.shape[2],):
        raise ValueError(f"ln_residual_silu: shapes y {tuple(y.shape)}, residual {tuple(residual.shape)}, weight {tuple(weight.shape)}, bias {tuple(bias.shape)} do not match")
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"ln_residual_silu: pooled size must be positive, got {(out_h, out_w)}")


def _cabs_ln_residual_silu_pool_forward(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, eps: float, h: int, w: int, out_h: int, out_w: int) -> torch.Tensor:
    _cabs_check_ln_residual(y, weight, bias, residual, h, w, out_h, out_w)
    return _cabs_pool_launch(y, h, w, out_h, out_w, (weight, bias, residual), eps)


def _cabs_ln_residual_silu_pool_backward(grad_out: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, eps: float, h: int, w: int, out_h: int, out_w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
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


def _cabs_adaptive_avg_pool_backward(grad_out: torch.Tensor, x: torch.Tensor, h: int, w: int, out_h: int, out_w: int) -> torch.Tensor:
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
        "honeybee::cabs_dwconv_block_backward", _cabs_dwconv_block_backward, _cabs_dwconv_block_backward_fake
    )
    cabs_dwconv_block_op = define_custom_op(
        "honeybee::cabs_dwconv_block", _cabs_dwconv_block_forward, _cabs_dwconv_block_fake,
        _cabs_dwconv_block_autograd_backward, _cabs_dwconv_block_setup_context,
    )
    ln_residual_silu_pool_backward_op = define_custom_op(
        "honeybee::ln_residual_silu_pool_backward", _cabs_ln_residual_silu_pool_backward, _cabs_ln_residual_silu_pool_backward_fake
    )
    ln_residual_silu_pool_op = define_custom_op(
        "honeybee::ln_residual_silu_pool", _cabs_ln_residual_silu_pool_forward, _cabs_ln_residual_silu_pool_fake,
        _cabs_ln_residual_silu_pool_autograd_backward, _cabs_ln_residual_silu_pool_setup_context,
    )
    adaptive_avg_pool_backward_op = define_custom_op(
        "honeybee::adaptive_avg_pool_backward", _cabs_adaptive_avg_pool_backward, _cabs_adaptive_avg_pool_backward_fake
    )
    adaptive_avg_pool_op = define_custom_op(
        "honeybee::adaptive_avg_pool", _cabs_adaptive_avg_pool_forward, _cabs_adaptive_avg_pool_fake,
        _cabs_adaptive_avg_pool_autograd_backward, _cabs_adaptive_avg_pool_setup_context,
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
