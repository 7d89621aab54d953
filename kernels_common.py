"""What the projector kernel modules share: the guarded Triton import, the backend rule (which path an op takes,
with "auto"'s start-up check of each kernel), dtype rules, output allocation and custom-op registration.

The kernels are flat modules next to `modeling_honeybee.py` (`kernels_msda.py`, the three `kernels_cabs_*.py`,
this one), so the package and every Hub folder run the same files: transformers' remote-code loader follows relative
imports between flat sibling files, never into a sub-package.

Triton is optional (the tf4 test environment and CPU-only installs have none). Without it the kernels still
*define* (against a stand-in `triton`/`tl`), but nothing launches them: every op takes its PyTorch reference.
"""

import hashlib
import os
import warnings
from pathlib import Path

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

# Tests set this environment variable to "1" to fill every kernel output with NaN before launch, so an element a
# kernel forgets to store shows up as NaN instead of as whatever `torch.empty` happened to return. An environment
# variable, read per call, reaches whichever copy of these files registered the ops.
POISON_OUTPUTS_ENV = "HONEYBEE_POISON_KERNEL_OUTPUTS"


def new_output(shape, dtype, device):
    """Allocate a tensor that a kernel writes completely (no atomics into it)."""
    if os.environ.get(POISON_OUTPUTS_ENV) == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


KERNEL_BACKENDS = ("auto", "triton", "torch")


def check_kernel_backend(backend):
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"kernel_backend must be one of {KERNEL_BACKENDS}, got {backend!r}")


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
            "decorates). Set TRITON_INTERPRET=1 in the environment before importing the model or its kernels "
            "(slow: meant for tests), move the tensors to a GPU, or use backend='torch'"
        )
    return f"Triton kernels do not run on {device.type} tensors; use backend='torch'"


# The device types whose tensors "auto" offers to the kernels. CPU tensors run them only under Triton's interpreter,
# which is for tests (slow): a test adds "cpu" here to run auto's start-up check through the interpreter.
AUTO_KERNEL_DEVICE_TYPES = ("cuda",)

# The largest max|kernel - reference| / max|reference| (per output and per input gradient) that "auto"'s start-up
# check accepts, the reference computed in fp64 on the CPU from the same rounded inputs. A few times what the
# kernel tests measure (fp32 accumulation order; fp16/bf16 output rounding, a whole bf16 ulp where Triton's
# interpreter truncates), and far below what a wrong kernel gives (a doubled output: 1.0).
SELF_CHECK_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}

# (canned case, device, dtype) -> whether the kernel passed its start-up check there, for this process.
_KERNEL_VERDICTS = {}


def _relative_error(actual, expected):
    expected = expected.double()
    return ((actual.double().cpu() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def _self_check_error(kernel, reference, args, device, dtype):
    """Run `kernel` on `args` (its tensors fp64 on the CPU) cast to `dtype` on `device`, forward and backward, and
    `reference` on the same rounded values in fp64 on the CPU; None when every output and gradient agrees, else
    what went wrong."""
    tolerance = SELF_CHECK_TOLERANCE[dtype]
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        inputs = [a.to(dtype).to(device).requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
        expected_inputs = [a.to(dtype).double().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
        results = []
        for fn, fn_inputs in ((kernel, inputs), (reference, expected_inputs)):
            outputs = fn(*fn_inputs)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            leaves = [a for a in fn_inputs if isinstance(a, torch.Tensor)]
            g = torch.Generator().manual_seed(0)  # the same output gradients for both
            grad_outputs = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o) for o in outputs]
            grads = torch.autograd.grad(outputs, leaves, grad_outputs)
            results.append([(f"output {i}", o) for i, o in enumerate(outputs)])
            results[-1] += [(f"gradient of input {i}", gr) for i, gr in enumerate(grads)]
    for (name, actual), (_, expected) in zip(*results):
        error = _relative_error(actual, expected) if actual.shape == expected.shape else float("inf")
        if not error <= tolerance:  # NaN fails too
            return f"{name} differs from the PyTorch reference by {error:.1e} (tolerance {tolerance:.0e})"
    return None


@torch.compiler.assume_constant_result  # under torch.compile: run once while tracing, the verdict a constant
def kernel_passes_self_check(canned_case, device, dtype):
    """Whether the kernel behind `canned_case` computes right on `device` in `dtype`: checked the first time it is
    asked in this process (a few milliseconds on a GPU), remembered after. A kernel that fails to compile or
    launch, or that disagrees with its PyTorch reference beyond `SELF_CHECK_TOLERANCE`, fails, with one warning
    naming it, the device, the dtype and the error."""
    key = (canned_case, device, dtype)
    if key not in _KERNEL_VERDICTS and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False  # nothing may run inside a CUDA-graph capture: the reference, unchecked, for this call
    if key not in _KERNEL_VERDICTS:
        kernel, reference, args = canned_case()
        try:
            error = _self_check_error(kernel, reference, args, device, dtype)
        except Exception as e:  # any compile or launch error: that is what the check is for
            error = f"{type(e).__name__}: {e}".strip().splitlines()[0]
        if error is not None:
            warnings.warn(
                f"Honeybee's Triton kernel {kernel.__name__} failed its start-up check on {device} in {dtype} "
                f"({error}); kernel_backend='auto' uses the PyTorch reference for it on {device} in {dtype} from "
                "now on (kernel_backend='triton' would run the kernel anyway and raise on errors)",
                RuntimeWarning,
                stacklevel=2,
            )
        _KERNEL_VERDICTS[key] = error is None
    return _KERNEL_VERDICTS[key]


def canned_tensors(*shapes, seed=0):
    """Reproducible fp64 CPU tensors of these shapes: the inputs of an op's canned case for "auto"'s check."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for shape in shapes]


def canned_norm(channels, seed):
    """A reproducible (weight, bias) pair of a channel norm for a canned case, weights away from zero."""
    g = torch.Generator().manual_seed(seed)
    weight = 0.5 + torch.rand(channels, generator=g, dtype=torch.float64)
    return weight, torch.randn(channels, generator=g, dtype=torch.float64)


def use_triton(backend, canned_case, *tensors):
    """Whether an op runs its Triton kernel for these tensors: the one rule every op's entry point follows.

    "torch" never does. "auto" does when Triton imports, the tensors are on a GPU and the kernel passed its
    start-up check there in the first tensor's dtype (`kernel_passes_self_check` on `canned_case`: a function
    returning the kernel, its reference and a small input for both, its tensors fp64 on the CPU). "triton" always
    does, with no check, and raises (saying why) where the kernels cannot run. Raises on an unknown backend.
    """
    check_kernel_backend(backend)
    if backend == "torch":
        return False
    if backend == "auto":
        if not (HAS_TRITON and all(t.device.type in AUTO_KERNEL_DEVICE_TYPES for t in tensors)):
            return False
        if tensors[0].dtype not in KERNEL_DTYPES:
            return False
        return kernel_passes_self_check(canned_case, tensors[0].device, tensors[0].dtype)
    for t in tensors:
        reason = kernels_unavailable_reason(t.device)
        if reason is not None:
            raise RuntimeError(f"kernel_backend='triton' cannot run here: {reason}")
    return True


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


def accumulation_dtype(t):
    """fp32 for fp16/bf16/fp32 tensors, fp64 for fp64 ones (so the references double as fp64 references)."""
    return torch.promote_types(t.dtype, torch.float32)


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


def op_namespace(module_file):
    """`torch.ops` namespace of the custom ops defined in `module_file`: named after a hash of the bytes of that
    file and of this one, the code behind the ops (as the Kernel Hub's builds do).

    Two copies of the same files in one process (the package and a Hub folder, or two Hub folders at one revision)
    share their ops by construction; copies that differ by a byte register separate ops, so none runs another's
    code whatever the import order.
    """
    digest = hashlib.sha256(Path(__file__).read_bytes() + Path(module_file).read_bytes()).hexdigest()
    return f"honeybee_{digest[:16]}"


def define_custom_op(namespace, name, impl, fake, backward=None, setup_context=None):
    """`torch.library.custom_op` `namespace::name`, or the op already registered under that name.

    The namespace comes from `op_namespace`, so an op registered before was registered by identical code (another
    copy of these files in the process): reuse it, as registering a name twice raises.
    """
    try:
        return getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        pass  # not registered yet
    op = torch.library.custom_op(f"{namespace}::{name}", impl, mutates_args=())
    op.register_fake(fake)
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)
    return op


# ---- C-Abstractor kernels: the pieces their three ops share -----------------------------------------------------

# A token's channels must fit one register tile ([BLOCK_T, next_pow2(C)]): LayerNorm needs the whole row.
CABS_MAX_CHANNELS = 16384


@triton.jit
def cabs_layer_norm(x, weight, bias, c_mask, C, eps):
    """Row LayerNorm of a [BLOCK_T, BLOCK_C] tile whose padding columns hold 0. Returns (out, xhat, mean, rstd)."""
    mean = tl.sum(x, axis=1) / C
    diff = tl.where(c_mask[None, :], x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / C + eps)
    xhat = diff * rstd[:, None]
    return xhat * weight[None, :] + bias[None, :], xhat, mean, rstd


@triton.jit
def cabs_layer_norm_backward(grad_out, xhat, rstd, weight, C):
    """d loss / d x of LayerNorm, given d loss / d out: rstd * (g - mean(g) - xhat * mean(g * xhat)), g = grad*w."""
    g = grad_out * weight[None, :]
    mean_g = tl.sum(g, axis=1) / C
    mean_gx = tl.sum(g * xhat, axis=1) / C
    return rstd[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None])


@triton.jit
def cabs_silu_grad(u):
    """d silu(u) / du = s * (1 + u * (1 - s)), s = sigmoid(u)."""
    s = tl.sigmoid(u)
    return s * (1.0 + u * (1.0 - s))


@triton.jit
def cabs_load_rows(PTR, b, tokens, row_mask, N, c, c_mask, C, CT: tl.constexpr):
    """Load tokens [BLOCK_T] of image b from a (B, N, C) tensor as a [BLOCK_T, BLOCK_C] CT tile (0 where masked).

    `tokens` must already be clamped into [0, N): masked lanes still form addresses.
    """
    offs = (b * N + tokens).to(tl.int64)[:, None] * C + c[None, :]
    return tl.load(PTR + offs, mask=row_mask[:, None] & c_mask[None, :], other=0.0).to(CT)


@triton.jit
def cabs_store_rows(PTR, b, tokens, row_mask, N, c, c_mask, C, value):
    offs = (b * N + tokens).to(tl.int64)[:, None] * C + c[None, :]
    tl.store(PTR + offs, value.to(PTR.dtype.element_ty), mask=row_mask[:, None] & c_mask[None, :])


# ---- kernel (a): LN1+SiLU -> depthwise 3x3 -> LN2+SiLU -> SE mean -------------------------------------------


#
# Forward and backward part 1 loop over TILES token tiles of one image per program, so that their per-channel
# reductions (SE sum, LN2 weight gradients) are written once per program as a partial row: plain stores into a
# small (programs, rows, C) buffer that a `.sum` finishes. No atomics: deterministic, and the number of partial
# rows is bounded by the launch size, not by B*N.


@triton.jit
def cabs_token_tile(tile, N, w, BLOCK_T: tl.constexpr):
    """Tokens of one tile of an image, clamped into [0, N), their mask, row and column."""
    t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < N
    t = tl.minimum(t, N - 1)
    return t, t_mask, t // w, t % w


# ---- launch ------------------------------------------------------------------------------------------------


def cabs_tiles(tokens, C, live_tiles):
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


def cabs_tiles_per_program(tokens, block_t, B, device):
    """(TILES, programs per image) for the kernels that loop over token tiles to write one partial row each.

    Interpreter: one program per image (the loop then runs over a few large tiles). GPU: about four programs
    per SM in total, so the partial-sum buffer stays small whatever B*N is.
    """
    tiles = triton.cdiv(tokens, block_t)
    per_program = tiles if KERNELS_INTERPRETED else max(1, triton.cdiv(tiles * B, 4 * sm_count(device)))
    return per_program, triton.cdiv(tiles, per_program)


def cabs_check_tokens(op_name, x, h, w):
    if x.dim() != 3 or x.shape[1] != h * w:
        raise ValueError(f"{op_name}: expected (B, h*w = {h * w}, C) token-major input, got {tuple(x.shape)}")
    if x.shape[0] == 0 or h <= 0 or w <= 0:
        raise ValueError(f"{op_name}: empty input {tuple(x.shape)}")


def cabs_weight_grads(partial, rows, params):
    """Finish the partial sums: (programs, rows, C) -> one gradient per param, in the param's dtype."""
    return [partial[:, row].sum(0).to(p.dtype) for row, p in zip(rows, params)]  # separate tensors, no views
