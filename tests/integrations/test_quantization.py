"""Quantizers quantize the language model only. bitsandbytes 8/4-bit (its CPU backend) and torchao int8 weight-only
leave the vision tower, the projector and lm_head with their checkpoint weights and dtype, the D-Abstractor stays
fp32, and QLoRA (4-bit base + LoRA) trains. Loaded as users do: a Hub folder through the remote-code loader."""

import pytest
import torch
import transformers
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor

from utils import TF4, photo

# bitsandbytes' CPU 4-bit kernels need input widths that are multiples of 64 and output widths of 32: a tiny LLM
# that wide (4 heads of 16, 2 key/value heads).
WIDE_TEXT = dict(hidden_size=64, intermediate_size=128, head_dim=16)


def bitsandbytes_config(bits):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (scripts/setup_envs.sh installs it)")
    if bits == 8:
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)


def torchao_int8_config():
    pytest.importorskip("torchao", reason="torchao is not installed (scripts/setup_envs.sh installs it)")
    from torchao.quantization import Int8WeightOnlyConfig

    return transformers.TorchAoConfig(Int8WeightOnlyConfig())


QUANTIZERS = {
    "bnb-8bit": lambda: bitsandbytes_config(8),
    "bnb-4bit": lambda: bitsandbytes_config(4),
    "torchao-int8": torchao_int8_config,
}


@pytest.fixture
def wide_tiny_folder(tmp_path):
    """A tiny random Honeybee whose LLM is 64 wide, saved as a Hub folder."""
    from honeybee_hf.hub.folder import save_hub_folder
    from honeybee_hf.testing_utils import tiny_config, tiny_model, tiny_processor

    def make(projector_type):
        config = tiny_config(projector_type)
        for key, value in WIDE_TEXT.items():
            setattr(config.text_config, key, value)
        folder = tmp_path / f"hb_wide_{projector_type.replace('-', '')}_{tmp_path.name[-12:]}"
        save_hub_folder(tiny_model(config, seed=1), tiny_processor(config), folder)
        return folder

    return make


def load(folder, **kwargs):
    return AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, device_map="cpu", **kwargs)


def image_inputs(folder):
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    return processor(images=photo(), text="What is in the image?", return_tensors="pt")


def is_quantized(linear):
    # bitsandbytes swaps the module class; torchao swaps the weight for a tensor subclass
    return type(linear) is not nn.Linear or type(linear.weight) is not nn.Parameter


def linears_by_part(model):
    """{"vision": [...], "projector": [...], "lm_head": [...], "llm": [...]}: (name, Linear) of each part."""
    towers = {
        "vision": [m for m in model.modules() if type(m).__name__ == "HoneybeeVisionModel"],
        "projector": [m for m in model.modules() if type(m).__name__ in ("HoneybeeCAbstractor", "HoneybeeDAbstractor")],
        "lm_head": [model.get_output_embeddings()],
    }
    assert all(len(found) == 1 for found in towers.values()), {k: len(v) for k, v in towers.items()}
    parts = {part: [] for part in (*towers, "llm")}
    owner = {id(m): part for part, (tower,) in towers.items() for m in tower.modules()}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            parts[owner.get(id(module), "llm")].append((name, module))
    return parts


@pytest.mark.parametrize("quantizer", list(QUANTIZERS))
def test_quantizers_leave_vision_tower_projector_and_lm_head_alone(wide_tiny_folder, quantizer):
    folder = wide_tiny_folder("c-abs")
    plain = load(folder)
    quantized = load(folder, quantization_config=QUANTIZERS[quantizer]())
    parts = linears_by_part(quantized)
    assert parts["llm"] and all(is_quantized(linear) for _, linear in parts["llm"])
    plain_dtypes = {name: p.dtype for name, p in plain.named_parameters()}
    for part in ("vision", "projector", "lm_head"):
        assert parts[part]
        for name, linear in parts[part]:
            assert not is_quantized(linear), f"{quantizer} quantized {name}"
            if part != "lm_head":  # transformers 4's bitsandbytes loads the rest of the LLM in float16 by default
                assert linear.weight.dtype == plain_dtypes[f"{name}.weight"], name
    inputs = image_inputs(folder)
    with torch.no_grad():
        # the image tokens the LLM receives are those of the plain load, to the bit
        expected = plain(**inputs).image_hidden_states
        actual = quantized(**inputs).image_hidden_states
        assert torch.equal(actual, expected.to(actual.dtype))  # cast to the LLM's dtype (float16: 4.x bitsandbytes)
        generated = quantized.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 4)
    assert torch.equal(generated[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


@pytest.mark.parametrize("bits", [8, 4])
def test_bitsandbytes_keeps_the_d_abstractor_fp32_in_a_half_precision_load(wide_tiny_folder, bits):
    folder = wide_tiny_folder("d-abs")
    model = load(folder, quantization_config=bitsandbytes_config(bits), dtype=torch.bfloat16)
    parts = linears_by_part(model)
    assert all(is_quantized(linear) for _, linear in parts["llm"])
    assert not any(is_quantized(linear) for part in ("vision", "projector") for _, linear in parts[part])
    (projector,) = [m for m in model.modules() if type(m).__name__ == "HoneybeeDAbstractor"]
    assert {p.dtype for p in projector.parameters()} == {torch.float32}
    # transformers 4's bitsandbytes path loads every `_keep_in_fp32_modules` entry in fp32; 5.x keeps the dtype asked
    vision_dtype = torch.float32 if TF4 else torch.bfloat16
    assert {linear.weight.dtype for _, linear in parts["vision"]} == {vision_dtype}
    inputs = image_inputs(folder)
    with torch.no_grad():
        assert model(**inputs).logits.isfinite().all()
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3


def test_qlora_trains_on_the_bitsandbytes_cpu_backend(wide_tiny_folder):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    folder = wide_tiny_folder("c-abs")
    model = load(folder, quantization_config=bitsandbytes_config(4))
    model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
    )
    model = get_peft_model(model, lora)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    inputs = image_inputs(folder)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(12):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses  # measured: 6.36 -> 5.47


def test_qlora_from_the_command_line_trains_and_merges_into_the_bf16_base(wide_tiny_folder, tmp_path):
    """`honeybee-finetune --load_in_4bit` on bitsandbytes' CPU backend; `honeybee-finetune merge` into bf16."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (scripts/setup_envs.sh installs it)")
    from honeybee_hf.train import finetune
    from utils.finetune import ANSWERS, image_sample, small_photos, write_jsonl

    folder = wide_tiny_folder("c-abs")
    photos = small_photos(tmp_path / "photos")
    data = write_jsonl(photos / "train.jsonl", [image_sample(name) for name in ANSWERS])
    out = tmp_path / "qlora"
    trainer = finetune.run([
        "--model", str(folder), "--data", str(data), "--output_dir", str(out), "--load_in_4bit",
        "--max_steps", "12", "--per_device_train_batch_size", "5", "--learning_rate", "1e-2", "--logging_steps", "1",
        "--save_strategy", "no", "--lora_modules_to_save", "none", "--report_to", "none",
    ])  # fmt: skip
    assert trainer.model.get_base_model().is_loaded_in_4bit
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0] - 0.5, losses

    merged = tmp_path / "merged"
    argv = ["merge", "--model", str(folder), "--adapter", str(out / "adapter"), "--output", str(merged)]
    assert finetune.main([*argv, "--dtype", "bfloat16"]) == 0
    base, model = load(folder, dtype=torch.bfloat16), load(merged, dtype=torch.bfloat16)
    q_proj = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert model.state_dict()[q_proj].dtype == torch.bfloat16
    assert not torch.equal(model.state_dict()[q_proj], base.state_dict()[q_proj])  # the adapter is in the weights
    inputs = image_inputs(folder)
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()
