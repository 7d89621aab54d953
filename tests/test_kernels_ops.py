"""The kernel dispatch (kernels/ops.py), the `honeybee::` custom ops (opcheck, torch.compile) and the coexistence of
the package kernels with their flat Hub copy `kernels_honeybee.py` in one process.

The dispatch tests that need no kernel also run without Triton (the tf4 environment); the rest skip there.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from honeybee_hf.kernels import common, ops
from honeybee_hf.kernels.reference import msda_reference

REPO_ROOT = Path(__file__).resolve().parent.parent
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not common.HAS_TRITON, reason="needs triton")


def msda_inputs(B=1, h=4, w=5, nh=2, hd=8, Q=6, P=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    value = torch.randn(B, h * w, nh, hd, generator=g, dtype=dtype)
    loc = torch.rand(B, Q, nh, 1, P, 2, generator=g, dtype=dtype) * 1.2 - 0.1
    logits = torch.randn(B, Q, nh, P, generator=g, dtype=dtype)
    return [t.to(DEVICE) for t in (value, loc, logits)], [(h, w)]


# ---- dispatch ----------------------------------------------------------------------------------------------


def test_unknown_backend_raises():
    (value, loc, logits), shapes = msda_inputs()
    with pytest.raises(ValueError, match="kernel_backend must be one of"):
        ops.msda(value, shapes, loc, logits, backend="cuda")


def test_torch_backend_is_the_reference():
    (value, loc, logits), shapes = msda_inputs()
    assert torch.equal(
        ops.msda(value, shapes, loc, logits, backend="torch"), msda_reference(value, shapes, loc, logits)
    )


def test_auto_takes_the_reference_on_cpu(monkeypatch):
    def no_kernel(*args):
        raise AssertionError("the Triton kernel ran for CPU tensors under backend='auto'")

    for name in (
        "msda_triton",
        "cabs_dwconv_block_triton",
        "ln_residual_silu_triton",
        "ln_residual_silu_pool_triton",
        "adaptive_avg_pool_triton",
    ):
        monkeypatch.setattr(ops, name, no_kernel)
    (value, loc, logits), shapes = msda_inputs(dtype=torch.float32)
    ops.msda(value.cpu(), shapes, loc.cpu(), logits.cpu())
    x = torch.randn(2, 12, 8)
    ops.adaptive_avg_pool(x, 3, 4, 2, 2)
    ops.ln_residual_silu(x, torch.ones(8), torch.zeros(8), x, 1e-5)
    ops.ln_residual_silu_pool(x, torch.ones(8), torch.zeros(8), x, 1e-5, 3, 4, 2, 2)
    ops.cabs_dwconv_block(
        x, 3, 4, torch.ones(8), torch.zeros(8), torch.randn(8, 1, 3, 3), torch.ones(8), torch.zeros(8), 1e-5
    )


def test_triton_backend_without_triton_says_so(monkeypatch):
    monkeypatch.setattr(common, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        ops.use_triton("triton", torch.zeros(1))


@needs_triton
def test_triton_backend_on_cpu_without_interpreter_says_so(monkeypatch):
    monkeypatch.setattr(common, "KERNELS_INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.use_triton("triton", torch.zeros(1))


@needs_triton
def test_triton_backend_on_cpu_without_interpreter_in_a_fresh_process():
    """The real case: TRITON_INTERPRET unset when the kernels are imported, no GPU."""
    code = (
        "import torch\n"
        "from honeybee_hf.kernels import ops\n"
        "try:\n"
        "    ops.adaptive_avg_pool(torch.zeros(1, 4, 2), 2, 2, 1, 1, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "TRITON_INTERPRET=1" in result.stdout and "before importing" in result.stdout


@needs_triton
def test_triton_backend_matches_torch_backend():
    """Every public entry point, both backends (wiring only: the kernel files test the numerics)."""
    torch.manual_seed(0)
    (value, loc, logits), shapes = msda_inputs()
    torch.testing.assert_close(
        ops.msda(value, shapes, loc, logits, backend="triton"), ops.msda(value, shapes, loc, logits, backend="torch")
    )
    x, r = torch.randn(2, 12, 8, device=DEVICE), torch.randn(2, 12, 8, device=DEVICE)
    weight, bias = torch.rand(8, device=DEVICE) + 0.5, torch.randn(8, device=DEVICE)
    dw = torch.randn(8, 1, 3, 3, device=DEVICE)
    calls = [
        lambda backend: ops.adaptive_avg_pool(x, 3, 4, 2, 3, backend=backend),
        lambda backend: ops.ln_residual_silu(x, weight, bias, r, 1e-5, backend=backend),
        lambda backend: ops.ln_residual_silu_pool(x, weight, bias, r, 1e-5, 3, 4, 2, 3, backend=backend),
        lambda backend: ops.cabs_dwconv_block(x, 3, 4, weight, bias, dw, weight, bias, 1e-5, backend=backend),
    ]
    for call in calls:
        torch.testing.assert_close(call("triton"), call("torch"), rtol=1e-5, atol=1e-5)


# ---- two copies of the kernels in one process ------------------------------------------------------------


@needs_triton
def test_package_and_hub_copy_coexist():
    """tests load the package kernels and the generated flat Hub module side by side: the second copy must
    reuse the `honeybee::` ops instead of failing to register them again."""
    spec = importlib.util.spec_from_file_location("kernels_honeybee_copy_under_test", REPO_ROOT / "kernels_honeybee.py")
    hub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hub)
    assert hub.HAS_TRITON and hub.KERNELS_INTERPRETED == common.KERNELS_INTERPRETED
    (value, loc, logits), shapes = msda_inputs()
    torch.testing.assert_close(
        hub.msda(value, shapes, loc, logits, backend="triton"), ops.msda(value, shapes, loc, logits, backend="triton")
    )
    x = torch.randn(1, 16, 4, device=DEVICE)
    torch.testing.assert_close(
        hub.adaptive_avg_pool(x, 4, 4, 3, 3, backend="triton"), ops.adaptive_avg_pool(x, 4, 4, 3, 3, backend="torch")
    )


# ---- custom ops --------------------------------------------------------------------------------------------


def opcheck_cases():
    from honeybee_hf.kernels.cabstractor import (
        adaptive_avg_pool_backward_op,
        adaptive_avg_pool_op,
        cabs_dwconv_block_backward_op,
        cabs_dwconv_block_op,
        ln_residual_silu_pool_backward_op,
        ln_residual_silu_pool_op,
    )
    from honeybee_hf.kernels.msda import msda_backward_op, msda_op

    g = torch.Generator().manual_seed(0)

    def t(*shape, grad=True):
        return (torch.rand(*shape, generator=g) + 0.25).to(DEVICE).requires_grad_(grad)

    B, h, w, C = 2, 3, 4, 8
    ln = [t(C), t(C)]
    dw_args = [t(B, h * w, C), h, w, *ln, t(C, 1, 3, 3), *ln, 1e-5]
    pool_ln_args = [t(B, h * w, C), *ln, t(B, h * w, C), 1e-5, h, w, 2, 3]
    (value, loc, logits), shapes = msda_inputs(B=2)
    msda_args = [value.requires_grad_(), [4, 5], loc.requires_grad_(), logits.requires_grad_()]
    return {
        "msda": (msda_op, msda_args),
        "msda_backward": (
            msda_backward_op,
            [t(2, 6, 16, grad=False), *[a.detach() if isinstance(a, torch.Tensor) else a for a in msda_args]],
        ),
        "cabs_dwconv_block": (cabs_dwconv_block_op, dw_args),
        "cabs_dwconv_block_backward": (
            cabs_dwconv_block_backward_op,
            [
                t(B, h * w, C, grad=False),
                t(B, C, grad=False),
                *[a.detach() if isinstance(a, torch.Tensor) else a for a in dw_args],
            ],
        ),
        "ln_residual_silu_pool": (ln_residual_silu_pool_op, pool_ln_args),
        "ln_residual_silu_pool_backward": (
            ln_residual_silu_pool_backward_op,
            [t(B, 6, C, grad=False), *[a.detach() if isinstance(a, torch.Tensor) else a for a in pool_ln_args]],
        ),
        "adaptive_avg_pool": (adaptive_avg_pool_op, [t(B, h * w, C), h, w, 2, 3]),
        "adaptive_avg_pool_backward": (
            adaptive_avg_pool_backward_op,
            [t(B, 6, C, grad=False), t(B, h * w, C, grad=False), h, w, 2, 3],
        ),
    }


OP_NAMES = [
    "msda",
    "msda_backward",
    "cabs_dwconv_block",
    "cabs_dwconv_block_backward",
    "ln_residual_silu_pool",
    "ln_residual_silu_pool_backward",
    "adaptive_avg_pool",
    "adaptive_avg_pool_backward",
]


@needs_triton
@pytest.mark.parametrize("name", OP_NAMES)
def test_opcheck(name):
    op, args = opcheck_cases()[name]
    torch.library.opcheck(op, args)


class TinyProjector(torch.nn.Module):
    """Every kernel entry point in one small module: a C-Abstractor block (token-major), the pool, and a
    deformable-attention read of the block input at locations predicted from the pooled tokens."""

    def __init__(self, backend, C=8, h=4, w=4, out=3, nh=2, P=2):
        super().__init__()
        self.backend, self.h, self.w, self.out, self.nh, self.P = backend, h, w, out, nh, P
        self.conv1 = torch.nn.Linear(C, C, bias=False)
        self.conv3 = torch.nn.Linear(C, C, bias=False)
        self.norms = torch.nn.Parameter(torch.stack([torch.ones(C), torch.zeros(C)] * 4) + 0.1 * torch.randn(8, C))
        self.dw = torch.nn.Parameter(0.3 * torch.randn(C, 1, 3, 3))
        self.loc = torch.nn.Linear(C, nh * P * 2)
        self.logits = torch.nn.Linear(C, nh * P)

    def forward(self, x):  # (B, h*w, C)
        B, N, C = x.shape
        n1w, n1b, n2w, n2b, n3w, n3b, n4w, n4b = self.norms
        t, se = ops.cabs_dwconv_block(
            self.conv1(x), self.h, self.w, n1w, n1b, self.dw, n2w, n2b, 1e-5, backend=self.backend
        )
        t = self.conv3(t * torch.sigmoid(se)[:, None, :].to(t.dtype))
        pooled = ops.ln_residual_silu_pool(
            t, n3w, n3b, x, 1e-5, self.h, self.w, self.out, self.out, backend=self.backend
        )
        query = ops.ln_residual_silu(
            pooled,
            n4w,
            n4b,
            ops.adaptive_avg_pool(x, self.h, self.w, self.out, self.out, backend=self.backend),
            1e-5,
            backend=self.backend,
        )
        M = self.out * self.out
        loc = torch.sigmoid(self.loc(query)).view(B, M, self.nh, 1, self.P, 2)  # (B, M, nh, L=1, P, 2)
        logits = self.logits(query).view(B, M, self.nh, self.P)
        return ops.msda(x.view(B, N, self.nh, C // self.nh), [(self.h, self.w)], loc, logits, backend=self.backend)


def run_and_grad(model, x):
    out = model(x)
    out.backward(torch.ones_like(out))
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return out.detach(), grads


@needs_triton
@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager", "inductor"])
def test_torch_compile(compile_backend):
    """The custom ops trace without graph breaks and train under torch.compile. inductor included: its first
    CPU compile takes ~20-40 s here, worth it since it is the default backend."""
    torch.manual_seed(0)
    model = TinyProjector("triton").to(DEVICE)
    reference = TinyProjector("torch").to(DEVICE)
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 16, 8, device=DEVICE)

    eager_out, eager_grads = run_and_grad(model, x)
    compiled_out, compiled_grads = run_and_grad(torch.compile(model, backend=compile_backend, fullgraph=True), x)
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-6)
    for compiled, eager in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)

    ref_out, ref_grads = run_and_grad(reference, x)
    torch.testing.assert_close(eager_out, ref_out, rtol=1e-4, atol=1e-5)
    for eager, ref in zip(eager_grads, ref_grads):
        torch.testing.assert_close(eager, ref, rtol=1e-3, atol=1e-4)
