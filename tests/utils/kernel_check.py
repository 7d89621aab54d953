"""What the kernel tests share: the device, the tolerances against the fp64 reference, NaN-poisoned outputs, the
relative error, and the kernel-vs-reference check of outputs and gradients.

Without a GPU the kernels run under Triton's interpreter (conftest.py sets TRITON_INTERPRET=1 before anything
imports them). Errors are max|kernel - ref| / max|ref| per tensor.
"""

import pytest
import torch

from honeybee_hf.kernels_common import HAS_TRITON, POISON_OUTPUTS_ENV

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton (pip install 'triton>=3.6')")

# Tolerance on max|err| / max|ref| against the fp64 reference. fp32: accumulation-order noise. fp16/bf16: the
# rounding of the outputs (inputs are exact in both); the interpreter truncates fp32 -> bf16 where a GPU rounds
# to nearest, so bf16 gets one whole ulp (2^-8 relative) plus noise.
TOL_VS_FP64 = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2, torch.float64: 1e-12}


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every output a kernel must write completely starts as NaN, so a missed store fails the comparison.

    Import it into a test module to apply it there (it is autouse)."""
    monkeypatch.setenv(POISON_OUTPUTS_ENV, "1")


def rel_err(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()


def randn(*shape, dtype, generator, scale=1.0, shift=0.0):
    return (shift + scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).to(dtype).to(DEVICE)


def check(kernel_fn, reference_fn, inputs, names, dtype, tol_vs_same_dtype):
    """Run kernel_fn(*inputs) and reference_fn on the same values in `dtype` and in fp64: outputs, and gradients of
    every tensor input for random output gradients. `tol_vs_same_dtype` maps dtype -> tolerance against the
    reference run in that dtype (both sides round there), or has no entry to skip that comparison.

    Returns {(name, "fp64" | "same dtype"): error}.
    """
    inputs = [t.requires_grad_() if isinstance(t, torch.Tensor) else t for t in inputs]
    leaves = [t for t in inputs if isinstance(t, torch.Tensor)]
    outputs = kernel_fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    g = torch.Generator().manual_seed(1)
    grad_outputs = [randn(*o.shape, dtype=o.dtype, generator=g) for o in outputs]
    results = (*outputs, *torch.autograd.grad(outputs, leaves, grad_outputs))
    errors = {}
    for ref_dtype, tol in ((torch.float64, TOL_VS_FP64[dtype]), (dtype, tol_vs_same_dtype.get(dtype))):
        if tol is None:
            continue
        ref_inputs = [t.detach().to(ref_dtype).requires_grad_() if isinstance(t, torch.Tensor) else t for t in inputs]
        ref_leaves = [t for t in ref_inputs if isinstance(t, torch.Tensor)]
        ref_outputs = reference_fn(*ref_inputs)
        ref_outputs = ref_outputs if isinstance(ref_outputs, tuple) else (ref_outputs,)
        grads = torch.autograd.grad(
            ref_outputs, ref_leaves, [go.to(o.dtype) for go, o in zip(grad_outputs, ref_outputs)]
        )
        for name, actual, ref in zip(names, results, (*ref_outputs, *grads)):
            assert actual.shape == ref.shape, name
            assert not actual.isnan().any(), f"{name}: unwritten (NaN) elements"
            err = rel_err(actual, ref)
            assert err <= tol, f"{name} vs {ref_dtype} reference: {err:.2e} > {tol:.0e}"
            errors[name, "fp64" if ref_dtype == torch.float64 else "same dtype"] = err
    return errors
