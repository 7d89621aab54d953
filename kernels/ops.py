"""The projector's kernel entry points: one dispatch rule picks the Triton kernel or the PyTorch reference.

backend = "torch" always takes the reference; "triton" always takes the kernel (on CPU tensors only under
TRITON_INTERPRET=1, set before this module is imported); "auto" takes the kernel when Triton imports and the
tensors are on a GPU, and the reference otherwise.
"""

from .reference import (
    adaptive_avg_pool_reference,
    cabs_dwconv_block_reference,
    ln_residual_silu_reference,
    msda_reference,
)

KERNEL_BACKENDS = ("auto", "triton", "torch")
HAS_TRITON = False  # set by the Triton kernel modules when they import


def use_triton(backend, *tensors):
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"kernel_backend must be one of {KERNEL_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "triton":
        raise RuntimeError("kernel_backend='triton' was asked for, but no Triton kernel is available here")
    return False


def msda(value, spatial_shapes, sampling_locations, attention_logits, backend="auto"):
    use_triton(backend, value, sampling_locations, attention_logits)
    return msda_reference(value, spatial_shapes, sampling_locations, attention_logits)


def cabs_dwconv_block(x, h, w, ln1_weight, ln1_bias, dw_weight, ln2_weight, ln2_bias, eps, backend="auto"):
    use_triton(backend, x)
    return cabs_dwconv_block_reference(x, h, w, ln1_weight, ln1_bias, dw_weight, ln2_weight, ln2_bias, eps)


def ln_residual_silu(y, weight, bias, residual, eps, backend="auto"):
    use_triton(backend, y)
    return ln_residual_silu_reference(y, weight, bias, residual, eps)


def adaptive_avg_pool(x, h, w, out_h, out_w, backend="auto"):
    use_triton(backend, x)
    return adaptive_avg_pool_reference(x, h, w, out_h, out_w)
