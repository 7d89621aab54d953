"""The model card (`README.md`) of a Honeybee Hub repo: what the checkpoint is, how to run it on transformers 4.57
and 5.x, the official benchmark numbers of the released checkpoint it was converted from, license and citation.
"""

import re

# Published results of the six fine-tuned checkpoints (official README / paper; not re-measured here).
BENCHMARKS = ("MMB", "MME", "SEED-I", "LLaVA-w", "ScienceQA", "MM-Vet", "MMMU", "POPE")
PUBLISHED_RESULTS = {
    "C-7B-M144": (70.1, 1891.3, 64.5, 67.1, None, 34.9, 35.3, 83.2),
    "D-7B-M144": (70.8, 1835.5, 63.8, 66.3, None, None, None, None),
    "C-13B-M256": (73.2, 1944.0, 68.2, 75.7, None, 35.6, 36.4, 84.3),
    "D-13B-M256": (73.5, 1950.0, 66.6, 72.9, None, None, None, None),
    "C-7B-M256": (71.0, 1951.3, 65.5, 70.6, 93.2, 38.1, 37.3, 85.5),
    "C-13B-M576": (73.6, 1976.5, 68.6, 77.5, 94.4, 42.2, 36.2, 85.6),
}
LLM_SIZES = {4096: "7B", 5120: "13B"}  # Vicuna-v1.5 hidden sizes

CITATION = """@inproceedings{cha2023honeybee,
  title={Honeybee: Locality-enhanced Projector for Multimodal LLM},
  author={Junbum Cha and Wooyoung Kang and Jonghwan Mun and Byungseok Roh},
  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year={2024}
}"""


def variant_of(config):
    """The "C-7B-M144"-style name of a config shaped like a released checkpoint (CLIP ViT-L/14, Vicuna-7B/13B), or
    None."""
    size = LLM_SIZES.get(config.text_config.hidden_size)
    vc = config.vision_config
    if size is None or (vc.hidden_size, vc.num_hidden_layers, vc.patch_size) != (1024, 24, 14):
        return None
    kind = "C" if config.projector_config.projector_type == "c-abs" else "D"
    return f"{kind}-{size}-M{config.projector_config.num_query_tokens}"


def is_pretraining_name(name):
    """Official archives of the stage-1 (pre-training) checkpoints are named `*_PT`."""
    return bool(name) and re.search(r"[_-]PT$", name, flags=re.IGNORECASE) is not None


def _results_table(variant):
    values = PUBLISHED_RESULTS[variant]
    cells = ["–" if v is None else f"{v:.1f}" for v in values]
    return "\n".join(
        [
            "| " + " | ".join(BENCHMARKS) + " |",
            "|" + "---|" * len(BENCHMARKS),
            "| " + " | ".join(cells) + " |",
        ]
    )


def _describe(config):
    vc, pc, tc = config.vision_config, config.projector_config, config.text_config
    grid = vc.image_size // vc.patch_size
    side = int(pc.num_query_tokens**0.5)
    projector = (
        f"C-Abstractor (RegNet stages of depth {pc.depth}, width {pc.hidden_size})"
        if pc.projector_type == "c-abs"
        else f"D-Abstractor ({pc.decoder_layers} deformable-attention layers, width {pc.d_model})"
    )
    return (
        f"- vision: CLIP ViT ({vc.num_hidden_layers} layers, width {vc.hidden_size}, patch {vc.patch_size}) at "
        f"{vc.image_size}×{vc.image_size} px, i.e. {grid}×{grid} = {grid * grid} patch tokens\n"
        f"- projector: {projector} → {pc.num_query_tokens} visual tokens per image ({side}×{side})"
        + (f" + {pc.num_eos_tokens} learned eos tokens" if pc.num_eos_tokens else "")
        + "\n"
        f"- language model: Llama ({tc.num_hidden_layers} layers, width {tc.hidden_size}); the vocabulary has one "
        f"token more than the original, `<image>` = id {config.image_token_id}"
    )


def render_model_card(config, name=None, source=None, dtype=None, fine_tuned=False):
    """Markdown model card for a Hub folder of `config`.

    `name`: the official checkpoint's name (e.g. "7B-C-Abs-M144", "_PT" for pre-training checkpoints);
    `source`: what it was converted from; `fine_tuned`: a model trained with this package (no official numbers).
    """
    variant = variant_of(config)
    pretraining = is_pretraining_name(name)
    title = f"Honeybee-{variant}" if variant else f"Honeybee ({name})" if name else "Honeybee"
    if pretraining:
        title += " (pre-training stage)"
    if fine_tuned:
        title += " (fine-tuned)"
    dtype_line = f"Weights are stored in {dtype}. " if dtype else ""
    origin = (
        f"Converted from the official checkpoint `{source}` with honeybee-hf's `honeybee-convert`: the weights are "
        "the official ones under the official names, plus one `<image>` row in the token embedding (the mean of the "
        "other rows; always overwritten by the image features) and in the LM head (zeros)."
        if source and not fine_tuned
        else "Trained or fine-tuned with honeybee-hf and exported with `save_hub_folder`."
    )
    if fine_tuned:
        results = "This model was trained with honeybee-hf; no official benchmark numbers apply to it."
    elif pretraining:
        results = (
            "This is the stage-1 (pre-training) checkpoint: only the projector was trained and the LLM is stock "
            "Vicuna. The official benchmark numbers are for the fine-tuned checkpoint, not this one."
        )
    elif variant in PUBLISHED_RESULTS:
        results = (
            "Published by the authors (official README, CVPR 2024 paper), not re-measured after conversion. "
            "Evaluation used greedy decoding.\n\n" + _results_table(variant)
        )
    else:
        results = "There are no official benchmark numbers for this configuration."
    return f"""---
license: cc-by-nc-4.0
library_name: transformers
pipeline_tag: image-text-to-text
tags:
- honeybee
- multimodal
- vision-language
- custom_code
---

# {title}

Honeybee is a multimodal LLM from Kakao Brain ("Honeybee: Locality-enhanced Projector for Multimodal LLM",
Cha et al., CVPR 2024, [arXiv:2312.06742](https://arxiv.org/abs/2312.06742),
[official code](https://github.com/kakaobrain/honeybee)): a CLIP vision encoder, a locality-enhanced projector
(C-Abstractor or D-Abstractor) and a Vicuna language model.

{_describe(config)}

{origin} {dtype_line}The modeling code ships with the repo (`trust_remote_code=True`) and runs on transformers
4.57 and 5.x, on CPU and GPU.

## Usage

```python
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

repo = "REPO_ID"  # this repository, or a local folder
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True, dtype=torch.bfloat16)

image = Image.open("photo.jpg")
inputs = processor(images=image, text="What is in the image?", return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=64)  # greedy, as the official evaluation
print(processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])
```

- transformers 4.57: `AutoModelForVision2Seq` works too; pass `dtype=` (or `torch_dtype=`) explicitly, the
  default is float32.
- transformers 5.x: `AutoModelForImageTextToText` only (`AutoModelForVision2Seq` no longer exists); the default
  dtype is the checkpoint's.
- A bare question is wrapped in the official prompt,
  `"<system>\\nHuman: <image>\\nHuman: {{question}}\\nAI: "`; full prompts in that format and
  `processor.apply_chat_template(messages)` work too.
- Captioning pipeline on both versions: `pipeline("image-to-text", model=repo, trust_remote_code=True)(image)`.

## Results

{results}

## License

The code (`*.py` in this repo) is licensed under Apache-2.0. The weights are licensed under
[CC-BY-NC-4.0](https://creativecommons.org/licenses/by-nc/4.0/) (non-commercial use), as the official release;
the language model derives from Vicuna v1.5 / Llama 2, whose license terms apply too.

## Citation

```bibtex
{CITATION}
```
"""


__all__ = ["PUBLISHED_RESULTS", "render_model_card", "variant_of"]
