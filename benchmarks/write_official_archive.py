"""Write a release-shaped official Honeybee checkpoint with random weights, as Kakao Brain's archives hold it.

    python benchmarks/write_official_archive.py 7B-C-Abs-M144 --out /big/folder            # folder and .tar.gz
    python benchmarks/write_official_archive.py 13B-C-Abs-M256 --out /big/folder --archive-only
    python benchmarks/write_official_archive.py 7B-C-Abs-M144 --out /big --archive-only --text-layers 4 \
        --max-shard-gb 2      # 7B-C-Abs-M144-4L.tar.gz: 2.8 GB in 2 shards, the release's widths and layout

What is written is what the release holds (shared/research/honeybee_official.md, "Archive layout"): `<name>/last/`
with the Dec-2023 `config.json` (`model_type: "mllm"`), `generation_config.json`, and the weights as
`PreTrainedModel.save_pretrained(safe_serialization=False)` saved them after `model.to(torch.bfloat16)`: bf16
`pytorch_model-0000k-of-0000n.bin` shards of at most 10 GB, one storage per tensor, official key names (CLIP's
unused `post_layernorm` included, the 32000-row vocabulary without `<image>`), and `pytorch_model.bin.index.json`;
as a folder `OUT/<name>/last/` and/or as `OUT/<name>.tar.gz` (gzip level 0 by default, see --compresslevel).
Members are in the order config, generation config, shards, index (the index last: a reader of the stream must not
rely on it coming first).

It never holds a model: each tensor is drawn (seeded by the tensor's name, so the weights are the same for the
folder, the archive and every run) into a file-backed buffer, one 10 GB shard at a time; free disk is checked
before anything is written. `--seed` changes every tensor.
"""

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from honeybee_hf.configuration_honeybee import HoneybeeConfig  # noqa: E402
from utils.official_format import MAX_SHARD_BYTES, official_shapes, shard_plan, write_official_checkpoint  # noqa: E402

VICUNA_13B = dict(
    hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40
)
# The released checkpoints (shared/research/honeybee_official.md §4.1): LLM, projector, visual tokens; CLIP ViT-L/14
# at 224 px for these four.
RELEASES = {
    "7B-C-Abs-M144": (None, "c-abs", 144),
    "7B-D-Abs-M144": (None, "d-abs", 144),
    "13B-C-Abs-M256": (VICUNA_13B, "c-abs", 256),
    "13B-D-Abs-M256": (VICUNA_13B, "d-abs", 256),
}
OFFICIAL_VOCAB = 32000  # Vicuna v1.5; ours adds <image>


def release_config(name, text_layers=None):
    """Our HoneybeeConfig shaped as the release `name` (the defaults are Honeybee-C-7B-M144's); `text_layers`: that
    many LLM layers instead of the release's (every width unchanged)."""
    text, projector_type, queries = RELEASES[name]
    defaults = HoneybeeConfig()
    layers = {} if text_layers is None else {"num_hidden_layers": text_layers}
    return HoneybeeConfig(
        vision_config=defaults.vision_config.to_dict(),
        projector_config=dict(projector_type=projector_type, num_query_tokens=queries),
        text_config=defaults.text_config.to_dict() | (text or {}) | layers,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(RELEASES))
    parser.add_argument("--out", type=Path, required=True, help="folder to write <name>/ and/or <name>.tar.gz into")
    parser.add_argument(
        "--archive-only", action="store_true", help="write only the .tar.gz (shards pass through a temporary file)"
    )
    parser.add_argument("--folder-only", action="store_true", help="write only the folder <name>/last/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--text-layers", type=int, help="a scaled archive for quick measurements: this many LLM layers (release widths)"
    )
    parser.add_argument(
        "--max-shard-gb", type=float, default=MAX_SHARD_BYTES / 1e9, help="shard limit in GB (default: the release's)"
    )
    parser.add_argument(
        "--compresslevel",
        type=int,
        default=0,
        help="gzip level (default 0: stored blocks, written at disk speed; 1 compresses random bf16 to ~80%% at "
        "~15-30 MB/s on 2 cores)",
    )
    args = parser.parse_args()

    config = release_config(args.name, args.text_layers)
    name = args.name if args.text_layers is None else f"{args.name}-{args.text_layers}L"  # never taken for a release
    max_shard_bytes = int(args.max_shard_gb * 1e9)
    shapes = official_shapes(config, OFFICIAL_VOCAB)
    shard_bytes = [sum(2 * math.prod(s) for _, s in shard) for shard in shard_plan(shapes, max_shard_bytes)]
    total, largest = sum(shard_bytes), max(shard_bytes)
    folder, archive = not args.archive_only, not args.folder_only
    # One shard's scratch buffers, the folder and/or the archive (~ the weight bytes each: random bf16 barely
    # compresses), and a temporary .bin when only the archive is written.
    needed = largest + total * (folder + archive) + (0 if folder else largest)
    args.out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.out).free
    if free < needed * 1.02:
        sys.exit(f"write_official_archive: {args.out} has {free / 1e9:.1f} GB free; {name} needs {needed / 1e9:.1f} GB")
    for path in (args.out / name, args.out / f"{name}.tar.gz"):
        if path.exists():
            sys.exit(f"write_official_archive: {path} exists; delete it first")
    parameters = sum(math.prod(s) for _, s in shapes)
    print(f"{name}: {parameters / 1e9:.2f} B parameters, {total / 1e9:.2f} GB bf16 in {len(shard_bytes)} shards")
    started = time.perf_counter()
    written = write_official_checkpoint(
        config,
        name,
        args.out,
        OFFICIAL_VOCAB,
        folder=folder,
        archive=archive,
        seed=args.seed,
        max_shard_bytes=max_shard_bytes,
        compresslevel=args.compresslevel,
        log=lambda line: print(f"  {line} ({time.perf_counter() - started:.0f} s)", flush=True),
    )
    for path in written:
        print(f"wrote {path}")
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
