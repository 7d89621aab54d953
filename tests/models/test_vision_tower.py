"""Our vendored CLIP tower against transformers' own `CLIPVisionModel`, an independent reference."""

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from honeybee_hf.modeling_honeybee import HoneybeeVisionModel

ATOL = 1e-5


def tiny_clip_config(attn_implementation):
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,  # 4x4 patches
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    config._attn_implementation = attn_implementation
    return config


def to_ours(reference_state_dict):
    """transformers 4 keeps the inner `vision_model.` of CLIPVisionModel in its keys; transformers 5 drops it.
    Ours has no `post_layernorm` (it only normalises the pooled CLS, which Honeybee never reads)."""
    ours = {k if k.startswith("vision_model.") else f"vision_model.{k}": v for k, v in reference_state_dict.items()}
    return {k: v for k, v in ours.items() if not k.startswith("vision_model.post_layernorm.")}


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    reference = CLIPVisionModel(tiny_clip_config("eager"))
    # Random everything (LayerNorms and biases included), large enough that no layer is close to the identity.
    return {k: torch.randn_like(v) * (0.2 if v.dim() > 1 else 0.5) for k, v in reference.state_dict().items()}


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_matches_transformers_clip(weights, attn_implementation):
    reference = CLIPVisionModel(tiny_clip_config(attn_implementation)).eval()
    reference.load_state_dict(weights, strict=True)
    assert reference.config._attn_implementation == attn_implementation
    ours = HoneybeeVisionModel(tiny_clip_config(attn_implementation)).eval()
    ours.load_state_dict(to_ours(weights), strict=True)

    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference(pixel_values, output_hidden_states=True, output_attentions=attn_implementation == "eager")
        got = ours(pixel_values, output_attentions=True)
        assert len(got.hidden_states) == len(want.hidden_states)  # embeddings + 3 layers, CLS included
        for mine, theirs in zip(got.hidden_states, want.hidden_states):
            assert (mine - theirs).abs().max().item() <= ATOL
        assert (got.last_hidden_state - want.last_hidden_state).abs().max().item() <= ATOL
        if attn_implementation == "eager":  # sdpa gives no weights, in CLIP as in ours
            for mine, theirs in zip(got.attentions, want.attentions, strict=True):
                assert (mine - theirs).abs().max().item() <= ATOL
