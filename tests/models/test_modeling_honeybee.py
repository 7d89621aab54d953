"""The model through transformers' Auto classes, generation and training behaviour, and its errors.

Tiny random models (testing_utils.py) saved as Hub folders and loaded back with trust_remote_code, on whichever
transformers version runs the suite (CI runs it on 4.57.6 and 5.23).
"""

import copy
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

from honeybee_hf.configuration_honeybee import HoneybeeConfig, HoneybeeProjectorConfig
from honeybee_hf.testing_utils import tiny_config, tiny_model, tiny_processor
from utils import TF4, load_and_run, official_messages, photo, run_script, training_inputs
from utils.load_and_run import load

PROJECTORS = ["c-abs", "d-abs"]
TRAINING_PROMPT = "A chat.\nHuman: <image>\nHuman: {q}\nAI: {a}"


@pytest.mark.parametrize("projector_type", PROJECTORS)
def test_auto_classes_load_the_saved_weights_exactly(tiny_folder, projector_type):
    folder, reference, processor = tiny_folder(projector_type)
    model, loaded_processor = load(folder)  # raises on any missing, unused or re-initialised weight
    assert type(model).__name__ == "HoneybeeForConditionalGeneration"
    assert type(model).__module__.startswith("transformers_modules"), "must come through the remote-code loader"
    inputs = processor(images=photo(), text="What is in the image?", return_tensors="pt")
    with torch.no_grad():
        expected = reference(**inputs).logits
        assert torch.equal(model(**inputs).logits, expected)
    for auto in ["AutoModelForVision2Seq"] if TF4 else []:
        other = getattr(transformers, auto).from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
        with torch.no_grad():
            assert torch.equal(other.eval()(**inputs).logits, expected), auto
    backbone = transformers.AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(backbone).__name__ == "HoneybeeModel"  # as transformers' LLaVA: AutoModel is the backbone
    with torch.no_grad():
        assert torch.equal(backbone(**inputs).last_hidden_state, reference.model(**inputs).last_hidden_state)
    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert config.to_dict()["projector_config"] == reference.config.to_dict()["projector_config"]


def test_offline_hub_cache_snapshot_loads(tiny_folder, tmp_path):
    """The Hub branch of the remote-code loader, exercised offline through a cache snapshot."""
    folder, reference, processor = tiny_folder("c-abs")
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf_home" / "hub" / "models--org--honeybee-tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    (repo / "snapshots").mkdir()
    os.symlink(folder, repo / "snapshots" / sha)  # a snapshot is a folder of links into blobs; a folder does too
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    run_script(sys.executable, load_and_run.__file__, "org/honeybee-tiny", tmp_path / "out.safetensors", env=env)
    out = load_file(tmp_path / "out.safetensors")
    with torch.no_grad():
        expected = reference(input_ids=out["input_ids"], pixel_values=out["pixel_values"]).logits
    assert torch.equal(out["logits"], expected)


def test_logits_and_loss_against_manual_computation():
    config = tiny_config("c-abs")
    model, processor = tiny_model(config), tiny_processor(config)
    messages, _ = official_messages(TRAINING_PROMPT.format(q="What is in the image?", a="A man."), [photo()])
    inputs = training_inputs(processor, messages)
    out = model(**inputs)
    # independent reference: embed, overwrite the placeholders with get_image_features, run the bare LM
    embeds = model.get_input_embeddings()(inputs["input_ids"]).clone()
    slots = inputs["input_ids"][0] == config.image_token_id
    embeds[0, slots] = model.get_image_features(inputs["pixel_values"], return_dict=True).pooler_output[0]
    logits = model.lm_head(model.language_model(inputs_embeds=embeds).last_hidden_state)
    torch.testing.assert_close(out.logits, logits)
    labels = inputs["labels"]
    loss = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, loss)
    assert (labels != -100).sum() == len(processor.tokenizer("A man.", add_special_tokens=False)["input_ids"]) + 1


@pytest.mark.parametrize("projector_type", PROJECTORS)
def test_greedy_generation_with_cache_equals_recomputing_everything(projector_type):
    config = tiny_config(projector_type)
    model, processor = tiny_model(config, seed=1), tiny_processor(config)
    inputs = processor(images=photo(1), text="Describe the photo.", return_tensors="pt")
    cached = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=True)
    ids = inputs["input_ids"]
    for _ in range(8):  # reference: a full forward over the whole sequence for every token
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits
        next_id = (
            logits[:, -1].masked_fill(torch.arange(logits.shape[-1]) == config.image_token_id, -math.inf).argmax(-1)
        )
        ids = torch.cat([ids, next_id[:, None]], dim=1)
        if next_id.item() == config.text_config.eos_token_id:
            break
    assert cached.tolist() == ids.tolist()


def test_a_generated_image_token_decodes_like_any_other_token():
    # The vocabulary holds <image>, so a model (with a generation config that does not suppress it) may generate
    # it: a decode step after a prompt embeds it as a token, as the same step given its embedding does.
    config = tiny_config("c-abs")
    model, processor = tiny_model(config, seed=1), tiny_processor(config)
    inputs = processor(images=photo(1), text="Describe the photo.", return_tensors="pt")
    image_id = torch.tensor([[config.image_token_id]])
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).past_key_values
        as_embedding = model(
            inputs_embeds=model.get_input_embeddings()(image_id), past_key_values=copy.deepcopy(cache)
        ).logits
        as_id = model(input_ids=image_id, past_key_values=cache).logits
    torch.testing.assert_close(as_id, as_embedding, rtol=0, atol=0)


@pytest.mark.parametrize("projector_type", PROJECTORS)
def test_left_padded_batch_equals_each_sample_alone(projector_type):
    config = tiny_config(projector_type)
    model, processor = tiny_model(config, seed=2), tiny_processor(config)
    model.generation_config.suppress_tokens = [config.image_token_id]  # as a saved folder's generation config
    texts = ["What is in the image?", "Describe this photo in detail, please, and say what the people do."]
    images = [photo(0), photo(2)]
    batch = processor(images=images, text=texts, return_tensors="pt")
    assert batch["attention_mask"][0, 0] == 0, "the shorter prompt must be left-padded"
    generated = model.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch["input_ids"].shape[1] :]
    for i in range(2):
        alone = processor(images=images[i], text=texts[i], return_tensors="pt")
        expected = model.generate(**alone, max_new_tokens=6, do_sample=False)[:, alone["input_ids"].shape[1] :]
        n = expected.shape[1]
        assert generated[i, :n].tolist() == expected[0].tolist()


def test_several_images_per_prompt_and_text_only_prompts():
    config = tiny_config("c-abs")
    model, processor = tiny_model(config, seed=3), tiny_processor(config)
    prompt = "A chat.\nHuman: <image>\nHuman: <image>\nHuman: What differs?\nAI: "
    two = processor(images=[photo(0), photo(1)], text=prompt, return_tensors="pt")
    out = model(**two)
    assert out.image_hidden_states.shape == (2, config.num_visual_tokens, config.text_config.hidden_size)
    swapped = processor(images=[photo(1), photo(0)], text=prompt, return_tensors="pt")
    assert not torch.allclose(model(**swapped).logits[:, -1], out.logits[:, -1]), "image order must matter"
    text_only = processor(text="What is the capital of France?", return_tensors="pt")
    assert "pixel_values" not in text_only
    assert model.generate(**text_only, max_new_tokens=4).shape[1] > text_only["input_ids"].shape[1]
    # a batch mixing an image prompt and a text-only prompt equals the two alone
    mixed = processor(images=[[photo(0)], []], text=["What is this?", "Say hello."], return_tensors="pt")
    alone = processor(images=photo(0), text="What is this?", return_tensors="pt")
    n = alone["input_ids"].shape[1]
    with torch.no_grad():
        torch.testing.assert_close(model(**mixed).logits[0, -1], model(**alone).logits[0, -1], atol=1e-5, rtol=1e-5)
    assert mixed["input_ids"].shape[1] >= n


@pytest.mark.parametrize("projector_type", PROJECTORS)
def test_gradient_checkpointing_gives_the_same_gradients(projector_type):
    config = tiny_config(projector_type)
    processor = tiny_processor(config)
    inputs = training_inputs(processor, official_messages(TRAINING_PROMPT.format(q="Q?", a="An answer."), [photo()])[0])
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(config, seed=4).train()  # train mode: the D-Abstractor's dropout is live
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert model.vision_tower.vision_model.encoder.layers[0].gradient_checkpointing
        torch.manual_seed(0)  # same dropout masks; checkpointing replays the RNG state when recomputing
        model(**inputs).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert any(n.startswith("model.abstractor.") for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_eager_and_sdpa_attention_agree(tiny_folder):
    folder, _, processor = tiny_folder("c-abs")
    inputs = processor(images=photo(), text="What is in the image?", return_tensors="pt")
    logits = {}
    for implementation in ("eager", "sdpa"):
        model = transformers.AutoModelForImageTextToText.from_pretrained(
            folder, trust_remote_code=True, dtype=torch.float32, attn_implementation=implementation
        ).eval()
        assert model.config.vision_config._attn_implementation == implementation
        with torch.no_grad():
            logits[implementation] = model(**inputs).logits
    torch.testing.assert_close(logits["eager"], logits["sdpa"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("projector_type", PROJECTORS)
def test_half_precision_and_device_map_loads(tiny_folder, projector_type):
    folder, reference, processor = tiny_folder(projector_type)
    model = transformers.AutoModelForImageTextToText.from_pretrained(
        folder, trust_remote_code=True, dtype=torch.bfloat16, device_map="auto"
    )
    assert model.language_model.dtype == torch.bfloat16
    # the D-Abstractor stays in fp32, as the official one always ran
    expected = torch.float32 if projector_type == "d-abs" else torch.bfloat16
    assert {p.dtype for p in model.abstractor.parameters()} == {expected}
    inputs = processor(images=photo(), text="What is in the image?", return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        logits = model(**inputs).logits.float()
        full = reference(**processor(images=photo(), text="What is in the image?", return_tensors="pt")).logits
    assert torch.isfinite(logits).all()
    assert (logits - full).abs().max() < 0.1 * full.abs().max()


def test_wrong_inputs_get_clear_errors():
    config = tiny_config("c-abs")
    model, processor = tiny_model(config), tiny_processor(config)
    one = processor(images=photo(), text="What is in the image?", return_tensors="pt")
    two_placeholders = processor(
        images=[photo(), photo()], text="X\nHuman: <image>\nHuman: <image>\nAI: ", return_tensors="pt"
    )
    with pytest.raises(ValueError, match=r"18 image placeholder tokens \(2 images of 9 tokens\) but 1 images"):
        model(input_ids=two_placeholders["input_ids"], pixel_values=one["pixel_values"])
    with pytest.raises(ValueError, match=r"9 image placeholder tokens \(1 images of 9 tokens\) but 2 images"):
        model(input_ids=one["input_ids"], pixel_values=two_placeholders["pixel_values"])
    with pytest.raises(ValueError, match=r"must have shape \(num_images, 3, 32, 32\).*HoneybeeProcessor"):
        model(input_ids=one["input_ids"], pixel_values=torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=one["input_ids"])
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model()


@pytest.mark.parametrize(
    "projector, message",
    [
        ({"projector_type": "x-abs"}, "projector_type must be one of"),
        ({"num_query_tokens": 10}, "perfect square"),
        ({"projector_type": "d-abs", "pooled_v_target": "key"}, "pooled_v_target must be one of"),
        ({"projector_type": "d-abs", "num_feature_levels": 2}, "num_feature_levels must be 1"),
        ({"projector_type": "d-abs", "d_model": 30, "decoder_attention_heads": 8}, "divisible"),
        ({"feature_layer_index": [-1, -2]}, "one int"),
        ({"mlp_depth": 0}, "mlp_depth"),
    ],
)
def test_impossible_config_values_are_refused(projector, message):
    with pytest.raises(ValueError, match=message):
        HoneybeeProjectorConfig(**projector)


def test_composite_config_is_validated_and_round_trips(tmp_path):
    with pytest.raises(ValueError, match="out of range"):
        tiny_config("c-abs", feature_layer_index=5)
    with pytest.raises(ValueError, match="image_token_id"):
        HoneybeeConfig(text_config={"model_type": "llama", "vocab_size": 100}, image_token_id=100)
    config = tiny_config("d-abs", num_eos_tokens=2, pooled_v_target="tgt")
    config.save_pretrained(tmp_path)
    again = HoneybeeConfig.from_pretrained(tmp_path)
    assert again.to_dict() == config.to_dict()  # transformers 5's == ignores our fields: compare dicts
    assert again.num_visual_tokens == 11
    default = HoneybeeConfig()  # Honeybee-C-7B-M144
    assert (default.vision_grid, default.num_visual_tokens, default.text_config.hidden_size) == (16, 144, 4096)
