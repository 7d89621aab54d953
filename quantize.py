"""`honeybee-quantize`: quantize a Honeybee Hub folder with llm-compressor's `oneshot`, following the recipe
llm-compressor publishes for vision-language models: the language model's Linear layers are quantized, the vision
tower, the projector and the LM head keep the checkpoint's dtype. The output is a complete Hub folder
(compressed-tensors weights, remote code, processor, tokenizer, a model card with the recipe and the measured logit
drift) that loads with transformers (`trust_remote_code=True`, compressed-tensors installed) and vLLM.

    honeybee-quantize Honeybee-C-7B-M144 Honeybee-C-7B-M144-FP8 --scheme fp8-dynamic
    honeybee-quantize Honeybee-C-7B-M144 Honeybee-C-7B-M144-W4A16 --scheme w4a16-gptq --images photos/*.jpg

llm-compressor 0.14 pins transformers <=5.17: run this in its own environment (`bash scripts/setup_envs.sh llmc`).
"""

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .cli import CommandError, add_debug_flag, console_script
from .hub.folder import staging_folder, write_support_files
from .hub.model_card import render_model_card
from .modeling_honeybee import HoneybeeForConditionalGeneration
from .pipeline_honeybee import CAPTION_QUESTION
from .processing_honeybee import HoneybeeProcessor

CALIBRATION_IMAGES = sorted((Path(__file__).resolve().parent / "assets" / "images").glob("*.jpeg"))

# Regular expressions (compressed-tensors' "re:" targets, matched against full module names) for the modules that
# stay unquantized: the vision tower, the projector and the LM head, wherever the model nests them (under a base
# model, `model.vision_tower.`, `lm_head`, or at the top level, `vision_model.`, `language_model.lm_head`).
KEEP_UNQUANTIZED = [
    "re:(.*\\.)?vision_(tower|model)(\\..*)?$",
    "re:(.*\\.)?abstractor(\\..*)?$",
    "re:(.*\\.)?lm_head$",
]


@dataclass(frozen=True)
class Scheme:
    description: str  # for --help and the model card
    calibrated: bool  # whether the recipe runs the model on calibration photos


SCHEMES = {
    "fp8-dynamic": Scheme(
        "FP8 (E4M3) weights, one scale per output channel, and FP8 activations with dynamic per-token scales "
        "(compressed-tensors `FP8_DYNAMIC`, data-free); runs on GPUs with FP8 support (Ada, Hopper and newer)",
        calibrated=False,
    ),
    "w4a16-gptq": Scheme(
        "4-bit integer weights in groups of 128 fitted with GPTQ on the calibration photos, 16-bit activations "
        "(compressed-tensors `W4A16`)",
        calibrated=True,
    ),
    "w8a8": Scheme(
        "8-bit integer weights, one scale per output channel, fitted with GPTQ on the calibration photos, and 8-bit "
        "integer activations with dynamic per-token scales (compressed-tensors `W8A8`)",
        calibrated=True,
    ),
}


def decoder_layer_class(model):
    """The language model's decoder layer class name: GPTQ's sequential target (one layer calibrated at a time)."""
    return type(model.get_decoder().layers[0]).__name__


def build_recipe(scheme):
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    if scheme == "fp8-dynamic":
        return [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=KEEP_UNQUANTIZED)]
    preset = {"w4a16-gptq": "W4A16", "w8a8": "W8A8"}[scheme]
    return [GPTQModifier(targets="Linear", scheme=preset, ignore=KEEP_UNQUANTIZED)]


def calibration_inputs(processor, images, question=CAPTION_QUESTION):
    """One processor output (batch of 1) per photo: the official inference prompt asking `question`."""
    return [processor(images=image, text=question, return_tensors="pt") for image in images]


def _calibration_dataset(inputs):
    from datasets import Dataset

    return Dataset.from_list([{k: v[0].tolist() for k, v in sample.items()} for sample in inputs])


def _collate_one(batch):
    """llm-compressor calibrates one sample at a time; the dataset holds lists, the model wants tensors."""
    (sample,) = batch
    return {
        key: torch.tensor(value, dtype=torch.float32 if key == "pixel_values" else torch.long)[None]
        for key, value in sample.items()
    }


@torch.no_grad()
def _logits(model, inputs):
    dtype = next(model.parameters()).dtype
    return [
        model(**{k: v.to(dtype) if v.is_floating_point() else v for k, v in x.items()}).logits[0].float()
        for x in inputs
    ]


@dataclass(frozen=True)
class LogitDrift:
    """How far the quantized model's logits moved from the original's, over every position of every prompt."""

    num_images: int
    mean_abs: float
    max_abs: float
    reference_std: float  # of the original logits: the scale the drift compares with
    top1_agreement: float  # fraction of positions whose arg-max token is unchanged

    def describe(self):
        return (
            f"mean |Δlogit| {self.mean_abs:.4g}, max |Δlogit| {self.max_abs:.4g} (the original logits' standard "
            f"deviation is {self.reference_std:.4g}); the most likely next token is unchanged at "
            f"{100 * self.top1_agreement:.1f}% of positions"
        )


def logit_drift(reference, quantized):
    ref, new = torch.cat(reference), torch.cat(quantized)
    diff = (new - ref).abs()
    return LogitDrift(
        num_images=len(reference),
        mean_abs=diff.mean().item(),
        max_abs=diff.max().item(),
        reference_std=ref.std().item(),
        top1_agreement=(new.argmax(-1) == ref.argmax(-1)).float().mean().item(),
    )


def quantization_section(scheme, num_samples, drift, images):
    names = ", ".join(Path(p).name for p in images)
    calibration = (
        f"GPTQ was calibrated on {num_samples} photos ({names}), each with the official prompt asking "
        f'"{CAPTION_QUESTION}".'
        if SCHEMES[scheme].calibrated
        else "The scheme needs no calibration data."
    )
    return f"""
## Quantization

This folder was quantized with honeybee-hf's `honeybee-quantize --scheme {scheme}` (llm-compressor `oneshot`):
{SCHEMES[scheme].description}. Only the language model's Linear layers are quantized; the vision tower, the
projector and the LM head keep the original dtype. {calibration}

Measured logit drift against the original weights on the calibration photos ({names}; prompt "{CAPTION_QUESTION}"):
{drift.describe()}. Benchmark numbers above, if any, are those of the original weights.

Load it with transformers (`pip install compressed-tensors`, `trust_remote_code=True`) or serve it with vLLM
(`vllm serve FOLDER --trust-remote-code --model-impl transformers`).
"""


def _model_card(src, config):
    card = Path(src) / "README.md"
    return card.read_text() if card.is_file() else render_model_card(config)


def quantize(src, out, scheme, images=None, force=False, log=print):
    """Quantize the Hub folder `src` into the Hub folder `out` with `scheme` (a key of SCHEMES); returns the
    LogitDrift measured on the calibration photos (`images`, default: the package's example photos)."""
    from llmcompressor import oneshot

    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {sorted(SCHEMES)}")
    images = [Path(p) for p in (images or CALIBRATION_IMAGES)]
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"calibration images not found: {missing[:3]}")
    src = Path(src)
    processor = HoneybeeProcessor.from_pretrained(src)
    model = HoneybeeForConditionalGeneration.from_pretrained(src, dtype="auto").eval()
    inputs = calibration_inputs(processor, images)
    log(f"measuring the original model on {len(images)} calibration photos")
    reference = _logits(model, inputs)
    calibration = {}
    if SCHEMES[scheme].calibrated:
        calibration = dict(
            dataset=_calibration_dataset(inputs),
            num_calibration_samples=len(inputs),
            max_seq_length=max(x["input_ids"].shape[1] for x in inputs),
            data_collator=_collate_one,
            sequential_targets=[decoder_layer_class(model)],
        )
    log(f"quantizing with {scheme}")
    # trust_remote_code_model: oneshot re-reads SRC's config.json (to refuse an already quantized model) by AutoConfig.
    oneshot(model=model, processor=processor, recipe=build_recipe(scheme), trust_remote_code_model=True, **calibration)
    with staging_folder(out, force) as staging:
        model.save_pretrained(staging, save_compressed=True)
        del model
        quantized = HoneybeeForConditionalGeneration.from_pretrained(staging).eval()
        drift = logit_drift(reference, _logits(quantized, inputs))
        if not math.isfinite(drift.max_abs):
            raise ValueError(f"the {scheme} model's logits are not finite on the calibration photos; {out} not written")
        log(f"logit drift: {drift.describe()}")
        card = _model_card(src, quantized.config) + quantization_section(scheme, len(inputs), drift, images)
        write_support_files(quantized.config, processor, staging, card)
    return drift


def build_parser():
    parser = argparse.ArgumentParser(
        prog="honeybee-quantize",
        description="Quantize a Honeybee Hub folder with llm-compressor (language model only; the vision tower, "
        "projector and LM head keep their dtype) into a Hub folder that transformers and vLLM load.",
        epilog="schemes: " + "; ".join(f"{name}: {s.description}" for name, s in SCHEMES.items()),
    )
    parser.add_argument("src", type=Path, help="a Honeybee Hub folder (honeybee-convert's output)")
    parser.add_argument("out", type=Path, help="the quantized Hub folder to write (must not exist, unless --force)")
    parser.add_argument("--scheme", required=True, choices=sorted(SCHEMES))
    parser.add_argument(
        "--images",
        type=Path,
        nargs="+",
        help="calibration photos (GPTQ schemes) and logit-drift check (all schemes); default: the package's "
        f"{len(CALIBRATION_IMAGES)} example photos",
    )
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists (once the new one is complete)")
    add_debug_flag(parser)
    return parser


@console_script("honeybee-quantize")
def main(argv):
    args = build_parser().parse_args(argv)
    try:
        import llmcompressor  # noqa: F401
    except ImportError:
        raise CommandError(
            "llm-compressor is not installed; create its environment with `bash scripts/setup_envs.sh llmc` "
            "(llm-compressor 0.14 needs transformers <=5.17)"
        ) from None
    if not (args.src / "config.json").is_file():
        raise CommandError(f"{args.src} is not a Hub folder (no config.json); pass the folder honeybee-convert wrote")
    for image in args.images or ():
        if not image.is_file():
            raise CommandError(f"--images {image}: no such file; pass photos (JPEG, PNG) to calibrate on")
    drift = quantize(args.src, args.out, args.scheme, args.images, args.force)
    print(f"wrote {args.out}: {drift.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
