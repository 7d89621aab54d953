"""Our C-/D-Abstractor against tensors produced by the official code (kakaobrain/honeybee, transformers 4.38.1,
timm 0.9.8, fp32, CPU) with deterministic random weights; the weights go through `convert.official`.

The fixtures are NCHW where the official modules are; ours are token-major (B, N, C).
"""

import inspect
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from honeybee_hf.configuration_honeybee import HoneybeeProjectorConfig
from honeybee_hf.convert.official import map_official_abstractor, map_official_state_dict
from honeybee_hf.modeling_honeybee import HoneybeeCAbstractor, HoneybeeDAbstractor, _initial_reference_points
from utils import OFFICIAL_FIXTURES as FIXTURES

ATOL = 1e-5
# dabs_m144_small (6 layers, random weights) is ill-conditioned in fp32: a 1e-7 relative change of its input moves
# the output by ~1.5e-4, and the same math in fp64 and fp32 differs by ~1.9e-4. Its official tensors were made
# on an AVX2 CPU: transformers' DeformableDetrDecoderLayer reproduces them bit for bit only when run with
# ATEN_CPU_CAPABILITY=avx2, and is 1.1e-4 off on AVX-512; our SDPA self-attention is 1.1e-4 to 1.9e-4 off on
# default/AVX2/AVX-512. Layer 0 still meets ATOL; deeper layers get this fp32 noise floor instead (a wrong
# equation would be off by O(1)).
ATOL_ILL_CONDITIONED = {"dabs_m144_small": 5e-4}
_CONFIG_FIELDS = set(inspect.signature(HoneybeeProjectorConfig.__init__).parameters) - {"self", "kwargs"}


def load_fixture(name):
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    return meta, load_file(str(FIXTURES / f"{name}.safetensors"))


def official_state_dict(tensors):
    return {k[len("state_dict.") :]: v for k, v in tensors.items() if k.startswith("state_dict.")}


def build_abstractor(meta):
    """Our abstractor, randomly initialised, from the official projector_config of a fixture."""
    official = meta["projector_config"]
    config = HoneybeeProjectorConfig(**{k: v for k, v in official.items() if k in _CONFIG_FIELDS})
    config.kernel_backend = "torch"  # runtime state, as model.set_kernel_backend sets it
    cls = HoneybeeCAbstractor if config.projector_type == "c-abs" else HoneybeeDAbstractor
    model = cls(config, meta["num_input_tokens"], official["encoder_hidden_size"], official["output_hidden_size"])
    return model.eval()


def load_official(model, state_dict):
    model.load_state_dict(map_official_abstractor(state_dict, model.state_dict()), strict=True)
    return model


def token_major(nchw):
    return nchw.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C), row-major as "b d h w -> b (h w) d"


def max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def run_with_hooks(model, x, modules):
    """Forward `x`, recording the output of each named module."""
    seen = {}
    handles = [
        m.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out))
        for name, m in modules.items()
    ]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, seen


@pytest.mark.parametrize("name", ["cabs_tiny", "cabs_m144_small"])
def test_cabs_matches_official(name):
    meta, t = load_fixture(name)
    model = load_official(build_abstractor(meta), official_state_dict(t))
    # stage 1 pools in its last block (fused), so its hook sees the pooled map; s1 is checked unpooled below
    names = {"pooled": model.net[0], "s2": model.net[2], "readout": model.readout}
    out, seen = run_with_hooks(model, t["input"], names)
    for key in ("pooled", "s2"):
        assert max_diff(seen[key], token_major(t[f"intermediate.{key}"])) <= ATOL, key
    with torch.no_grad():
        s1 = model.net[0](t["input"] + model.pos_emb, model.grid, model.grid)  # no pool_to: full resolution
    assert max_diff(s1, token_major(t["intermediate.s1"])) <= ATOL
    assert max_diff(seen["readout"], t["intermediate.readout"]) <= ATOL
    assert max_diff(out, t["output"]) <= ATOL


def test_cabs_m144_small_has_downsample_shortcut():
    meta, t = load_fixture("cabs_m144_small")
    sd = official_state_dict(t)
    assert "net.0.b1.downsample.conv.weight" in sd and "net.2.b1.downsample.conv.weight" not in sd
    assert build_abstractor(meta).net[0].b1.downsample is not None


def test_cabs_legacy_pos_emb_drops_cls_slot():
    meta, t = load_fixture("cabs_tiny")
    _, legacy = load_fixture("cabs_tiny_oldpos")
    sd = official_state_dict(t)
    sd["pos_emb"] = legacy["checkpoint.abstractor.pos_emb"]  # (1, N+1, Cv), slot 0 filled with 7.0
    assert sd["pos_emb"].shape[1] == meta["num_input_tokens"] + 1
    model = load_official(build_abstractor(meta), sd)
    with torch.no_grad():
        out = model(t["input"])
    assert max_diff(out, legacy["output"]) <= ATOL
    assert max_diff(out, t["output"]) <= ATOL
    assert torch.equal(model.pos_emb, legacy["checkpoint.abstractor.pos_emb"][:, 1:])


def test_dabs_legacy_v_pos_emb_drops_cls_slot():
    meta, t = load_fixture("dabs_tiny")
    sd = official_state_dict(t)
    sd["v_pos_emb"] = torch.cat([torch.full_like(sd["v_pos_emb"][:, :1], 7.0), sd["v_pos_emb"]], dim=1)
    mapped = map_official_abstractor(sd, build_abstractor(meta).state_dict())
    assert torch.equal(mapped["v_pos_emb"], t["state_dict.v_pos_emb"])


@pytest.mark.parametrize("name", ["dabs_tiny", "dabs_m144_small"])
def test_dabs_matches_official(name):
    meta, t = load_fixture(name)
    model = build_abstractor(meta)
    assert torch.equal(model.reference_points.detach(), t["init_reference_points"])  # our init, before loading
    assert torch.equal(
        _initial_reference_points(model.grid, model.reference_points.shape[1]), t["init_reference_points"]
    )
    load_official(model, official_state_dict(t))
    layers = {f"layer{i}": layer for i, layer in enumerate(model.layers)}
    weights = {"layer0_weights": model.layers[0].encoder_attn.attention_weights}
    out, seen = run_with_hooks(model, t["input"], {**layers, **weights})
    deep_atol = ATOL_ILL_CONDITIONED.get(name, ATOL)
    checked = 0
    for i, key in enumerate(layers):
        if f"intermediate.{key}" in t:
            assert max_diff(seen[key], t[f"intermediate.{key}"]) <= (ATOL if i == 0 else deep_atol), key
            checked += 1
    assert checked >= 2
    B, M, nh, L, P = t["intermediate.layer0_cross_attn_weights"].shape
    softmaxed = seen["layer0_weights"].view(B, M, nh, L * P).softmax(-1).view(B, M, nh, L, P)
    assert max_diff(softmaxed, t["intermediate.layer0_cross_attn_weights"]) <= ATOL
    with torch.no_grad():
        values = model.input_proj[0](t["input"]) + model.v_pos_emb
        pooled, _ = model.pooled_queries(values)  # pooled_v_target "query": the pooled map is the query position
    assert max_diff(pooled, token_major(t["intermediate.pooled"])) <= ATOL
    assert max_diff(out, t["output"]) <= deep_atol


def test_dabs_tiny_has_input_proj():
    meta, t = load_fixture("dabs_tiny")
    assert meta["projector_config"]["encoder_hidden_size"] != meta["projector_config"]["d_model"]
    assert isinstance(build_abstractor(meta).input_proj[0], torch.nn.Linear)


# --- the mapping refuses what it cannot place ----------------------------------------------------------------


@pytest.fixture(scope="module")
def cabs_tiny():
    meta, t = load_fixture("cabs_tiny")
    return official_state_dict(t), build_abstractor(meta).state_dict()


def test_wrong_shape_names_key(cabs_tiny):
    sd, target = cabs_tiny
    key = "net.0.b2.conv2.conv.weight"
    bad = {**sd, key: sd[key][:-1]}
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        map_official_abstractor(bad, target)


def test_wrong_pos_emb_length_names_key(cabs_tiny):
    sd, target = cabs_tiny
    bad = {**sd, "pos_emb": torch.zeros(1, sd["pos_emb"].shape[1] + 2, sd["pos_emb"].shape[2])}
    with pytest.raises(ValueError, match=re.escape("'pos_emb'")):
        map_official_abstractor(bad, target)


def test_missing_key_names_key(cabs_tiny):
    sd, target = cabs_tiny
    key = "readout.2.bias"
    bad = {k: v for k, v in sd.items() if k != key}
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        map_official_abstractor(bad, target)


def test_unexpected_key_names_key(cabs_tiny):
    sd, target = cabs_tiny
    key = "net.0.b1.downsample.conv.weight"
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        map_official_abstractor({**sd, key: torch.zeros(64, 64, 1, 1)}, target)


def test_full_state_dict_prefixes(cabs_tiny):
    sd, target = cabs_tiny
    official = {f"abstractor.{k}": v for k, v in sd.items()}
    ours = {f"model.abstractor.{k}": v for k, v in target.items()}
    mapped = map_official_state_dict(official, ours)
    assert mapped.keys() == ours.keys()
    key = "abstractor.readout.0.weight"
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        map_official_state_dict({**official, key: official[key].T}, ours)
    with pytest.raises(ValueError, match=re.escape("'abstractor.eos_tokens'")):
        map_official_state_dict({**official, "abstractor.eos_tokens": torch.zeros(1, 1, 96)}, ours)
    with pytest.raises(ValueError, match=re.escape("'mystery.weight'")):
        map_official_state_dict({**official, "mystery.weight": torch.zeros(1)}, ours)
