"""The Triton kernels inside whole models: same logits and gradients as the PyTorch path, used by a model loaded
from a Hub folder through trust_remote_code (each folder its own kernels), and compilable. CPU tensors run the
kernels in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before anything imports them)."""

import shutil
import sys

import pytest
import torch
import transformers
from PIL import Image

from honeybee_hf.testing_utils import tiny_config, tiny_model, tiny_processor
from utils import PHOTO_DIR, official_messages, training_inputs

pytest.importorskip("triton")
peft = pytest.importorskip("peft")

PHOTO = PHOTO_DIR / "laundry.jpeg"
PROMPT = "A chat.\nHuman: <image>\nHuman: What is unusual here?\nAI: A man irons on a taxi."
LM_LORA = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def twin_models(projector_type, seed=0):
    """The same random weights behind kernel backend 'torch' and kernel backend 'triton'."""
    torch_model = tiny_model(tiny_config(projector_type), seed)
    triton_model = tiny_model(tiny_config(projector_type), seed + 1)
    triton_model.load_state_dict(torch_model.state_dict())
    torch_model.set_kernel_backend("torch")
    triton_model.set_kernel_backend("triton")
    return torch_model, triton_model


def remote_kernels(model, name):
    """The kernel module `name` (e.g. "kernels_msda") that transformers' remote-code loader imported for `model`."""
    module = sys.modules[type(model).__module__.rsplit(".", 1)[0] + "." + name]
    assert module.HAS_TRITON and module.__name__.startswith("transformers_modules.")
    return module


def inputs_for(config, labels=False):
    processor, image = tiny_processor(config), Image.open(PHOTO)
    if labels:
        return training_inputs(processor, official_messages(PROMPT, [image])[0])
    return processor(images=image, text=PROMPT, return_tensors="pt")


@pytest.mark.parametrize("projector_type", ["c-abs", "d-abs"])
def test_kernels_on_equals_kernels_off(projector_type):
    torch_model, triton_model = twin_models(projector_type)
    inputs = inputs_for(torch_model.config)
    with torch.no_grad():
        expected = torch_model(**inputs).logits
        got = triton_model(**inputs).logits
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("projector_type", ["c-abs", "d-abs"])
def test_lora_training_step_gives_the_same_gradients(projector_type):
    grads = []
    for model in twin_models(projector_type, seed=3):
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LM_LORA, modules_to_save=["abstractor"])
        torch.manual_seed(1)  # the same random LoRA A matrices on both
        model = peft.get_peft_model(model, config).train()
        torch.manual_seed(0)  # the D-Abstractor's dropout draws the same masks on both
        model(**inputs_for(model.config, labels=True)).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert any("abstractor" in n for n in grads[0]) and any("lora_B" in n for n in grads[0])
    for name, expected in grads[0].items():
        scale = expected.abs().max().clamp_min(1e-3)
        assert (grads[1][name] - expected).abs().max() <= 1e-4 * scale, name


@pytest.mark.parametrize("projector_type", ["c-abs", "d-abs"])
def test_remote_code_model_runs_the_hub_folders_kernels(tiny_folder, projector_type):
    folder, reference, processor = tiny_folder(projector_type, seed=9)
    model = transformers.AutoModelForImageTextToText.from_pretrained(
        folder, trust_remote_code=True, dtype=torch.float32, kernel_backend="triton"
    ).eval()
    # the kernels come from the folder's flat kernel modules, loaded by transformers' remote-code loader
    if projector_type == "d-abs":
        kernels, name = remote_kernels(model, "kernels_msda"), "msda_triton"
    else:
        kernels, name = remote_kernels(model, "kernels_cabs_dwconv_block"), "cabs_dwconv_block_triton"
    launched, original = [], getattr(kernels, name)
    setattr(kernels, name, lambda *args: launched.append(1) or original(*args))
    try:
        inputs = processor(images=Image.open(PHOTO), text="What is this?", return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        setattr(kernels, name, original)
    assert launched, f"{name} was not called"
    reference.set_kernel_backend("torch")
    with torch.no_grad():
        assert (logits - reference(**inputs).logits).abs().max() <= 1e-5


def test_hub_folders_with_different_kernel_bytes_run_their_own_ops(tiny_folder):
    """Two Hub folders in one process whose kernels differ (here folder B's msda doubles its output): each model
    runs its own folder's ops, whichever loaded first, because the op namespace is a hash of the kernel files."""
    folder_a, _, processor = tiny_folder("d-abs", seed=4)
    folder_b = folder_a.parent / (folder_a.name + "_b")
    shutil.copytree(folder_a, folder_b)
    source = (folder_b / "kernels_msda.py").read_text()
    changed = source.replace("    return out\n\n\ndef _msda_backward(", "    return 2 * out\n\n\ndef _msda_backward(")
    assert changed != source, "the forward's return statement moved: update this test"
    (folder_b / "kernels_msda.py").write_text(changed)

    inputs = processor(images=Image.open(PHOTO), text="What is this?", return_tensors="pt")
    models, kernels = {}, {}
    for key, folder in (("a", folder_a), ("b", folder_b)):
        models[key] = transformers.AutoModelForImageTextToText.from_pretrained(
            folder, trust_remote_code=True, dtype=torch.float32, kernel_backend="triton"
        ).eval()
        kernels[key] = remote_kernels(models[key], "kernels_msda")
    assert kernels["a"].OP_NAMESPACE != kernels["b"].OP_NAMESPACE

    value, shapes = torch.randn(1, 20, 2, 8), [(4, 5)]
    loc, logits = torch.rand(1, 6, 2, 1, 2, 2), torch.randn(1, 6, 2, 2)
    expected = kernels["a"].msda_reference(value, shapes, loc, logits)
    torch.testing.assert_close(kernels["a"].msda(value, shapes, loc, logits, backend="triton"), expected)
    torch.testing.assert_close(kernels["b"].msda(value, shapes, loc, logits, backend="triton"), 2 * expected)
    with torch.no_grad():
        for key, model in models.items():  # the projector outputs, with the folder's kernels and without
            triton_features = model(**inputs).image_hidden_states
            model.set_kernel_backend("torch")
            torch_features = model(**inputs).image_hidden_states
            error = ((triton_features - torch_features).abs().max() / torch_features.abs().max()).item()
            # kernels vs PyTorch: fp32 rounding (<= 1e-5, as kernels-on == kernels-off); B's doubled msda: ~1e-3
            assert (error > 1e-4) == (key == "b"), f"model {key}: {error:.1e} from the PyTorch path"


@pytest.mark.parametrize("projector_type", ["c-abs", "d-abs"])
def test_projector_compiles_with_the_kernels(projector_type):
    _, model = twin_models(projector_type, seed=5)
    projector = model.abstractor.train()
    features = torch.randn(2, model.config.vision_grid**2, model.config.vision_config.hidden_size)
    torch.manual_seed(0)
    eager = projector(features)
    eager.square().mean().backward()
    eager_grads = [p.grad.clone() for p in projector.parameters()]
    projector.zero_grad()
    compiled = torch.compile(projector, backend="aot_eager", fullgraph=True)
    torch.manual_seed(0)
    out = compiled(features)
    out.square().mean().backward()
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    for p, g in zip(projector.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)
