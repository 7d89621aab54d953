"""The Triton kernels inside whole models: same logits and gradients as the PyTorch path, used by a model loaded
from a Hub folder through trust_remote_code, and compilable. CPU tensors run the kernels in Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 before anything imports them)."""

import sys

import pytest
import torch
import transformers
from PIL import Image

from conftest import REPO
from honeybee_hf.export.tiny import tiny_config, tiny_model, tiny_processor

pytest.importorskip("triton")
peft = pytest.importorskip("peft")

PHOTO = REPO / "assets" / "images" / "laundry.jpeg"
PROMPT = "A chat.\nHuman: <image>\nHuman: What is unusual here?\nAI: A man irons on a taxi."
LM_LORA = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def twin_models(projector_type, seed=0):
    """The same random weights behind kernel_backend='torch' and kernel_backend='triton'."""
    torch_model = tiny_model(tiny_config(projector_type, kernel_backend="torch"), seed)
    triton_model = tiny_model(tiny_config(projector_type, kernel_backend="triton"), seed + 1)
    triton_model.load_state_dict(torch_model.state_dict())
    return torch_model, triton_model


def inputs_for(config, labels=False):
    return tiny_processor(config)(images=Image.open(PHOTO), text=PROMPT, return_tensors="pt", return_labels=labels)


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
    folder, reference, processor = tiny_folder(projector_type, seed=9, kernel_backend="triton")
    model = transformers.AutoModelForImageTextToText.from_pretrained(
        folder, trust_remote_code=True, dtype=torch.float32
    ).eval()
    # the kernels come from the folder's flat kernels_honeybee.py, loaded by transformers' remote-code loader
    kernels = sys.modules[type(model).__module__.rsplit(".", 1)[0] + ".kernels_honeybee"]
    assert kernels.HAS_TRITON and kernels.__name__.startswith("transformers_modules.")
    name = "msda_triton" if projector_type == "d-abs" else "cabs_dwconv_block_triton"
    launched, original = [], getattr(kernels, name)
    setattr(kernels, name, lambda *args: launched.append(1) or original(*args))
    try:
        inputs = processor(images=Image.open(PHOTO), text="What is this?", return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        setattr(kernels, name, original)
    assert launched, f"{name} was not called"
    reference.config.projector_config.kernel_backend = "torch"
    for module in reference.modules():
        if hasattr(module, "kernel_backend"):
            module.kernel_backend = "torch"
    with torch.no_grad():
        assert (logits - reference(**inputs).logits).abs().max() <= 1e-5


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
