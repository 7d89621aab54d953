"""Honeybee end to end, offline, in about a minute on a laptop CPU: build a tiny Honeybee, teach it to caption the
photos in assets/images with `honeybee-finetune`, save it as a Hub folder, load it back through `trust_remote_code`
and caption the photos with `pipeline("image-to-text")`, next to the captions it was taught.

    python examples/caption_demo.py [--out DIR] [--projector c-abs|d-abs] [--steps N] [--random-weights]
    python examples/caption_demo.py --model CONVERTED_FOLDER_OR_REPO
    python examples/caption_demo.py --web    # then opens the web demo (honeybee-demo) on the model

No real checkpoint can be downloaded here, so the model is tiny (a 32-pixel CLIP, a 2-layer Llama with a toy
tokenizer) and learns the five captions by heart; `--random-weights` skips the training and shows what an
untrained model says. The same two calls caption with a real Honeybee once it is converted (see the README).
"""

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import transformers

from honeybee_hf.pipeline_honeybee import CAPTION_QUESTION
from honeybee_hf.testing_utils import ASSETS, save_tiny_hub_folder, shrink_photos
from honeybee_hf.train import finetune

PHOTOS = ASSETS / "images"
CAPTIONS = json.loads((PHOTOS / "captions.json").read_text())  # photo file name -> caption


def caption_samples():
    """One training sample per photo, asking the captioning pipeline's question (LLaVA conversation format)."""
    return [
        {
            "image": name,
            "conversations": [
                {"from": "human", "value": f"<image>\n{CAPTION_QUESTION}"},
                {"from": "gpt", "value": caption},
            ],
        }
        for name, caption in CAPTIONS.items()
    ]


def teach_captions(base, photos, work, steps):
    """Stage `full` of `honeybee-finetune` on the captions; returns the trained Hub folder."""
    data = work / "captions.jsonl"
    data.write_text("".join(json.dumps(sample) + "\n" for sample in caption_samples()))
    # Every sample in every step, a learning rate a tiny model can take: the point is to memorise.
    finetune.run([
        "--model", str(base), "--data", str(data), "--image_root", str(photos), "--output_dir", str(work / "run"),
        "--stage", "full", "--max_steps", str(steps), "--per_device_train_batch_size", str(len(CAPTIONS)),
        "--learning_rate", "1e-2", "--warmup_steps", "0", "--logging_steps", str(max(1, steps // 4)),
        "--save_strategy", "no", "--seed", "0", "--report_to", "none", "--disable_tqdm", "true",
    ])  # fmt: skip
    return work / "run" / "model"


def caption(folder, photos, taught):
    """Caption each photo through `pipeline("image-to-text")` from the Hub folder; returns how many match `taught`."""
    print(f"  transformers {transformers.__version__}: pipeline('image-to-text', model=..., trust_remote_code=True)")
    captioner = transformers.pipeline("image-to-text", model=str(folder), trust_remote_code=True)
    learned = 0
    for name, expected in taught.items():
        said = captioner(str(photos / name), max_new_tokens=32)[0]["generated_text"].strip()
        learned += said == expected
        print(f"  {name:>15}  {'ok' if said == expected else '--'}  {said!r:32}  (taught: {expected!r})")
    return learned


def serve(folder):
    """The web demo on `folder`, on 127.0.0.1 until interrupted."""
    from honeybee_hf.demo import app

    print(f"serving {folder} in the web demo (Ctrl-C ends it)")
    app.main(["--model", str(folder)])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="where to write the Hub folders (default: a temporary folder)")
    parser.add_argument("--projector", choices=["c-abs", "d-abs"], default="c-abs")
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps (default: 200)")
    parser.add_argument("--random-weights", action="store_true", help="caption with the untrained tiny model")
    parser.add_argument(
        "--model", help="caption the photos with this Honeybee (a converted folder or Hub repo) instead"
    )
    parser.add_argument("--web", action="store_true", help="then serve the model in the web demo (needs Gradio)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.model:
        return serve(args.model) if args.web else caption(args.model, PHOTOS, CAPTIONS)
    work = args.out or Path(tempfile.mkdtemp(prefix="honeybee-demo-"))
    work.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    # The tiny model sees 32x32 pixels: 64-pixel copies of the photos spare decoding the full JPEGs at every step.
    photos = shrink_photos(CAPTIONS, work / "photos")
    folder = work / f"honeybee-tiny-{args.projector}"
    save_tiny_hub_folder(folder, args.projector, force=True)
    print(f"[1/3] a tiny random Honeybee ({args.projector}) saved as a Hub folder: {folder}")
    if not args.random_weights:
        print(f"[2/3] teaching it the {len(CAPTIONS)} captions: honeybee-finetune --stage full, {args.steps} steps")
        folder = teach_captions(folder, photos, work, args.steps)
    print("[3/3] loading it back as a Hub user would, and captioning the photos")
    learned = caption(folder, photos, CAPTIONS)
    print(f"{learned}/{len(CAPTIONS)} captions as taught, {time.perf_counter() - start:.0f} s in all.")
    if args.web:
        return serve(folder)
    print("The same with a real Honeybee (README, 'Convert and publish'):")
    print("  honeybee-convert 7B-C-Abs-M144.tar.gz honeybee-c-7b --tokenizer vicuna-7b-v1.5/tokenizer.model")
    print("  bash scripts/demo.sh --model honeybee-c-7b")
    return learned


if __name__ == "__main__":
    main()
