"""C-Abstractor (Honeybee, arXiv 2312.06742 §3.2) fusion of the end of a RegNet bottleneck: `ln_residual_silu` =
SiLU(LN(y) + residual) on token-major maps (B, h*w, C), and `ln_residual_silu_pool`, the same followed by the
adaptive average pool, fused (the full-resolution output is never written). A PyTorch reference, the Triton op and
the entry points that pick one. The kernels are the adaptive pool's (kernels_cabs_adaptive_pool.py) with their
LN + residual + SiLU prologue on; with out == in the pool is the identity.
"""

import torch
import torch.nn.functional as F

from .kernels_cabs_adaptive_pool import adaptive_avg_pool_reference, cabs_pool_backward_launch, cabs_pool_launch
from .kernels_common import (
    HAS_TRITON,
    cabs_check_tokens,
    canned_norm,
    canned_tensors,
    check_kernel_inputs,
    define_custom_op,
    op_namespace,
    use_triton,
)

OP_NAMESPACE = op_namespace(__file__)


# ---- PyTorch references -------------------------------------------------------------------------------------------


def ln_residual_silu_reference(y, weight, bias, residual, eps):
    """The end of a RegNet bottleneck: SiLU(LN(y) + residual), all (B, N, C)."""
    return F.silu(F.layer_norm(y, (y.shape[-1],), weight, bias, eps) + residual)


def ln_residual_silu_pool_reference(y, weight, bias, residual, eps, h, w, out_h, out_w):
    """`ln_residual_silu` followed by `adaptive_avg_pool`: the end of the last block before the pool, fused."""
    return adaptive_avg_pool_reference(ln_residual_silu_reference(y, weight, bias, residual, eps), h, w, out_h, out_w)


# ---- launch -------------------------------------------------------------------------------------------------------


def _cabs_check_ln_residual(y, weight, bias, residual, h, w, out_h, out_w):
    check_kernel_inputs("ln_residual_silu", y, weight, bias, residual)
    cabs_check_tokens("ln_residual_silu", y, h, w)
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
    return cabs_pool_launch(y, h, w, out_h, out_w, (weight, bias, residual), eps)


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
    return cabs_pool_backward_launch(grad_out, y, h, w, out_h, out_w, (weight, bias, residual), eps)


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


if HAS_TRITON:
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


# ---- entry points: the Triton kernel or the reference, as the backend and the tensors' device say -----------------


def ln_residual_silu_pool_triton(y, weight, bias, residual, eps, h, w, out_h, out_w):
    """SiLU(LN(y) + residual) on an h x w token grid, average-pooled to out_h x out_w; with autograd."""
    return ln_residual_silu_pool_op(y, weight, bias, residual, eps, h, w, out_h, out_w)


def ln_residual_silu_triton(y, weight, bias, residual, eps):
    """Triton `ln_residual_silu_reference`: the fused kernel with an identity pool (a 1 x N grid)."""
    N = y.shape[1]
    return ln_residual_silu_pool_op(y, weight, bias, residual, eps, 1, N, 1, N)


# The canned case for kernel_backend="auto"'s start-up check (kernels_common.use_triton): a 3 x 5 grid of 24
# channels (a ragged channel tile), pooled to 2 x 3 (overlapping windows).
def ln_residual_silu_canned_case():
    y, residual = canned_tensors((2, 15, 24), (2, 15, 24))
    return ln_residual_silu_triton, ln_residual_silu_reference, (y, *canned_norm(24, seed=1), residual, 1e-5)


def ln_residual_silu_pool_canned_case():
    y, residual = canned_tensors((2, 15, 24), (2, 15, 24))
    args = (y, *canned_norm(24, seed=1), residual, 1e-5, 3, 5, 2, 3)
    return ln_residual_silu_pool_triton, ln_residual_silu_pool_reference, args


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
