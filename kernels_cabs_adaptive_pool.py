"""PyTorch's adaptive average pool on token-major maps (B, h*w, C) -> (B, out_h*out_w, C), with its (possibly
overlapping) windows [floor(i*in/out), ceil((i+1)*in/out)): between the C-Abstractor's two RegStages (Honeybee,
arXiv 2312.06742 §3.2) and for the D-Abstractor's pooled queries. A PyTorch reference, the Triton kernels and the
entry point that picks one.

The kernels take an optional prologue, SiLU(LN(y) + residual), fused in so the last block of the first RegStage
never writes its full-resolution output: kernels_cabs_ln_residual_silu.py launches them with it. Kernel math is fp32
(fp64 for fp64 inputs); no atomics, so every result is deterministic.
"""

import functools
import itertools

import torch
import torch.nn.functional as F

from .kernels_common import (
    HAS_TRITON,
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
    canned_tensors,
    check_kernel_inputs,
    compute_dtype,
    define_custom_op,
    new_output,
    op_namespace,
    tl,
    triton,
    use_triton,
)

OP_NAMESPACE = op_namespace(__file__)


# ---- PyTorch reference --------------------------------------------------------------------------------------------


def adaptive_avg_pool_reference(x, h, w, out_h, out_w):
    """`nn.AdaptiveAvgPool2d` on token-major input, with PyTorch's (possibly overlapping) windows.

    x: (B, h*w, C) -> (B, out_h*out_w, C)
    """
    B, N, C = x.shape
    t = x.reshape(B, h, w, C).permute(0, 3, 1, 2)  # (B, C, h, w), a channels-last view
    return F.adaptive_avg_pool2d(t, (out_h, out_w)).permute(0, 2, 3, 1).reshape(B, out_h * out_w, C)  # (B, M, C)


# ---- Triton kernels: (optional LN + residual + SiLU), then the adaptive average pool ------------------------------


@triton.jit
def _cabs_pool_window(o, h_in, h_out):
    """PyTorch's adaptive pooling window along one axis: [floor(o*in/out), ceil((o+1)*in/out))."""
    return (o * h_in) // h_out, ((o + 1) * h_in + h_out - 1) // h_out


@triton.jit
def _cabs_ln_residual_silu_at(Y, R, b, token, valid, N, c, c_mask, C, weight, bias, eps, CT: tl.constexpr):
    """SiLU(LN(y) + r) at the given tokens. Returns (out, pre-activation, xhat, rstd)."""
    y = cabs_load_rows(Y, b, token, valid, N, c, c_mask, C, CT)
    pre, xhat, _, rstd = cabs_layer_norm(y, weight, bias, c_mask, C, eps)
    pre += cabs_load_rows(R, b, token, valid, N, c, c_mask, C, CT)
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
                val = cabs_load_rows(Y, b, token, valid, N, c, c_mask, C, CT)
            acc += tl.where(valid[:, None], val, 0.0)
    count = ((y1 - y0) * (x1 - x0)).to(CT)
    cabs_store_rows(OUT, b, o, o_mask, M, c, c_mask, C, acc / count[:, None])


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
            g = cabs_load_rows(GRAD_OUT, b, o, holds, M, c, c_mask, C, CT)
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
        t, t_mask, iy, ix = cabs_token_tile(tile, N, w, BLOCK_T)
        grad = _cabs_pooled_grad(
            GRAD_OUT, b, iy, ix, t_mask, h, w, out_h, out_w, c, c_mask, C, FAN_H, FAN_W, BLOCK_T, BLOCK_C, CT
        )
        if LN_RESIDUAL_SILU:
            _, pre, xhat, rstd = _cabs_ln_residual_silu_at(Y, R, b, t, t_mask, N, c, c_mask, C, weight, bias, eps, CT)
            grad_pre = grad * cabs_silu_grad(pre)  # grad is 0 on masked rows
            cabs_store_rows(GRAD_R, b, t, t_mask, N, c, c_mask, C, grad_pre)
            cabs_store_rows(
                GRAD_Y, b, t, t_mask, N, c, c_mask, C, cabs_layer_norm_backward(grad_pre, xhat, rstd, weight, C)
            )
            grad_weight += tl.sum(grad_pre * xhat, axis=0)
            grad_bias += tl.sum(grad_pre, axis=0)
        else:
            cabs_store_rows(GRAD_Y, b, t, t_mask, N, c, c_mask, C, grad)
    if LN_RESIDUAL_SILU:
        row = (b * tl.num_programs(0) + pid) * 2
        tl.store(PARTIAL + row * C + c, grad_weight, mask=c_mask)
        tl.store(PARTIAL + (row + 1) * C + c, grad_bias, mask=c_mask)


# ---- launch -------------------------------------------------------------------------------------------------------


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


# (b) + (c): ln_residual_silu_pool and adaptive_avg_pool


def cabs_pool_launch(x, h, w, out_h, out_w, ln_params, eps):
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
    block_t, block_c, num_warps = cabs_tiles(M, C, live_tiles=4)
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


def cabs_pool_backward_launch(grad_out, x, h, w, out_h, out_w, ln_params, eps):
    """Backward of `cabs_pool_launch`: grad_x, or (grad_y, grad_weight, grad_bias, grad_residual)."""
    B, N, C = x.shape
    grad_out, x = grad_out.contiguous(), x.contiguous()
    tensors = (x, grad_out) if ln_params is None else (x, grad_out, *ln_params)
    acc_dtype, ct = compute_dtype(*tensors)
    _, fan_h = _cabs_pool_window_bounds(h, out_h)
    _, fan_w = _cabs_pool_window_bounds(w, out_w)
    block_t, block_c, num_warps = cabs_tiles(N, C, live_tiles=5)
    tiles, programs = cabs_tiles_per_program(N, block_t, B, x.device)
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
    grad_weight, grad_bias = cabs_weight_grads(partial, (0, 1), ln_params[:2])
    return grad_x, grad_weight, grad_bias, grad_residual


def _cabs_check_pool(x, h, w, out_h, out_w):
    check_kernel_inputs("adaptive_avg_pool", x)
    cabs_check_tokens("adaptive_avg_pool", x, h, w)
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"adaptive_avg_pool: pooled size must be positive, got {(out_h, out_w)}")


def _cabs_adaptive_avg_pool_forward(x: torch.Tensor, h: int, w: int, out_h: int, out_w: int) -> torch.Tensor:
    _cabs_check_pool(x, h, w, out_h, out_w)
    return cabs_pool_launch(x, h, w, out_h, out_w, None, 0.0)


def _cabs_adaptive_avg_pool_backward(
    grad_out: torch.Tensor, x: torch.Tensor, h: int, w: int, out_h: int, out_w: int
) -> torch.Tensor:
    _cabs_check_pool(x, h, w, out_h, out_w)
    check_kernel_inputs("adaptive_avg_pool", x, grad_out)
    return cabs_pool_backward_launch(grad_out, x, h, w, out_h, out_w, None, 0.0)


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


# ---- entry point: the Triton kernel or the reference, as the backend and the tensors' device say ------------------


def adaptive_avg_pool_triton(x, h, w, out_h, out_w):
    """Triton `adaptive_avg_pool_reference`, with autograd."""
    return adaptive_avg_pool_op(x, h, w, out_h, out_w)


# The canned case for kernel_backend="auto"'s start-up check (kernels_common.use_triton): a 3 x 5 grid of 24
# channels (a ragged channel tile), pooled to 2 x 3 (overlapping windows).
def adaptive_avg_pool_canned_case():
    (x,) = canned_tensors((2, 15, 24))
    return adaptive_avg_pool_triton, adaptive_avg_pool_reference, (x, 3, 5, 2, 3)


def adaptive_avg_pool(x, h, w, out_h, out_w, backend="auto"):
    if use_triton(backend, adaptive_avg_pool_canned_case, x):
        return adaptive_avg_pool_triton(x, h, w, out_h, out_w)
    return adaptive_avg_pool_reference(x, h, w, out_h, out_w)
