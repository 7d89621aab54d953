"""kernel_backend="auto" checks each Triton kernel once per (device, dtype) against its PyTorch reference before
trusting it, and falls back to the reference, with one warning, when the kernel computes wrong or fails to launch;
"triton" runs the kernel unchecked and raises.

"auto" offers only GPU tensors to the kernels; these tests add "cpu" to `AUTO_KERNEL_DEVICE_TYPES` so that the
check runs through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), on tiny models.
"""

import shutil
import warnings

import pytest
import torch
import transformers
from PIL import Image

import honeybee_hf.kernels_cabs_adaptive_pool as adaptive_pool
import honeybee_hf.kernels_common as common
import honeybee_hf.kernels_msda as msda_module
from honeybee_hf.testing_utils import tiny_config, tiny_model
from utils import PHOTO_DIR

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
pytestmark = pytest.mark.skipif(not common.KERNELS_INTERPRETED, reason="needs Triton's interpreter (CPU tests)")

PHOTO = PHOTO_DIR / "laundry.jpeg"


def offer_cpu_to_auto(monkeypatch, kernels_common=common):
    """Let "auto" take the (interpreted) kernels for CPU tensors in `kernels_common`'s copy, with no verdicts yet."""
    monkeypatch.setattr(kernels_common, "AUTO_KERNEL_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(kernels_common, "_KERNEL_VERDICTS", {})


def count_calls(monkeypatch, module, name):
    calls, original = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args: calls.append(1) or original(*args))
    return calls


@triton.jit
def _arange_of_three(OUT):
    tl.store(OUT + tl.arange(0, 3), 1.0)  # Triton ranges must span a power of 2: fails to compile


def pool_that_fails_to_launch(x, h, w, out_h, out_w):
    out = x.new_empty(x.shape[0], out_h * out_w, x.shape[2])
    _arange_of_three[(1,)](out)
    return out


def projector_features(model):
    return torch.randn(1, model.config.vision_grid**2, model.config.vision_config.hidden_size)


def test_auto_checks_each_kernel_once_then_runs_it(monkeypatch):
    offer_cpu_to_auto(monkeypatch)
    msda_calls = count_calls(monkeypatch, msda_module, "msda_triton")
    model = tiny_model(tiny_config("d-abs")).eval()
    features = projector_features(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # a kernel that passes its check warns nothing
        got = [model.abstractor(features) for _ in range(2)]
        model.set_kernel_backend("torch")
        expected = model.abstractor(features)
    layers = model.config.projector_config.decoder_layers
    assert len(msda_calls) == 1 + 2 * layers  # one check (in no_grad: it runs the backward too), then every layer
    assert common._KERNEL_VERDICTS == {
        (msda_module.msda_canned_case, torch.device("cpu"), torch.float32): True,
        (adaptive_pool.adaptive_avg_pool_canned_case, torch.device("cpu"), torch.float32): True,
    }
    for out in got:
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_auto_falls_back_from_a_wrong_kernel_with_one_warning(tiny_folder, monkeypatch):
    """A Hub folder whose msda kernel doubles its output: "auto" finds out before the first feature is used."""
    folder, _, processor = tiny_folder("d-abs", seed=6)
    broken = folder.parent / (folder.name + "_doubled")
    shutil.copytree(folder, broken)
    source = (broken / "kernels_msda.py").read_text()
    changed = source.replace("    return out\n\n\ndef _msda_backward(", "    return 2 * out\n\n\ndef _msda_backward(")
    assert changed != source, "the forward's return statement moved: update this test"
    (broken / "kernels_msda.py").write_text(changed)

    model = transformers.AutoModelForImageTextToText.from_pretrained(
        broken, trust_remote_code=True, dtype=torch.float32
    ).eval()
    remote_common = __import__(type(model).__module__.rsplit(".", 1)[0] + ".kernels_common", fromlist=["_"])
    assert remote_common is not common  # the folder's own copy of the dispatch rule
    offer_cpu_to_auto(monkeypatch, remote_common)
    inputs = processor(images=Image.open(PHOTO), text="What is this?", return_tensors="pt")
    with torch.no_grad():
        with pytest.warns(RuntimeWarning) as caught:
            features = model(**inputs).image_hidden_states
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per process, device and dtype
            again = model(**inputs).image_hidden_states
        model.set_kernel_backend("torch")
        expected = model(**inputs).image_hidden_states
    messages = [str(w.message) for w in caught if "start-up check" in str(w.message)]
    assert len(messages) == 1, messages
    assert "msda_triton" in messages[0] and "on cpu in torch.float32" in messages[0]
    assert "output 0 differs from the PyTorch reference by 1.0e+00" in messages[0]
    assert torch.equal(features, expected) and torch.equal(again, expected)


def test_auto_falls_back_from_a_kernel_that_fails_to_launch_and_triton_raises(monkeypatch):
    offer_cpu_to_auto(monkeypatch)
    monkeypatch.setattr(adaptive_pool, "adaptive_avg_pool_triton", pool_that_fails_to_launch)
    x = torch.randn(2, 12, 8)
    expected = adaptive_pool.adaptive_avg_pool_reference(x, 3, 4, 2, 2)
    with pytest.warns(RuntimeWarning, match=r"pool_that_fails_to_launch failed its start-up check on cpu in torch\.fl"):
        assert torch.equal(adaptive_pool.adaptive_avg_pool(x, 3, 4, 2, 2), expected)
    assert common._KERNEL_VERDICTS == {(adaptive_pool.adaptive_avg_pool_canned_case, x.device, x.dtype): False}
    with pytest.raises(Exception, match="power of 2"):
        adaptive_pool.adaptive_avg_pool(x, 3, 4, 2, 2, backend="triton")


def test_auto_checks_while_torch_compile_traces_fullgraph(monkeypatch):
    """Under torch.compile the check runs once, eagerly, while Dynamo traces; its verdict is a constant of the graph,
    so fullgraph=True holds. Here the pool fails to launch (the compiled graph takes its reference) and msda passes
    (the compiled graph runs its kernel)."""
    offer_cpu_to_auto(monkeypatch)
    monkeypatch.setattr(adaptive_pool, "adaptive_avg_pool_triton", pool_that_fails_to_launch)
    model = tiny_model(tiny_config("d-abs"), seed=2).eval()
    features = projector_features(model)
    compiled = torch.compile(model.abstractor, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="pool_that_fails_to_launch failed its start-up check"):
            got = compiled(features)
        model.set_kernel_backend("torch")
        expected = model.abstractor(features)
    assert common._KERNEL_VERDICTS == {
        (msda_module.msda_canned_case, torch.device("cpu"), torch.float32): True,
        (adaptive_pool.adaptive_avg_pool_canned_case, torch.device("cpu"), torch.float32): False,
    }
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
