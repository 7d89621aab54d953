"""The projector's kernel entry points: one dispatch rule picks the Triton kernel or the PyTorch reference.

backend = "torch" always takes the reference; "triton" always takes the kernel (on CPU tensors only under
TRITON_INTERPRET=1, set before this module is imported, else it raises and says why); "auto" takes the kernel
when Triton imports and the tensors are on a GPU, and the reference otherwise.

The Triton paths are `torch.library.custom_op`s (namespace `honeybee`) with fake and autograd registrations, so
they train and run under `torch.compile` (as opaque ops).
"""

from .cabstractor import (
    adaptive_avg_pool_triton,
    cabs_dwconv_block_triton,
    ln_residual_silu_pool_triton,
    ln_residual_silu_triton,
)
from .common import HAS_TRITON, kernels_unavailable_reason
from .msda import msda_triton
from .reference import (
    adaptive_avg_pool_reference,
    cabs_dwconv_block_reference,
    ln_residual_silu_pool_reference,
    ln_residual_silu_reference,
    msda_reference,
)

KERNEL_BACKENDS = ("auto", "triton", "torch")


def use_triton(backend, *tensors):
    """Whether the Triton kernel runs for these tensors; raises on an unknown backend or an impossible 'triton'."""
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"kernel_backend must be one of {KERNEL_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "auto":
        return HAS_TRITON and all(t.is_cuda for t in tensors)
    for t in tensors:
        reason = kernels_unavailable_reason(t.device)
        if reason is not None:
            raise RuntimeError(f"kernel_backend='triton' cannot run here: {reason}")
    return True


def msda(value, spatial_shapes, sampling_locations, attention_logits, backend="auto"):
    if use_triton(backend, value, sampling_locations, attention_logits):
        return msda_triton(value, spatial_shapes, sampling_locations, attention_logits)
    return msda_reference(value, spatial_shapes, sampling_locations, attention_logits)


def cabs_dwconv_block(x, h, w, ln1_weight, ln1_bias, dw_weight, ln2_weight, ln2_bias, eps, backend="auto"):
    if use_triton(backend, x):
        return cabs_dwconv_block_triton(x, h, w, ln1_weight, ln1_bias, dw_weight, ln2_weight, ln2_bias, eps)
    return cabs_dwconv_block_reference(x, h, w, ln1_weight, ln1_bias, dw_weight, ln2_weight, ln2_bias, eps)


def ln_residual_silu(y, weight, bias, residual, eps, backend="auto"):
    if use_triton(backend, y):
        return ln_residual_silu_triton(y, weight, bias, residual, eps)
    return ln_residual_silu_reference(y, weight, bias, residual, eps)


def ln_residual_silu_pool(y, weight, bias, residual, eps, h, w, out_h, out_w, backend="auto"):
    """`ln_residual_silu` then `adaptive_avg_pool`, fused on the Triton path (the full-resolution output is never
    written): for the last block of the first RegStage, whose output only feeds the pool."""
    if use_triton(backend, y):
        return ln_residual_silu_pool_triton(y, weight, bias, residual, eps, h, w, out_h, out_w)
    return ln_residual_silu_pool_reference(y, weight, bias, residual, eps, h, w, out_h, out_w)


def adaptive_avg_pool(x, h, w, out_h, out_w, backend="auto"):
    if use_triton(backend, x):
        return adaptive_avg_pool_triton(x, h, w, out_h, out_w)
    return adaptive_avg_pool_reference(x, h, w, out_h, out_w)
