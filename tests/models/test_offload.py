"""Big-model loading: any part of Honeybee offloaded to disk gives the logits of a plain load.

accelerate brings an offloaded module's weights from disk only while that module's own forward runs, so this
checks that every module calls its children or owns the weights it reads (the fused C-Abstractor ops included)
and that loading through the meta device leaves no meta tensor and no uninitialised buffer behind.
"""

import pytest
import torch
import transformers

from utils import photo

PARTS = {"clip": "model.vision_tower", "projector": "model.abstractor", "llm": "model.language_model"}
DEVICE_MAPS = {  # what goes to disk; the rest stays on the CPU
    **{f"{name} only": [module] for name, module in PARTS.items()},
    "everything": [*PARTS.values(), "lm_head"],
}


def inputs_for(processor):
    images = [photo(0), photo(0).rotate(90)]
    return processor(images=images, text=["What is in the image?", "Describe it."], return_tensors="pt")


def assert_fresh_buffers(model, offloaded=()):
    """No meta tensor outside the disk-offloaded modules, and the rotary `inv_freq` (a non-persistent buffer, in
    no checkpoint) computed, not left uninitialised by the meta-device init."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert tensor.device.type != "meta" or name.startswith(tuple(offloaded)), name
    rotary = model.model.language_model.rotary_emb
    torch.testing.assert_close(rotary.inv_freq, type(rotary)(model.config.text_config).inv_freq, rtol=0, atol=0)


def plain_logits(folder, inputs):
    model = transformers.AutoModelForImageTextToText.from_pretrained(
        folder, trust_remote_code=True, dtype=torch.float32
    )
    with torch.no_grad():
        return model.eval()(**inputs).logits


@pytest.mark.parametrize("projector_type", ["c-abs", "d-abs"])
@pytest.mark.parametrize("offloaded", list(DEVICE_MAPS))
def test_disk_offload_equals_plain_load(tiny_folder, tmp_path, projector_type, offloaded):
    folder, _, processor = tiny_folder(projector_type)
    inputs = inputs_for(processor)
    device_map = {module: "cpu" for module in [*PARTS.values(), "lm_head"]}
    device_map.update(dict.fromkeys(DEVICE_MAPS[offloaded], "disk"))
    model = transformers.AutoModelForImageTextToText.from_pretrained(
        folder, trust_remote_code=True, dtype=torch.float32, device_map=device_map, offload_folder=tmp_path / "off"
    ).eval()
    assert set(model.hf_device_map.values()) == ({"disk"} if offloaded == "everything" else {"cpu", "disk"})
    assert_fresh_buffers(model, DEVICE_MAPS[offloaded])
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.testing.assert_close(logits, plain_logits(folder, inputs), atol=1e-5, rtol=0)


def half_the_weights(folder):
    return (folder / "model.safetensors").stat().st_size // 2


@pytest.mark.parametrize("projector_type", ["c-abs", "d-abs"])
def test_auto_device_map_with_little_memory_offloads_and_equals_plain_load(tiny_folder, tmp_path, projector_type):
    folder, _, processor = tiny_folder(projector_type)
    inputs = inputs_for(processor)
    model = transformers.AutoModelForImageTextToText.from_pretrained(
        folder,
        trust_remote_code=True,
        dtype=torch.float32,
        device_map="auto",
        max_memory={"cpu": half_the_weights(folder)},
        offload_folder=tmp_path / "off",
    ).eval()
    on_disk = [name for name, where in model.hf_device_map.items() if where == "disk"]
    assert on_disk and len(on_disk) < len(model.hf_device_map)
    assert_fresh_buffers(model, on_disk)
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.testing.assert_close(logits, plain_logits(folder, inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("projector_type", ["c-abs", "d-abs"])
def test_load_checkpoint_and_dispatch_with_offload_equals_plain_load(tiny_folder, tmp_path, projector_type):
    accelerate = pytest.importorskip("accelerate")
    folder, _, processor = tiny_folder(projector_type)
    inputs = inputs_for(processor)
    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)
    with accelerate.init_empty_weights():
        model = transformers.AutoModelForImageTextToText.from_config(config, trust_remote_code=True)
    model = accelerate.load_checkpoint_and_dispatch(
        model,
        str(folder / "model.safetensors"),
        device_map="auto",
        max_memory={"cpu": half_the_weights(folder)},
        no_split_module_classes=model._no_split_modules,
        offload_folder=tmp_path / "off",
        dtype=torch.float32,
    ).eval()
    on_disk = [name for name, where in model.hf_device_map.items() if where == "disk"]
    assert on_disk
    assert_fresh_buffers(model, on_disk)
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.testing.assert_close(logits, plain_logits(folder, inputs), atol=1e-5, rtol=0)


def test_default_load_leaves_no_meta_tensor_or_uninitialised_buffer(tiny_folder):
    folder, _, _ = tiny_folder("c-abs")
    model = transformers.AutoModelForImageTextToText.from_pretrained(
        folder, trust_remote_code=True, dtype=torch.float32, device_map="cpu"
    )
    assert_fresh_buffers(model)
