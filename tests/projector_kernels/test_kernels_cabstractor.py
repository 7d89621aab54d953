"""Triton C-Abstractor fusions (kernels_cabs_*.py) against their references, forward and backward.

Without a GPU these run under Triton's interpreter; kernel_helpers.py says how errors are measured.
"""

import types

import pytest
import torch

triton = pytest.importorskip("triton")

import honeybee_hf.kernels_cabs_dwconv_block as dwconv  # noqa: E402
import honeybee_hf.kernels_common as common  # noqa: E402
from honeybee_hf.kernels_cabs_adaptive_pool import adaptive_avg_pool_reference, adaptive_avg_pool_triton  # noqa: E402
from honeybee_hf.kernels_cabs_dwconv_block import cabs_dwconv_block_reference, cabs_dwconv_block_triton  # noqa: E402
from honeybee_hf.kernels_cabs_ln_residual_silu import (  # noqa: E402
    ln_residual_silu_pool_reference,
    ln_residual_silu_pool_triton,
    ln_residual_silu_reference,
    ln_residual_silu_triton,
)
from honeybee_hf.kernels_common import CABS_MAX_CHANNELS, cabs_tiles  # noqa: E402
from utils.kernel_check import DEVICE, poisoned_outputs, randn  # noqa: E402, F401
from utils.kernel_check import check as check_against_reference  # noqa: E402

EPS = 1e-5  # timm's LayerNormAct2d default, which the Honeybee RegStages use

# Against the reference run in fp16/bf16, which also rounds every intermediate (LN, conv, SiLU) to that dtype.
TOL_VS_SAME_DTYPE = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def check(kernel_fn, reference_fn, inputs, names, dtype):
    return check_against_reference(kernel_fn, reference_fn, inputs, names, dtype, TOL_VS_SAME_DTYPE)


# ---- (a) LN1+SiLU -> depthwise 3x3 -> LN2+SiLU -> SE mean ------------------------------------------------------


def dwconv_block_inputs(B, h, w, C, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        randn(B, h * w, C, dtype=dtype, generator=g, scale=2.0, shift=0.5),  # x: conv1 output, not normalised
        h,
        w,
        randn(C, dtype=dtype, generator=g, scale=0.3, shift=1.0),  # ln1 weight
        randn(C, dtype=dtype, generator=g, scale=0.3),  # ln1 bias
        randn(C, 1, 3, 3, dtype=dtype, generator=g, scale=0.3),  # depthwise weight
        randn(C, dtype=dtype, generator=g, scale=0.3, shift=1.0),  # ln2 weight
        randn(C, dtype=dtype, generator=g, scale=0.3),  # ln2 bias
        EPS,
    ]


DWCONV_NAMES = (
    "y",
    "se_mean",
    "grad_x",
    "grad_ln1_weight",
    "grad_ln1_bias",
    "grad_dw_weight",
    "grad_ln2_weight",
    "grad_ln2_bias",
)


def check_dwconv_block(B, h, w, C, dtype):
    inputs = dwconv_block_inputs(B, h, w, C, dtype)
    return check(cabs_dwconv_block_triton, cabs_dwconv_block_reference, inputs, DWCONV_NAMES, dtype)


@pytest.mark.parametrize(
    "B, h, w, C, dtype",
    [
        (1, 24, 24, 1024, torch.float32),  # stage 1 at 336 px
        (1, 12, 12, 1024, torch.bfloat16),  # stage 2 (M144)
        (2, 16, 16, 256, torch.float16),
    ],
)
def test_dwconv_block_honeybee_shapes(B, h, w, C, dtype):
    check_dwconv_block(B, h, w, C, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("B, h, w, C", [(2, 5, 7, 20), (1, 1, 6, 3)])
def test_dwconv_block_non_square_non_pow2(B, h, w, C, dtype):
    check_dwconv_block(B, h, w, C, dtype)


def test_dwconv_block_gradcheck_fp64():
    inputs = [
        t.requires_grad_() if isinstance(t, torch.Tensor) else t for t in dwconv_block_inputs(2, 3, 4, 6, torch.float64)
    ]
    x, h, w, *params, eps = inputs
    assert torch.autograd.gradcheck(
        lambda x, *p: cabs_dwconv_block_triton(x, h, w, *p, eps), (x, *params), fast_mode=True
    )


def test_dwconv_block_backward_is_deterministic():
    """No atomics in the C-Abstractor kernels: two backward passes agree bit for bit (meaningful on a GPU)."""
    inputs = [
        t.requires_grad_() if isinstance(t, torch.Tensor) else t
        for t in dwconv_block_inputs(2, 6, 5, 40, torch.float32)
    ]
    leaves = [t for t in inputs if isinstance(t, torch.Tensor)]
    y, se = cabs_dwconv_block_triton(*inputs)
    first = torch.autograd.grad((y, se), leaves, (torch.ones_like(y), torch.ones_like(se)), retain_graph=True)
    second = torch.autograd.grad((y, se), leaves, (torch.ones_like(y), torch.ones_like(se)))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_poisoned_outputs_catch_a_missed_store(monkeypatch):
    """The NaN poisoning can catch a kernel that leaves tokens unwritten: launch one token tile of 16 where
    two are needed, and the missing tokens must show up as NaN."""
    inputs = [t.detach() if isinstance(t, torch.Tensor) else t for t in dwconv_block_inputs(1, 4, 8, 16, torch.float32)]
    monkeypatch.setattr(dwconv, "cabs_tiles", lambda *args, **kwargs: (16, 16, 4))
    for module in (dwconv, common):  # the launch arithmetic: one tile, one program
        monkeypatch.setattr(module, "triton", types.SimpleNamespace(cdiv=lambda a, b: 1))
    # the op's implementation itself: the registered op may be another identical copy's (a Hub folder's)
    y, _ = dwconv._cabs_dwconv_block_forward(*inputs)
    assert not y[:, :16].isnan().any()
    assert y[:, 16:].isnan().all()


# ---- (b) + (c): LN + residual + SiLU, adaptive average pool -----------------------------------------------------


def ln_residual_inputs(B, N, C, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        randn(B, N, C, dtype=dtype, generator=g, scale=2.0, shift=0.5),  # y: conv3 output
        randn(C, dtype=dtype, generator=g, scale=0.3, shift=1.0),
        randn(C, dtype=dtype, generator=g, scale=0.3),
        randn(B, N, C, dtype=dtype, generator=g),  # residual: the block input
        EPS,
    ]


LN_NAMES = ("out", "grad_y", "grad_weight", "grad_bias", "grad_residual")


@pytest.mark.parametrize(
    "B, h, w, out_h, out_w, C, dtype",
    [
        (1, 24, 24, 12, 12, 1024, torch.float32),  # 336 px -> M144: 2x2 windows
        (2, 16, 16, 12, 12, 1024, torch.bfloat16),  # 224 px -> M144: overlapping windows
        (1, 16, 16, 12, 12, 512, torch.float16),
        (2, 5, 7, 3, 4, 20, torch.float32),  # non-square, uneven windows, non-pow2 channels
        (1, 5, 7, 3, 4, 20, torch.float64),
    ],
)
def test_ln_residual_silu_pool(B, h, w, out_h, out_w, C, dtype):
    inputs = ln_residual_inputs(B, h * w, C, dtype) + [h, w, out_h, out_w]
    check(ln_residual_silu_pool_triton, ln_residual_silu_pool_reference, inputs, LN_NAMES, dtype)


@pytest.mark.parametrize(
    "B, N, C, dtype",
    [
        (1, 576, 1024, torch.float32),
        (2, 144, 1024, torch.bfloat16),
        (2, 144, 1024, torch.float16),
        (3, 10, 33, torch.float32),
    ],
)
def test_ln_residual_silu(B, N, C, dtype):
    check(ln_residual_silu_triton, ln_residual_silu_reference, ln_residual_inputs(B, N, C, dtype), LN_NAMES, dtype)


def test_ln_residual_silu_pool_gradcheck_fp64():
    y, weight, bias, residual, eps = (
        t.requires_grad_() if isinstance(t, torch.Tensor) else t for t in ln_residual_inputs(2, 20, 6, torch.float64)
    )
    assert torch.autograd.gradcheck(
        lambda *t: ln_residual_silu_pool_triton(*t[:3], t[3], eps, 5, 4, 3, 3),
        (y, weight, bias, residual),
        fast_mode=True,
    )


@pytest.mark.parametrize(
    "B, h, w, out_h, out_w, C, dtype",
    [
        (2, 16, 16, 12, 12, 1024, torch.float32),
        (1, 24, 24, 12, 12, 1024, torch.bfloat16),
        (1, 24, 24, 16, 16, 256, torch.float16),  # M256 at 336 px: overlapping windows
        (2, 5, 7, 3, 4, 20, torch.float32),
        (1, 4, 4, 6, 5, 8, torch.float32),  # more outputs than inputs: windows repeat tokens
        (1, 16, 16, 16, 16, 64, torch.float32),  # identity
    ],
)
def test_adaptive_avg_pool(B, h, w, out_h, out_w, C, dtype):
    g = torch.Generator().manual_seed(0)
    inputs = [randn(B, h * w, C, dtype=dtype, generator=g), h, w, out_h, out_w]
    check(adaptive_avg_pool_triton, adaptive_avg_pool_reference, inputs, ("out", "grad_x"), dtype)


def test_adaptive_avg_pool_gradcheck_fp64():
    x = torch.randn(1, 35, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: adaptive_avg_pool_triton(x, 5, 7, 3, 4), (x,), fast_mode=True)


def test_rejects_bad_shapes_and_dtypes():
    x = torch.randn(1, 12, 8, device=DEVICE)
    with pytest.raises(ValueError, match="h\\*w"):
        adaptive_avg_pool_triton(x, 3, 5, 2, 2)
    with pytest.raises(TypeError, match="supports"):
        adaptive_avg_pool_triton(x.to(torch.int64), 3, 4, 2, 2)
    with pytest.raises(ValueError, match="at most"):
        cabs_tiles(16, CABS_MAX_CHANNELS + 1, live_tiles=4)
