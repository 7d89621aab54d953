"""Triton multi-scale deformable attention (kernels_msda.py) against `msda_reference`, forward and backward.

Without a GPU these run under Triton's interpreter; kernel_helpers.py says how errors are measured.
"""

import types

import pytest
import torch

triton = pytest.importorskip("triton")

import honeybee_hf.kernels_msda as msda_module  # noqa: E402
from honeybee_hf.kernels_msda import msda_reference, msda_triton  # noqa: E402
from utils.kernel_check import DEVICE, check, poisoned_outputs  # noqa: E402, F401

# Against the reference in the same half dtype, both sides carry rounding error.
TOL_VS_SAME_DTYPE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2.4e-2}


def make_locations(B, Q, nh, shapes, P, dtype, generator, far_outside=0.1):
    """(B, Q, nh, L, P, 2) locations, some beyond the map's border, all >= 0.1 px from the integer pixel grid
    (the bilinear weights, and so grad_loc, jump there) after rounding to `dtype`."""
    L = len(shapes)
    sizes = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float64)  # (L, 2) as (x, y) extents
    # pixel coordinates x = loc * W - 0.5 from one pixel beyond the border to one past the other side
    pix = torch.rand(B, Q, nh, L, P, 2, generator=generator, dtype=torch.float64) * (sizes[:, None] + 2) - 1.5
    far = torch.rand(B, Q, nh, L, P, 1, generator=generator) < far_outside
    pix = torch.where(far, pix + 3 * sizes[:, None] * torch.sign(pix - sizes[:, None] / 2), pix)
    for _ in range(8):
        loc = ((pix + 0.5) / sizes[:, None]).to(dtype)
        frac = (loc.double() * sizes[:, None] - 0.5).frac().abs()
        near_grid = (frac < 0.1) | (frac > 0.9)
        if not near_grid.any():
            return loc.to(DEVICE)
        pix = torch.where(near_grid, pix + 0.37, pix)
    raise AssertionError("could not keep the sampling points away from the pixel grid")


def make_inputs(B, shapes, nh, hd, Q, P, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in shapes)
    value = torch.randn(B, S, nh, hd, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    loc = make_locations(B, Q, nh, shapes, P, dtype, g)
    logits = (2 * torch.randn(B, Q, nh, len(shapes) * P, generator=g, dtype=torch.float64)).to(dtype).to(DEVICE)
    return [t.requires_grad_() for t in (value, loc, logits)]


def check_msda(B, shapes, nh, hd, Q, P, dtype):
    """Kernel forward + backward vs the reference in `dtype` and in fp64; returns the errors."""

    def kernel(*args):
        out = msda_triton(*args)
        assert out.dtype == dtype and out.shape == (B, Q, nh * hd)
        return out

    value, loc, logits = make_inputs(B, shapes, nh, hd, Q, P, dtype)
    names = ("out", "grad_value", "grad_loc", "grad_logits")
    return check(kernel, msda_reference, [value, shapes, loc, logits], names, dtype, TOL_VS_SAME_DTYPE)


# D-Abstractor shapes: 8 heads x 128, 4 points, one level of CLIP tokens (16x16 @224px, 24x24 @336px)
@pytest.mark.parametrize(
    "B, hw, Q, dtype",
    [
        (1, 24, 144, torch.float32),
        (2, 16, 144, torch.float32),
        (1, 16, 256, torch.float32),
        (1, 24, 576, torch.float32),
        (1, 24, 144, torch.float16),
        (1, 16, 256, torch.bfloat16),
    ],
)
def test_honeybee_shapes(B, hw, Q, dtype):
    check_msda(B, [(hw, hw)], nh=8, hd=128, Q=Q, P=4, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_multi_level_non_square_non_pow2_head_dim(dtype):
    check_msda(2, [(6, 10), (3, 5), (2, 2), (1, 1)], nh=3, hd=24, Q=13, P=3, dtype=dtype)


def test_all_points_outside_read_zeros():
    B, shapes, nh, hd, Q, P = 1, [(5, 4)], 2, 8, 6, 4
    value, _, logits = make_inputs(B, shapes, nh, hd, Q, P, torch.float32)
    loc = torch.tensor([-1.5, 2.5], device=DEVICE).expand(B, Q, nh, 1, P, 2).contiguous().requires_grad_()
    out = msda_triton(value, shapes, loc, logits)
    assert (out == 0).all()
    grads = torch.autograd.grad(out, (value, loc, logits), torch.ones_like(out))
    assert all((g == 0).all() for g in grads)


def test_non_contiguous_inputs():
    shapes = [(4, 6)]
    value, loc, logits = (t.detach() for t in make_inputs(2, shapes, 2, 16, 5, 4, torch.float32))
    value_t = value.transpose(0, 1).contiguous().transpose(0, 1)  # same values, batch-minor storage
    expected = msda_reference(value, shapes, loc, logits)
    torch.testing.assert_close(msda_triton(value_t, shapes, loc, logits), expected, rtol=1e-5, atol=1e-6)


def test_poisoned_outputs_catch_a_missed_store(monkeypatch):
    """The NaN poisoning can catch a kernel that leaves part of its output unwritten: launch one tile of 16
    (query, head) rows where 80 need writing, and the missing queries must show up as NaN."""
    shapes = [(4, 4)]
    value, loc, logits = (t.detach() for t in make_inputs(1, shapes, 2, 8, 40, 4, torch.float32))
    monkeypatch.setattr(msda_module, "_msda_tiles", lambda *args, **kwargs: (16, 8, 4))
    monkeypatch.setattr(msda_module, "triton", types.SimpleNamespace(cdiv=lambda a, b: 1))
    # the op's implementation itself: the registered op may be another identical copy's (a Hub folder's)
    out = msda_module._msda_forward(value, [4, 4], loc, logits)
    assert not out[:, :8].isnan().any()  # 8 queries x 2 heads = the 16 rows written
    assert out[:, 8:].isnan().all()


def test_gradcheck_fp64():
    """fast_mode gradcheck in fp64 (the kernels compute in fp64 for fp64 inputs), two levels, non-square."""
    shapes = [(3, 5), (2, 2)]
    inputs = make_inputs(1, shapes, 2, 6, 4, 2, torch.float64)
    assert torch.autograd.gradcheck(
        lambda v, loc, logits: msda_triton(v, shapes, loc, logits), inputs, fast_mode=True, eps=1e-6, atol=1e-5
    )


def test_rejects_bad_shapes():
    value, loc, logits = (t.detach() for t in make_inputs(1, [(4, 4)], 2, 8, 5, 4, torch.float32))
    with pytest.raises(ValueError, match="tokens"):
        msda_triton(value, [(4, 5)], loc, logits)
    with pytest.raises(ValueError, match="attention_logits"):
        msda_triton(value, [(4, 4)], loc, logits[..., :3])
    with pytest.raises(TypeError, match="supports"):
        msda_triton(value.to(torch.int32), [(4, 4)], loc, logits)
