"""Tiny random Honeybee models with the toy Llama tokenizer shipped in `assets/`: for tests, the demo and
benchmarks. Small enough to build, save and run in a second on a CPU, shaped like the real thing: an 8x8 patch
grid pooled to 3x3 queries (overlapping windows, as 16->12), Cv != Ch and Cv != d_model (projection shortcuts).
"""

from pathlib import Path

import torch

from .configuration_honeybee import HoneybeeConfig
from .convert.conversion import build_processor
from .convert.tokenizer import load_backend
from .hub.folder import save_hub_folder
from .modeling_honeybee import HoneybeeForConditionalGeneration

ASSETS = Path(__file__).resolve().parent / "assets"
TOY_SPM = ASSETS / "toy_spm.model"
TOY_VOCAB = 600  # sentencepiece pieces; <image> is appended as id 600
# Language-model overrides for vLLM's CPU attention, which refuses head sizes below 32 (the default's is 8), and for
# quantization schemes with 128-wide weight groups.
VLLM_TEXT = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)


def tiny_config(projector_type="c-abs", text=None, **projector):
    """`text`: overrides of the language model's config (e.g. VLLM_TEXT); `projector`: of the projector's."""
    projector = {
        "projector_type": projector_type,
        "num_query_tokens": 9,
        "hidden_size": 24,
        "depth": 2,
        "d_model": 24,
        "decoder_layers": 2,
        "decoder_attention_heads": 4,
        "decoder_n_points": 2,
        "decoder_ffn_dim": 48,
        **projector,
    }
    return HoneybeeConfig(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=4,
        ),
        projector_config=projector,
        text_config=dict(
            model_type="llama",
            vocab_size=TOY_VOCAB + 1,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        | (text or {}),
        image_token_id=TOY_VOCAB,
    )


def tiny_processor(config):
    """The converter's processor for `config`, with the toy tokenizer."""
    return build_processor(load_backend(TOY_SPM), config)


def tiny_model(config, seed=0):
    torch.manual_seed(seed)
    return HoneybeeForConditionalGeneration(config).eval()


def save_tiny_hub_folder(out_dir, projector_type="c-abs", seed=0, force=False, text=None, **projector):
    """Build a random tiny Honeybee and write it as a Hub folder; returns (model, processor)."""
    config = tiny_config(projector_type, text, **projector)
    model, processor = tiny_model(config, seed), tiny_processor(config)
    save_hub_folder(model, processor, out_dir, force=force)
    return model, processor


def shrink_photos(names, folder, side=64):
    """Copies of the bundled photos `names`, longest side `side`, in `folder`: tiny models see 32x32 pixels anyway,
    and decoding and resizing the full photos at every training step would dominate the CPU time."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        with Image.open(ASSETS / "images" / name) as image:
            image = image.convert("RGB")
            image.thumbnail((side, side))
            image.save(folder / name, quality=95)
    return folder
