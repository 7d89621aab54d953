"""A release-*width* Honeybee (CLIP ViT-L/14, C-/D-Abstractor and Vicuna-7B at their real widths: hidden 4096,
head_dim 128, vocabulary 32000 + `<image>`; one layer each so it stays small) goes the way a user's model goes:
official-format `.tar.gz` (release layout, bf16 `.bin` shards + index) -> `honeybee-convert` -> Auto-class load ->
generate -> one LoRA step. Widths are where shape bugs hide (head_dim, vocab rows, the projector's output width);
the full-size runs are benchmarks (benchmarks/bench_convert_archive.py, bench_e2e.py), not tests.
"""

import logging
import uuid

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForImageTextToText, AutoProcessor

from honeybee_hf.configuration_honeybee import HoneybeeConfig
from honeybee_hf.convert import convert_official_checkpoint
from honeybee_hf.convert.official import map_official_state_dict
from utils import photo
from utils.official_format import draw, official_shapes, stand_in_tokenizer, write_official_checkpoint

VOCAB = 32000  # Vicuna v1.5; ours adds <image> = 32000
PROJECTORS = {
    "c-abs": dict(hidden_size=1024, depth=1, mlp_depth=2),
    "d-abs": dict(d_model=1024, decoder_layers=1, decoder_attention_heads=8, decoder_ffn_dim=1024),
}


def release_width_config(projector_type):
    """Honeybee-{C,D}-7B-M144's widths (the config defaults), one layer in each stack."""
    defaults = HoneybeeConfig()
    return HoneybeeConfig(
        vision_config=defaults.vision_config.to_dict() | dict(num_hidden_layers=1),
        projector_config=dict(projector_type=projector_type, num_query_tokens=144, **PROJECTORS[projector_type]),
        text_config=defaults.text_config.to_dict() | dict(num_hidden_layers=1),
    )


@pytest.mark.parametrize("projector_type", sorted(PROJECTORS))
def test_release_width_archive_converts_loads_generates_and_trains(projector_type, tmp_path):
    config = release_width_config(projector_type)
    tc = config.text_config
    assert (tc.hidden_size, tc.hidden_size // tc.num_attention_heads, tc.vocab_size) == (4096, 128, VOCAB + 1)
    name = f"7B-{projector_type[0].upper()}-Abs-M144"
    # 2 shards: the LM's weights do not fit in the first, as the release's 10 GB shards split a 7B
    (archive,) = write_official_checkpoint(config, name, tmp_path, VOCAB, folder=False, max_shard_bytes=600 * 10**6)
    tokenizer = stand_in_tokenizer(tmp_path / "tokenizer", VOCAB)
    out = tmp_path / f"hb_release_width_{uuid.uuid4().hex[:10]}"  # transformers 4 caches remote code by basename
    convert_official_checkpoint(archive, out, tokenizer, max_shard_size="400MB", progress=False)
    archive.unlink()

    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    try:
        processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
        model, info = AutoModelForImageTextToText.from_pretrained(
            out, trust_remote_code=True, dtype=torch.bfloat16, output_loading_info=True
        )
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not any(info.values()), info
    assert not [m for m in messages if "initialized" in m or "not used" in m], messages
    model.eval()

    # Every loaded weight is the written one (drawn again from its official name), mapped without the converter.
    ours = model.state_dict()
    for key, shape in official_shapes(config, VOCAB):
        mapped = map_official_state_dict({key: draw(key, shape, seed=0)}, ours, complete=False)
        for our_key, tensor in mapped.items():
            assert torch.equal(ours[our_key], tensor.to(ours[our_key].dtype)), our_key
    abstractor_dtype = torch.float32 if projector_type == "d-abs" else torch.bfloat16  # the official D-Abs ran fp32
    assert {p.dtype for p in model.model.abstractor.parameters()} == {abstractor_dtype}
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.lm_head.weight.shape == (VOCAB + 1, 4096)

    inputs = processor(images=photo(0), text="What is in the image?", return_tensors="pt")
    assert (inputs["input_ids"] == VOCAB).sum() == 144
    with torch.no_grad():
        logits = model(**inputs).logits
        assert torch.isfinite(logits).all() and not logits[..., VOCAB].any()  # <image>'s lm_head row is zeros
        generated = model.generate(
            **inputs, max_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        # step 1 is the prompt's forward; step 2, decoded from the KV cache, is a full forward over the longer text
        tokens = generated.sequences
        longer = dict(inputs, input_ids=tokens[:, :-1], attention_mask=torch.ones_like(tokens[:, :-1]))
        for step, full in zip(generated.logits, (logits[0, -1], model(**longer).logits[0, -1])):
            assert (step[0].float() - full.float()).abs().max() <= 0.02 * full.float().abs().max()

    lora = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)", lora_dropout=0.0)
    )
    lora.train()
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == VOCAB, -100)
    trainable = [p for p in lora.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    optimizer = torch.optim.SGD(trainable, lr=1.0)
    losses = []
    for _ in range(2):
        loss = lora(**inputs, labels=labels).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[1] < losses[0], losses
