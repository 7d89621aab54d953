"""The kernel entry points' dispatch (`use_triton`), the kernel backend as runtime state of a model, the op
namespaces, the custom ops (opcheck, torch.compile), and the remote-code layout of the kernel files.

The tests that need no kernel also run without Triton (the tf4 environment); the rest skip there.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers.dynamic_module_utils import get_imports, get_relative_imports

import honeybee_hf.kernels_cabs_adaptive_pool as adaptive_pool
import honeybee_hf.kernels_cabs_dwconv_block as dwconv
import honeybee_hf.kernels_cabs_ln_residual_silu as ln_residual
import honeybee_hf.kernels_common as common
import honeybee_hf.kernels_msda as msda_module
from honeybee_hf.hub.folder import CODE_FILES
from honeybee_hf.testing_utils import tiny_config, tiny_model
from utils import PACKAGE_DIR
from utils.kernel_check import DEVICE, needs_triton

TRITON_ENTRY_POINTS = [
    (msda_module, "msda_triton"),
    (dwconv, "cabs_dwconv_block_triton"),
    (ln_residual, "ln_residual_silu_triton"),
    (ln_residual, "ln_residual_silu_pool_triton"),
    (adaptive_pool, "adaptive_avg_pool_triton"),
]


def msda_inputs(B=1, h=4, w=5, nh=2, hd=8, Q=6, P=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    value = torch.randn(B, h * w, nh, hd, generator=g, dtype=dtype)
    loc = torch.rand(B, Q, nh, 1, P, 2, generator=g, dtype=dtype) * 1.2 - 0.1
    logits = torch.randn(B, Q, nh, P, generator=g, dtype=dtype)
    return [t.to(DEVICE) for t in (value, loc, logits)], [(h, w)]


def no_kernel(*args):
    raise AssertionError("a Triton kernel ran where the PyTorch reference should")


# ---- dispatch ----------------------------------------------------------------------------------------------


def test_unknown_backend_raises():
    (value, loc, logits), shapes = msda_inputs()
    with pytest.raises(ValueError, match="kernel_backend must be one of"):
        msda_module.msda(value, shapes, loc, logits, backend="cuda")


def test_torch_backend_is_the_reference():
    (value, loc, logits), shapes = msda_inputs()
    assert torch.equal(
        msda_module.msda(value, shapes, loc, logits, backend="torch"),
        msda_module.msda_reference(value, shapes, loc, logits),
    )


def test_auto_takes_the_reference_on_cpu(monkeypatch):
    for module, name in TRITON_ENTRY_POINTS:
        monkeypatch.setattr(module, name, no_kernel)
    (value, loc, logits), shapes = msda_inputs(dtype=torch.float32)
    msda_module.msda(value.cpu(), shapes, loc.cpu(), logits.cpu())
    x = torch.randn(2, 12, 8)
    adaptive_pool.adaptive_avg_pool(x, 3, 4, 2, 2)
    ln_residual.ln_residual_silu(x, torch.ones(8), torch.zeros(8), x, 1e-5)
    ln_residual.ln_residual_silu_pool(x, torch.ones(8), torch.zeros(8), x, 1e-5, 3, 4, 2, 2)
    dwconv.cabs_dwconv_block(
        x, 3, 4, torch.ones(8), torch.zeros(8), torch.randn(8, 1, 3, 3), torch.ones(8), torch.zeros(8), 1e-5
    )


def test_triton_backend_without_triton_says_so(monkeypatch):
    monkeypatch.setattr(common, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        common.use_triton("triton", adaptive_pool.adaptive_avg_pool_canned_case, torch.zeros(1))


@needs_triton
def test_triton_backend_on_cpu_without_interpreter_says_so(monkeypatch):
    monkeypatch.setattr(common, "KERNELS_INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        common.use_triton("triton", adaptive_pool.adaptive_avg_pool_canned_case, torch.zeros(1))


@needs_triton
def test_triton_backend_on_cpu_without_interpreter_in_a_fresh_process():
    """The real case: TRITON_INTERPRET unset when the kernels are imported, no GPU."""
    code = (
        "import torch\n"
        "from honeybee_hf.kernels_cabs_adaptive_pool import adaptive_avg_pool\n"
        "try:\n"
        "    adaptive_avg_pool(torch.zeros(1, 4, 2), 2, 2, 1, 1, backend='triton')\n"
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
        msda_module.msda(value, shapes, loc, logits, backend="triton"),
        msda_module.msda(value, shapes, loc, logits, backend="torch"),
    )
    x, r = torch.randn(2, 12, 8, device=DEVICE), torch.randn(2, 12, 8, device=DEVICE)
    weight, bias = torch.rand(8, device=DEVICE) + 0.5, torch.randn(8, device=DEVICE)
    dw = torch.randn(8, 1, 3, 3, device=DEVICE)
    calls = [
        lambda backend: adaptive_pool.adaptive_avg_pool(x, 3, 4, 2, 3, backend=backend),
        lambda backend: ln_residual.ln_residual_silu(x, weight, bias, r, 1e-5, backend=backend),
        lambda backend: ln_residual.ln_residual_silu_pool(x, weight, bias, r, 1e-5, 3, 4, 2, 3, backend=backend),
        lambda backend: dwconv.cabs_dwconv_block(x, 3, 4, weight, bias, dw, weight, bias, 1e-5, backend=backend),
    ]
    for call in calls:
        torch.testing.assert_close(call("triton"), call("torch"), rtol=1e-5, atol=1e-5)


# ---- the kernel backend: runtime state of a model, never saved -------------------------------------------------


def count_kernel_calls(monkeypatch):
    """Replace every Triton entry point by a counter that raises nothing and returns the reference's result."""
    calls = []
    for module, name in TRITON_ENTRY_POINTS:
        reference = getattr(module, name.replace("_triton", "_reference"))
        monkeypatch.setattr(module, name, lambda *args, _ref=reference: calls.append(1) or _ref(*args))
    return calls


def projector_and_features(projector_type):
    model = tiny_model(tiny_config(projector_type))
    features = torch.randn(1, model.config.vision_grid**2, model.config.vision_config.hidden_size)
    pc = model.config.projector_config
    # C-Abstractor: 2 stages x depth blocks x 2 fused ops; D-Abstractor: the pooled queries + one msda per layer
    fused_calls = 4 * pc.depth if projector_type == "c-abs" else 1 + pc.decoder_layers
    return model, features, fused_calls


@pytest.mark.parametrize("projector_type", ["c-abs", "d-abs"])
def test_set_kernel_backend_switches_every_fused_op_at_once(monkeypatch, projector_type):
    for module in (
        msda_module,
        dwconv,
        ln_residual,
        adaptive_pool,
    ):  # the kernels are counted, not run: no Triton needed
        monkeypatch.setattr(module, "use_triton", lambda backend, *tensors: backend == "triton")
    calls = count_kernel_calls(monkeypatch)
    model, features, expected_calls = projector_and_features(projector_type)
    with torch.no_grad():
        reference = model.abstractor(features)
        assert calls == []  # "auto" on CPU tensors: the reference
        model.set_kernel_backend("triton")
        assert model.abstractor(features).equal(reference)
        assert len(calls) == expected_calls
        model.set_kernel_backend("torch")
        model.abstractor(features)
    assert len(calls) == expected_calls
    with pytest.raises(ValueError, match="kernel_backend must be one of"):
        model.set_kernel_backend("cuda")


def test_set_kernel_backend_reaches_the_abstractor_copy_peft_trains(monkeypatch):
    peft = pytest.importorskip("peft")
    for module in (msda_module, dwconv, ln_residual, adaptive_pool):
        monkeypatch.setattr(module, "use_triton", lambda backend, *tensors: backend == "triton")
    calls = count_kernel_calls(monkeypatch)
    model, features, expected_calls = projector_and_features("c-abs")
    lora = peft.LoraConfig(r=2, target_modules=r".*language_model.*\.q_proj", modules_to_save=["abstractor"])
    model = peft.get_peft_model(model, lora)
    model.set_kernel_backend("triton")  # after PEFT deep-copied the abstractor into its wrapper
    with torch.no_grad():
        model.base_model.model.abstractor(features)  # the wrapper runs the trainable copy
    assert len(calls) == expected_calls


def test_kernel_backend_is_never_saved(tmp_path):
    model = tiny_model(tiny_config("d-abs"))
    model.set_kernel_backend("torch")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "kernel_backend" not in saved["projector_config"] and "kernel_backend" not in saved


def test_from_pretrained_keyword_sets_the_backend(tmp_path):
    tiny_model(tiny_config("c-abs")).save_pretrained(tmp_path)
    loaded = type(tiny_model(tiny_config("c-abs"))).from_pretrained(tmp_path, kernel_backend="torch")
    assert loaded.config.projector_config.kernel_backend == "torch"
    assert all(m.config.kernel_backend == "torch" for m in loaded.abstractor.modules() if hasattr(m, "config"))


# ---- where the kernel files live and which ops they register ---------------------------------------------------


def test_hub_code_files_are_flat_modules_that_guard_triton():
    """transformers' remote-code loader maps `from .x import` to a file x.py next to the model, and refuses to
    load when an unguarded import is missing (CI's transformers 4 environment has no triton). The Hub writer's
    list holds every module the entry files import."""
    assert {
        "kernels_common.py",
        "kernels_msda.py",
        "kernels_cabs_dwconv_block.py",
        "kernels_cabs_ln_residual_silu.py",
        "kernels_cabs_adaptive_pool.py",
    } <= set(CODE_FILES)
    for name in CODE_FILES:
        for module in get_relative_imports(PACKAGE_DIR / name):
            assert f"{module}.py" in CODE_FILES, f"{name} imports .{module}, which is no flat file of the Hub folder"
        assert "triton" not in get_imports(PACKAGE_DIR / name), f"{name} imports triton outside try/except"
    # transformers 4.57 copies only the modeling file's *direct* relative imports into a local folder's module
    assert set(get_relative_imports(PACKAGE_DIR / "modeling_honeybee.py")) >= {"kernels_common", "kernels_msda"}


def load_copy(folder, module_name):
    """Import the kernel files in `folder` as the package `module_name` (as transformers' loader would)."""
    spec = importlib.util.spec_from_loader(module_name, loader=None, is_package=True)
    package = importlib.util.module_from_spec(spec)
    package.__path__ = [str(folder)]
    sys.modules[module_name] = package
    return importlib.import_module(f"{module_name}.kernels_msda")


@needs_triton
def test_identical_kernel_files_share_their_ops(tmp_path):
    """A second copy of the same bytes (a Hub folder next to the installed package) maps to the same op namespace
    and reuses the registered ops instead of failing to register them again."""
    for name in ("kernels_common.py", "kernels_msda.py"):
        shutil.copyfile(PACKAGE_DIR / name, tmp_path / name)
    copy = load_copy(tmp_path, "honeybee_kernels_identical_copy")
    assert copy is not msda_module and copy.OP_NAMESPACE == msda_module.OP_NAMESPACE
    (value, loc, logits), shapes = msda_inputs()
    torch.testing.assert_close(
        copy.msda(value, shapes, loc, logits, backend="triton"), msda_module.msda_reference(value, shapes, loc, logits)
    )


# ---- custom ops --------------------------------------------------------------------------------------------


def opcheck_cases():
    from honeybee_hf.kernels_cabs_adaptive_pool import adaptive_avg_pool_backward_op, adaptive_avg_pool_op
    from honeybee_hf.kernels_cabs_dwconv_block import cabs_dwconv_block_backward_op, cabs_dwconv_block_op
    from honeybee_hf.kernels_cabs_ln_residual_silu import ln_residual_silu_pool_backward_op, ln_residual_silu_pool_op
    from honeybee_hf.kernels_msda import msda_backward_op, msda_op

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
        t, se = dwconv.cabs_dwconv_block(
            self.conv1(x), self.h, self.w, n1w, n1b, self.dw, n2w, n2b, 1e-5, backend=self.backend
        )
        t = self.conv3(t * torch.sigmoid(se)[:, None, :].to(t.dtype))
        pooled = ln_residual.ln_residual_silu_pool(
            t, n3w, n3b, x, 1e-5, self.h, self.w, self.out, self.out, backend=self.backend
        )
        query = ln_residual.ln_residual_silu(
            pooled,
            n4w,
            n4b,
            adaptive_pool.adaptive_avg_pool(x, self.h, self.w, self.out, self.out, backend=self.backend),
            1e-5,
            backend=self.backend,
        )
        M = self.out * self.out
        loc = torch.sigmoid(self.loc(query)).view(B, M, self.nh, 1, self.P, 2)  # (B, M, nh, L=1, P, 2)
        logits = self.logits(query).view(B, M, self.nh, self.P)
        value = x.view(B, N, self.nh, C // self.nh)
        return msda_module.msda(value, [(self.h, self.w)], loc, logits, backend=self.backend)


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
