"""What the Triton kernel modules share: the guarded Triton import, dtype rules, output allocation, op registration.

Triton is optional (the tf4 test environment and CPU-only installs have none). Without it the kernels below
still *define* (against a stand-in `triton`/`tl`), but nothing launches them: `ops.py` takes the references.
"""

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

if not HAS_TRITON:

    class _TritonStandIn:
        """Takes the place of `triton` and `triton.language` so that `@triton.jit` and `tl.constexpr` annotations
        evaluate; the decorated functions are never called."""

        constexpr = None

        @staticmethod
        def jit(fn=None, **kwargs):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _TritonStandIn()


@triton.jit
def _interpreter_probe():
    pass


# Triton reads TRITON_INTERPRET when `@triton.jit` decorates, so the decorated probe says how every kernel in
# this package was built: interpreted (runs on CPU tensors, one numpy program at a time) or compiled (GPU only).
KERNELS_INTERPRETED = HAS_TRITON and type(_interpreter_probe).__name__ == "InterpretedFunction"

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Tests set this to fill every kernel output with NaN before launch, so an element a kernel forgets to store
# shows up as NaN instead of as whatever `torch.empty` happened to return.
POISON_OUTPUTS = False


def new_output(shape, dtype, device):
    """Allocate a tensor that a kernel writes completely (no atomics into it)."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def kernels_unavailable_reason(device):
    """None when the Triton kernels can run on tensors of `device`; otherwise why not, and what to do."""
    if not HAS_TRITON:
        return "Triton is not installed (`pip install 'triton>=3.6'`); use backend='torch' (the PyTorch reference)"
    if device.type == "cuda" or (device.type == "cpu" and KERNELS_INTERPRETED):
        return None
    if device.type == "cpu":
        return (
            "the tensors are on the CPU, where Triton kernels only run under Triton's interpreter, and "
            "TRITON_INTERPRET=1 was not set when the kernels were imported (Triton reads it when `@triton.jit` "
            "decorates). Set TRITON_INTERPRET=1 in the environment before importing honeybee_hf.kernels or "
            "kernels_honeybee (slow: meant for tests), move the tensors to a GPU, or use backend='torch'"
        )
    return f"Triton kernels do not run on {device.type} tensors; use backend='torch'"


def check_kernel_inputs(op_name, *tensors):
    """Raise on what the kernels do not handle, instead of computing garbage."""
    device = tensors[0].device
    reason = kernels_unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"{op_name}: {reason}")
    for t in tensors:
        if t.dtype not in KERNEL_DTYPES:
            raise TypeError(f"{op_name}: Triton kernel supports {KERNEL_DTYPES}, got a {t.dtype} tensor")
        if t.device != device:
            raise ValueError(f"{op_name}: all tensors must be on one device, got {device} and {t.device}")


def compute_dtype(*tensors):
    """In-kernel math dtype: fp64 when any input is fp64 (gradcheck needs it), fp32 otherwise (fp16/bf16 too).

    Returns (torch dtype, Triton dtype): the first sizes fp32/fp64 accumulation buffers, the second is the
    `CT` constexpr passed to the kernels.
    """
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64, tl.float64
    return torch.float32, tl.float32


def next_pow2(n):
    return 1 << max(0, int(n) - 1).bit_length()


_SM_COUNTS = {}


def sm_count(device):
    """Streaming multiprocessors of a GPU (cached: also read inside CUDA-graph capture)."""
    if device not in _SM_COUNTS:
        _SM_COUNTS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNTS[device]


def define_custom_op(qualname, impl, fake, backward=None, setup_context=None):
    """`torch.library.custom_op` that tolerates a second copy of this code in the process.

    The package module `honeybee_hf.kernels.*` and the flat Hub copy `kernels_honeybee.py` hold the same
    kernels, and both may be imported in one process; registering one op name twice raises. The second copy
    therefore reuses the op the first registered (the code behind it is the same).
    """
    namespace, name = qualname.split("::")
    try:
        return getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        pass  # not registered yet
    op = torch.library.custom_op(qualname, impl, mutates_args=())
    op.register_fake(fake)
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)
    return op
