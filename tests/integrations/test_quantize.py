"""`honeybee-quantize` (llm-compressor oneshot) on a tiny Honeybee: every scheme writes a complete Hub folder whose
language model is quantized and whose vision tower, projector and LM head are untouched, that reloads through
`AutoModelForImageTextToText` with `trust_remote_code`, and whose model card states the drift measured here again.

llm-compressor 0.14 pins transformers <=5.17, so these tests run in its own environment:
`.venvs/llmc/bin/python -m pytest tests/integrations/test_quantize.py` (`bash scripts/setup_envs.sh llmc` creates it).
"""

import json
import re

import pytest
import torch
from safetensors import safe_open

from honeybee_hf.quantize import KEEP_UNQUANTIZED, SCHEMES, logit_drift, main
from utils.cli import assert_one_line_error, run_console_script

pytest.importorskip(
    "llmcompressor",
    reason="llm-compressor is not installed; run these tests in .venvs/llmc (`bash scripts/setup_envs.sh llmc`)",
)

# Module names of the model as it is (a base model + head, LLaVA's layout) and with its parts at the top level.
LAYOUTS = {
    "base-model": {
        "kept": ["model.vision_tower.vision_model.encoder.layers.1.mlp.fc2", "model.abstractor.readout.0", "lm_head"],
        "quantized": ["model.language_model.layers.0.self_attn.q_proj", "model.language_model.layers.1.mlp.up_proj"],
    },
    "top-level": {
        "kept": ["vision_model.encoder.layers.0.self_attn.q_proj", "abstractor.readout.2", "language_model.lm_head"],
        "quantized": ["language_model.model.layers.1.mlp.down_proj", "language_model.model.layers.0.self_attn.o_proj"],
    },
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_keep_unquantized_matches_vision_projector_and_head_in_both_layouts(layout):
    from compressed_tensors.utils import match_name

    def kept(name):
        return any(match_name(name, target) for target in KEEP_UNQUANTIZED)

    assert all(kept(name) for name in LAYOUTS[layout]["kept"])
    assert not any(kept(name) for name in LAYOUTS[layout]["quantized"])


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from honeybee_hf.testing_utils import VLLM_TEXT, save_tiny_hub_folder

    folder = tmp_path_factory.mktemp("quantize") / "hb_quantize_source"
    model, processor = save_tiny_hub_folder(folder, "c-abs", seed=3, text=VLLM_TEXT)
    return folder, model, processor


def _tensors(folder):
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors


def _linear_names(model):
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_quantized_folder_is_complete_quantizes_only_the_language_model_and_reloads(source, scheme, tmp_path):
    from transformers import AutoModelForImageTextToText

    from honeybee_hf.hub.publish import check_hub_folder
    from honeybee_hf.quantize import CALIBRATION_IMAGES, calibration_inputs

    folder, original, processor = source
    out = tmp_path / f"hb_quantized_{scheme.replace('-', '')}"
    assert main([str(folder), str(out), "--scheme", scheme]) == 0
    check_hub_folder(out)  # config with auto_map, code, processor, tokenizer, weights

    # The saved weights: every language-model Linear carries quantization scales, nothing else does, and the kept
    # modules are bit-identical to the original's.
    tensors, state = _tensors(out), original.state_dict()
    quantized_suffix = "weight_packed" if scheme == "w4a16-gptq" else "weight_scale"
    linears = _linear_names(original)
    in_lm = [n for n in linears if "language_model." in n and not n.endswith("lm_head")]
    kept = [n for n in linears if n not in in_lm]
    assert in_lm and kept
    assert all(f"{n}.{quantized_suffix}" in tensors for n in in_lm)
    assert not any(f"{n}.weight_scale" in tensors for n in kept)
    assert all(torch.equal(tensors[f"{n}.weight"], state[f"{n}.weight"]) for n in kept)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"

    # Reloaded as users do: it answers like the original (the random tiny model's top token barely moves) and the
    # model card's drift is what we measure here.
    quantized = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True).eval()
    inputs = calibration_inputs(processor, CALIBRATION_IMAGES)
    with torch.no_grad():
        drift = logit_drift(
            [original(**x).logits[0] for x in inputs], [quantized(**x).logits[0].float() for x in inputs]
        )
    assert 0 < drift.max_abs < drift.reference_std  # quantized (not a copy), and close
    card = (out / "README.md").read_text()
    assert f"--scheme {scheme}" in card
    reported = re.search(r"mean \|Δlogit\| ([0-9.e+-]+)", card).group(1)
    assert float(reported) == pytest.approx(drift.mean_abs, rel=1e-3)


def test_cli_refuses_a_folder_that_is_not_a_hub_folder(tmp_path, capsys):
    assert main([str(tmp_path), str(tmp_path / "out"), "--scheme", "fp8-dynamic"]) == 1
    assert "not a Hub folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_an_existing_output(source, tmp_path, capsys):
    folder, _, _ = source
    (tmp_path / "out").mkdir()
    assert main([str(folder), str(tmp_path / "out"), "--scheme", "fp8-dynamic"]) == 1
    assert "--force" in capsys.readouterr().err


def test_console_script_answers_mistakes_in_one_line(tmp_path):
    """The installed `honeybee-quantize`, in a fresh process: an unknown scheme and a folder that is no model."""
    result = run_console_script("honeybee-quantize", tmp_path, tmp_path / "out", "--scheme", "fp4")
    assert_one_line_error(result, "honeybee-quantize", "--scheme", "'fp4'", "w8a8", "--help", exit_code=2)
    result = run_console_script("honeybee-quantize", tmp_path, tmp_path / "out", "--scheme", "fp8-dynamic")
    assert_one_line_error(result, "honeybee-quantize", str(tmp_path), "no config.json", "honeybee-convert")
    assert not (tmp_path / "out").exists()
