"""The contract of a transformers VLM, in the spirit of transformers' `ModelTesterMixin`, each point checked
against an independent reference: the class ladder (`base_model` is the backbone, as in LLaVA), `inputs_embeds`
(with and without images) against `input_ids`, `get_image_features`' output types, the runtime attention switch,
generation's batch expansion against the unexpanded rows, a compiled forward against eager, and the loss ignoring
`<image>` labels. Tiny random models, both projectors, on whichever transformers version runs the suite.
"""

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers.modeling_outputs import BaseModelOutputWithPooling

from honeybee_hf.testing_utils import tiny_config, tiny_model, tiny_processor
from utils import TF4, photo

PROJECTORS = ["c-abs", "d-abs"]
TWO_IMAGES = "A chat.\nHuman: <image>\nHuman: <image>\nHuman: What differs?\nAI: "


def build(projector_type, seed=0):
    config = tiny_config(projector_type)
    return tiny_model(config, seed), tiny_processor(config)


def mixed_batch(processor):
    """Row 0: two images; row 1: one image; row 2: text only (left-padded, as generation wants)."""
    return processor(
        images=[[photo(0), photo(1)], [photo(2)], []],
        text=[TWO_IMAGES, "Human: <image>\nHuman: What is this?\nAI: ", "Human: Say hello.\nAI: "],
        return_tensors="pt",
    )


# ---------------------------------------------------------------------------------------------------------
# The class ladder
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("projector_type", PROJECTORS)
def test_base_model_is_the_backbone_and_the_head_gives_the_logits(projector_type):
    model, processor = build(projector_type)
    assert model.base_model is model.model and type(model.model).__name__ == "HoneybeeModel"
    assert model.get_decoder() is model.model.language_model
    assert model.get_output_embeddings() is model.lm_head
    assert model.get_input_embeddings() is model.model.language_model.get_input_embeddings()
    inputs = processor(images=photo(), text="What is in the image?", return_tensors="pt")
    with torch.no_grad():
        hidden = model.base_model(**inputs).last_hidden_state  # what TRL's fused-head trainers read
        torch.testing.assert_close(model.lm_head(hidden), model(**inputs).logits, rtol=0, atol=0)


def test_tied_text_config_ties_the_head_to_the_embeddings():
    config = tiny_config("c-abs")
    config.text_config.tie_word_embeddings = config.tie_word_embeddings = True
    model = tiny_model(config)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    untied = tiny_model(tiny_config("c-abs"))  # Vicuna's shape: its own head
    assert untied.lm_head.weight.data_ptr() != untied.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("projector_type", PROJECTORS)
def test_every_trainable_parameter_gets_a_gradient_with_checkpointing(projector_type):
    model, processor = build(projector_type)
    model.train()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})  # positional: 4.x and 5.x name the argument differently
    inputs = processor(images=photo(), text="Human: <image>\nHuman: Q?\nAI: An answer.", return_tensors="pt")
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []  # DDP needs no find_unused_parameters


# ---------------------------------------------------------------------------------------------------------
# inputs_embeds
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("projector_type", PROJECTORS)
def test_inputs_embeds_give_what_input_ids_give(projector_type):
    model, processor = build(projector_type, seed=1)
    batch = mixed_batch(processor)
    embeds = model.get_input_embeddings()(batch["input_ids"])
    with torch.no_grad():
        expected = model(**batch).logits
        got = model(inputs_embeds=embeds, pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"])
        torch.testing.assert_close(got.logits, expected, rtol=0, atol=0)
        text = processor(text="Say hello.", return_tensors="pt")
        torch.testing.assert_close(
            model(inputs_embeds=model.get_input_embeddings()(text["input_ids"])).logits,
            model(input_ids=text["input_ids"]).logits,
            rtol=0,
            atol=0,
        )
    with pytest.raises(ValueError, match=r"18 image placeholder tokens \(2 images of 9 tokens\) but 3 images"):
        model(inputs_embeds=embeds[:1], pixel_values=batch["pixel_values"])


@pytest.mark.parametrize("projector_type", PROJECTORS)
def test_generate_from_inputs_embeds_equals_generate_from_input_ids(projector_type):
    model, processor = build(projector_type, seed=2)
    model.generation_config.suppress_tokens = [model.config.image_token_id]  # as a saved folder's generation config
    batch = mixed_batch(processor)
    prompt_length = batch["input_ids"].shape[1]
    from_ids = model.generate(**batch, max_new_tokens=5, do_sample=False)[:, prompt_length:]
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach()
    from_embeds = model.generate(
        inputs_embeds=embeds,
        pixel_values=batch["pixel_values"],
        attention_mask=batch["attention_mask"],
        max_new_tokens=5,
        do_sample=False,
    )
    assert from_embeds.tolist() == from_ids.tolist()  # with inputs_embeds only the new tokens come back
    text = processor(text="Say hello.", return_tensors="pt")  # text only
    from_ids = model.generate(**text, max_new_tokens=5, do_sample=False)[:, text["input_ids"].shape[1] :]
    from_embeds = model.generate(
        inputs_embeds=model.get_input_embeddings()(text["input_ids"]).detach(), max_new_tokens=5, do_sample=False
    )
    assert from_embeds.tolist() == from_ids.tolist()


# ---------------------------------------------------------------------------------------------------------
# get_image_features
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("projector_type", PROJECTORS)
def test_get_image_features_output_contract(projector_type):
    model, processor = build(projector_type, seed=3)
    model.set_attn_implementation("eager")  # attention weights come from eager attention only
    config = model.config
    pixel_values = processor(images=[photo(0), photo(1)], text=TWO_IMAGES, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model.get_image_features(
            pixel_values, return_dict=True, output_hidden_states=True, output_attentions=True
        )
        plain = model.get_image_features(pixel_values, return_dict=True)
        off = model.get_image_features(pixel_values, return_dict=False)
        default = model.get_image_features(pixel_values)
        forward = model(**processor(images=[photo(0), photo(1)], text=TWO_IMAGES, return_tensors="pt"))
        tower = model.model.vision_tower(pixel_values, output_attentions=True)  # the tower on its own
        # the config's defaults, as transformers 5's `merge_with_config_defaults` and `can_return_tuple` apply them
        config.output_hidden_states, config.output_attentions, config.return_dict = True, True, False
        from_config = model.get_image_features(pixel_values)
        config.output_hidden_states, config.output_attentions, config.return_dict = False, False, True
    assert isinstance(out, BaseModelOutputWithPooling)  # transformers 5's generic code reads .pooler_output
    assert out.pooler_output.shape == (2, config.num_visual_tokens, config.text_config.hidden_size)
    # as LLaVA's: the tower's own last hidden state (CLS included, vision width), hidden states and attentions
    tokens = config.vision_grid**2 + 1
    assert out.last_hidden_state.shape == (2, tokens, config.vision_config.hidden_size)
    torch.testing.assert_close(out.last_hidden_state, tower.last_hidden_state, rtol=0, atol=0)
    assert len(out.hidden_states) == len(out.attentions) + 1 == config.vision_config.num_hidden_layers + 1
    for got, want in zip(out.hidden_states + out.attentions, tower.hidden_states + tower.attentions, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert out.attentions[0].shape == (2, config.vision_config.num_attention_heads, tokens, tokens)
    assert plain.hidden_states is None and plain.attentions is None  # only when asked
    torch.testing.assert_close(forward.image_hidden_states, out.pooler_output, rtol=0, atol=0)
    # Without return_dict=True each version answers as its LLaVA: transformers 4 the features themselves; 5 the
    # output object, or its tuple with return_dict=False (also when the config says so)
    if TF4:
        for features in (off, default, from_config):
            torch.testing.assert_close(features, out.pooler_output, rtol=0, atol=0)
    else:
        assert isinstance(default, BaseModelOutputWithPooling) and default.hidden_states is None
        assert isinstance(off, tuple) and len(off) == 2 and isinstance(from_config, tuple) and len(from_config) == 4
        for got, want in zip(from_config, out.to_tuple(), strict=True):
            for a, b in zip(got if isinstance(got, tuple) else [got], want if isinstance(want, tuple) else [want]):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(off[1], out.pooler_output, rtol=0, atol=0)


def test_vision_tower_is_a_pretrained_model_that_attention_dispatch_sees():
    """The tower's own flags decide its attention, as CLIP's do inside LLaVA: a composite sdpa load runs sdpa in
    the tower, the projector and the LLM alike, and an eager load eager everywhere."""
    model, _ = build("d-abs")
    tower = model.model.vision_tower
    assert isinstance(tower, transformers.PreTrainedModel) and tower.config is model.config.vision_config
    assert tower._supports_sdpa and tower._supports_flash_attn_2 and tower.main_input_name == "pixel_values"
    configs = [model.config.vision_config, model.config.projector_config, model.config.text_config]
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        assert [c._attn_implementation for c in configs] == [implementation] * 3


def test_tensor_parallel_plan_shards_the_head_as_the_library_does():
    from transformers import LlamaForCausalLM

    model, _ = build("c-abs")
    # the running version's own Llama is the reference for the head's style ("colwise_rep" on 4.57)
    assert type(model)._tp_plan["lm_head"] == LlamaForCausalLM._tp_plan["lm_head"]
    if not TF4:  # 5.x gathers the whole model's plan on the instance, the language model's layers included
        assert model._tp_plan["lm_head"] == "colwise_gather_output"
        assert any(key.startswith("model.language_model.layers.") for key in model._tp_plan)


# ---------------------------------------------------------------------------------------------------------
# Attention switch
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("projector_type", PROJECTORS)
def test_set_attn_implementation_switches_every_attention_layer(tiny_folder, projector_type):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    folder, _, processor = tiny_folder(projector_type)
    model = transformers.AutoModelForImageTextToText.from_pretrained(
        folder, trust_remote_code=True, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    calls = []

    def counting_attention(module, *args, **kwargs):
        calls.append(module)
        return sdpa_attention_forward(module, *args, **kwargs)

    AttentionInterface.register("honeybee_counting", counting_attention)
    inputs = processor(images=photo(), text="What is in the image?", return_tensors="pt")
    with torch.no_grad():
        sdpa = model(**inputs).logits
        model.set_attn_implementation("honeybee_counting")
        counted = model(**inputs).logits
        model.set_attn_implementation("eager")
        eager = model(**inputs).logits
    config = model.config
    configs = [config, config.vision_config, config.text_config, config.projector_config]
    assert [c._attn_implementation for c in configs] == ["eager"] * 4
    attention_layers = [
        m
        for m in model.modules()
        if type(m).__name__ in ("HoneybeeVisionAttention", "HoneybeeSelfAttention", "LlamaAttention")
    ]
    expected_layers = config.vision_config.num_hidden_layers + config.text_config.num_hidden_layers
    if projector_type == "d-abs":
        expected_layers += config.projector_config.decoder_layers
    assert len(attention_layers) == expected_layers
    assert {id(m) for m in calls} == {id(m) for m in attention_layers} and len(calls) == expected_layers
    torch.testing.assert_close(counted, sdpa, rtol=0, atol=0)
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Generation: expanded rows
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("projector_type", PROJECTORS)
def test_expanded_rows_equal_their_unexpanded_prompt(projector_type):
    """What beams and num_return_sequences feed the model: every copy of a prompt with its own images."""
    model, processor = build(projector_type, seed=4)
    batch = mixed_batch(processor)
    expand = 3
    input_ids, expanded = model._expand_inputs_for_generation(
        expand_size=expand,
        input_ids=batch["input_ids"],
        pixel_values=batch["pixel_values"],
        attention_mask=batch["attention_mask"],
    )
    assert expanded["pixel_values"].shape[0] == expand * batch["pixel_values"].shape[0]
    with torch.no_grad():
        reference = model(**batch).logits
        logits = model(input_ids=input_ids, **expanded).logits
    for row in range(logits.shape[0]):
        torch.testing.assert_close(logits[row], reference[row // expand], atol=1e-5, rtol=1e-5, msg=f"row {row}")


@pytest.mark.parametrize("projector_type", PROJECTORS)
def test_beam_search_copies_see_their_own_images(projector_type):
    """generate with beams: every returned sequence scores as a full forward of its own prompt and images."""
    model, processor = build(projector_type, seed=5)
    batch = mixed_batch(processor)
    out = model.generate(
        **batch,
        max_new_tokens=3,
        num_beams=3,
        num_return_sequences=3,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        length_penalty=0.0,
    )
    assert out.sequences.shape[0] == 9
    with torch.no_grad():
        scores = model.compute_transition_scores(out.sequences, out.scores, out.beam_indices, normalize_logits=False)
    for row in range(9):
        sample = {key: value[row // 3 : row // 3 + 1] for key, value in batch.items() if key != "pixel_values"}
        images = {0: slice(0, 2), 1: slice(2, 3), 2: None}[row // 3]
        if images is not None:
            sample["pixel_values"] = batch["pixel_values"][images]
        sequence = out.sequences[row : row + 1]
        mask = torch.cat([sample["attention_mask"], torch.ones_like(sequence[:, sample["input_ids"].shape[1] :])], 1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate counts them on a left-padded row
        with torch.no_grad():
            log_probs = model(
                input_ids=sequence, attention_mask=mask, position_ids=positions, pixel_values=sample.get("pixel_values")
            ).logits
        log_probs = log_probs.log_softmax(-1)
        start = sample["input_ids"].shape[1]
        new = sequence[0, start:]
        expected = log_probs[0, start - 1 : -1].gather(-1, new[:, None])[:, 0]
        # up to the first eos: after it a finished beam is padded, with score 0 (4.57) or -inf (5.x)
        ended = (new == model.config.text_config.eos_token_id).cumsum(0)
        scored = (ended == 0) | ((ended == 1) & (new == model.config.text_config.eos_token_id))
        assert scored[0]
        got, want = scores[row][scored], expected[scored]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=f"row {row}")


@pytest.mark.parametrize("projector_type", PROJECTORS)
def test_images_encoded_once_give_what_their_pixels_give(projector_type):
    """`mm_encoder_outputs`, as LLaVA takes it on transformers 5: images encoded by `get_image_features` beforehand
    (5.x's generate does so itself before the prefill) give the logits and tokens their pixels give."""
    model, processor = build(projector_type, seed=6)
    model.set_attn_implementation("eager")  # attention weights come from eager attention only
    batch = mixed_batch(processor)
    pixels = batch.pop("pixel_values")

    def encoded():
        with torch.no_grad():
            return {"image": model.get_image_features(pixels, return_dict=True)}

    with torch.no_grad():
        reference = model(**batch, pixel_values=pixels)
        got = model(**batch, mm_encoder_outputs=encoded())
    torch.testing.assert_close(got.logits, reference.logits, rtol=0, atol=0)
    torch.testing.assert_close(got.image_hidden_states, reference.image_hidden_states, rtol=0, atol=0)
    with pytest.raises(ValueError, match="either as pixel_values or as mm_encoder_outputs"):
        model(**batch, pixel_values=pixels, mm_encoder_outputs=encoded())
    options = dict(max_new_tokens=4, do_sample=False, output_attentions=True, return_dict_in_generate=True)
    want = model.generate(**batch, pixel_values=pixels, **options)
    out = model.generate(**batch, mm_encoder_outputs=encoded(), **options)
    assert out.sequences.tolist() == want.sequences.tolist()
    # generate hands get_image_features the kwargs it names: output_attentions must still reach the LLM
    assert len(out.attentions[0]) == len(want.attentions[0]) == model.config.text_config.num_hidden_layers
    if not TF4:  # 4.57's generate has no pre-encoding
        assert model._supports_mm_encoder_outputs()


@pytest.mark.parametrize("projector_type", PROJECTORS)
def test_text_only_generate_takes_pixel_values_none(projector_type):
    """`generate(pixel_values=None)`, as a loop over mixed prompts passes it for a text-only one, generates what the
    same prompt without the argument does (5.x's generate hands the None to `get_image_features`)."""
    model, processor = build(projector_type, seed=7)
    batch = processor(text="Human: Say hello.\nAI: ", return_tensors="pt")
    options = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    want = model.generate(**batch, **options)
    got = model.generate(**batch, pixel_values=None, **options)
    assert got.sequences.tolist() == want.sequences.tolist()
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(want.scores), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("projector_type", PROJECTORS)
def test_fullgraph_compiled_prefill_and_decode_equal_eager(projector_type):
    from transformers import DynamicCache

    torch._dynamo.reset()
    model, processor = build(projector_type, seed=6)
    assert model._can_compile_fullgraph
    inputs = processor(images=photo(), text="What is in the image?", return_tensors="pt")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: any graph break raises
    with torch.no_grad():
        outputs = {}
        for name, run in (("eager", model), ("compiled", compiled)):
            cache = DynamicCache(config=model.config.text_config) if not TF4 else DynamicCache()
            prefill = run(**inputs, past_key_values=cache, use_cache=True)
            next_id = prefill.logits[:, -1:].argmax(-1)
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(next_id)], dim=1)
            decode = run(input_ids=next_id, attention_mask=mask, past_key_values=prefill.past_key_values)
            outputs[name] = (prefill.logits, decode.logits)
    for eager, compiled_logits in zip(outputs["eager"], outputs["compiled"]):
        torch.testing.assert_close(compiled_logits, eager, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("projector_type", PROJECTORS)
def test_labels_at_image_placeholders_are_ignored(projector_type):
    model, processor = build(projector_type, seed=7)
    batch = mixed_batch(processor)
    image = batch["input_ids"] == model.config.image_token_id
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)  # what TRL's collator passes
    masked = labels.masked_fill(image, -100)
    with torch.no_grad():
        reference = model(**batch, labels=masked)
        torch.testing.assert_close(model(**batch, labels=labels).loss, reference.loss, rtol=0, atol=0)
    logits, targets = reference.logits[:, :-1].flatten(0, 1), masked[:, 1:].flatten()
    torch.testing.assert_close(reference.loss, F.cross_entropy(logits, targets, ignore_index=-100))
    # the logits that predict a placeholder get no gradient at all; every supervised one does
    captured = []
    model.lm_head.register_forward_hook(lambda module, args, out: captured.append(out) or out.retain_grad())
    model(**batch, labels=labels).loss.backward()
    grad = captured[0].grad[:, :-1]  # (B, L - 1, V): position t predicts token t + 1
    assert image[:, 1:].any() and grad[image[:, 1:]].abs().max() == 0
    assert grad[masked[:, 1:] != -100].abs().sum(-1).min() > 0
