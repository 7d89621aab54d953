"""Official Honeybee checkpoint files for a model shaped as one of ours: the `config.json` the official code writes
(HEAD or Dec-2023 format), and whole release-shaped checkpoints with random weights (folder and/or `.tar.gz`).
Used by the tests and by benchmarks/write_official_archive.py."""

import copy
import hashlib
import json
import math
import shutil
import tarfile
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer

from honeybee_hf.convert.official import UNUSED_VISION_PREFIX, official_key
from honeybee_hf.convert.tokenizer import load_backend
from honeybee_hf.modeling_honeybee import HoneybeeForConditionalGeneration
from honeybee_hf.testing_utils import TOY_SPM

from . import OFFICIAL_CKPT

# A config.json written by the official code (HEAD format), recorded with the official tiny checkpoint.
TEMPLATE = json.loads((OFFICIAL_CKPT / "tiny_cabs_m16.expected.json").read_text())["saved_config_json"]

# What the official code's DeformableDetrConfig(**yaml).to_dict() adds to a D-Abstractor's projector_config
# (transformers 4.38.1; the values do not matter to the D-Abstractor).
DDETR_EXTRAS = {
    "auxiliary_loss": False,
    "backbone": "resnet50",
    "backbone_config": None,
    "backbone_kwargs": None,
    "bbox_cost": 5,
    "bbox_loss_coefficient": 5,
    "class_cost": 1,
    "dice_loss_coefficient": 1,
    "dilation": False,
    "disable_custom_kernels": False,
    "encoder_attention_heads": 8,
    "encoder_ffn_dim": 1024,
    "encoder_layerdrop": 0.0,
    "encoder_layers": 6,
    "encoder_n_points": 4,
    "eos_coefficient": 0.1,
    "focal_alpha": 0.25,
    "giou_cost": 2,
    "giou_loss_coefficient": 2,
    "init_std": 0.02,
    "init_xavier_std": 1.0,
    "is_encoder_decoder": True,
    "learnable_mRP": True,
    "manual_init_refPoints": True,
    "mask_loss_coefficient": 1,
    "max_position_embeddings": 1024,
    "num_channels": 3,
    "position_embedding_type": "sine",
    "two_stage": False,
    "two_stage_num_proposals": 300,
    "use_pretrained_backbone": False,
    "use_timm_backbone": True,
    "with_box_refine": False,
    "activation_function": "relu",
    "dropout": 0.1,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
}
C_ABS_KEYS = ("depth", "hidden_size", "mlp_depth", "prenorm")


def official_config(config, fmt="head", eos_in_config=True, vocab=None):
    """The config.json the official code (HEAD, or Dec-2023 "mllm") writes for a model shaped as our `config`;
    `vocab`: the official vocabulary (default: ours less `<image>`)."""
    vocab = config.text_config.vocab_size - 1 if vocab is None else vocab
    template = copy.deepcopy(TEMPLATE)
    vc, pc, tc = config.vision_config, config.projector_config, config.text_config
    template["vision_config"].update(
        hidden_size=vc.hidden_size,
        intermediate_size=vc.intermediate_size,
        num_hidden_layers=vc.num_hidden_layers,
        num_attention_heads=vc.num_attention_heads,
        image_size=vc.image_size,
        patch_size=vc.patch_size,
        layer_norm_eps=vc.layer_norm_eps,
        hidden_act=vc.hidden_act,
    )
    template["text_config"].update(
        vocab_size=vocab,
        hidden_size=tc.hidden_size,
        intermediate_size=tc.intermediate_size,
        num_hidden_layers=tc.num_hidden_layers,
        num_attention_heads=tc.num_attention_heads,
        num_key_value_heads=tc.num_key_value_heads,
        max_position_embeddings=tc.max_position_embeddings,
        rms_norm_eps=tc.rms_norm_eps,
        hidden_act=tc.hidden_act,
    )
    projector = {k: v for k, v in template["projector_config"].items() if k not in C_ABS_KEYS}
    projector.update(
        projector_type=pc.projector_type,
        num_query_tokens=pc.num_query_tokens,
        num_eos_tokens=pc.num_eos_tokens,
        pos_emb=pc.pos_emb,
        encoder_hidden_size=vc.hidden_size,
        output_hidden_size=tc.hidden_size,
    )
    if pc.projector_type == "c-abs":
        projector.update({k: getattr(pc, k) for k in C_ABS_KEYS})
    else:
        projector.update(DDETR_EXTRAS)
        projector.update(
            d_model=pc.d_model,
            decoder_layers=pc.decoder_layers,
            decoder_attention_heads=pc.decoder_attention_heads,
            decoder_n_points=pc.decoder_n_points,
            decoder_ffn_dim=pc.decoder_ffn_dim,
            num_feature_levels=1,
            num_queries=pc.num_query_tokens,
            pooled_v_target=pc.pooled_v_target,
        )
    if not eos_in_config:
        del projector["num_eos_tokens"]
    if fmt == "head":
        template["projector_config"] = projector
        return template
    del template["projector_config"]
    for key in ("image_mean", "image_std"):
        del template["vision_config"][key]
    template["vision_config"]["model_type"] = "clip_vision_model"
    projector.update(use_cls=True, num_queries=projector.pop("num_query_tokens"), model_type="mllm_visual_projector")
    template["lm_config"]["delta_model_name_or_path"] = None
    template.update(
        model_type="mllm",
        visual_projector_config=projector,
        num_query_tokens=pc.num_query_tokens,
        use_decoder_only_language_model=True,
        initializer_range=0.02,
        initializer_factor=1.0,
        tie_word_embeddings=False,
        is_encoder_decoder=False,
        _commit_hash=None,
        transformers_version="4.30.2",
    )
    return template


# ---------------------------------------------------------------------------------------------------------
# Release-shaped weight files
# ---------------------------------------------------------------------------------------------------------

MAX_SHARD_BYTES = 10 * 10**9  # save_pretrained's default max_shard_size="10GB" in transformers 4.30-4.38


def official_shapes(config, vocab):
    """[(official key, shape)] of a checkpoint shaped as our `config`, in the order the official model registers its
    modules (vision, abstractor, LM): CLIP's unused `post_layernorm` included, `vocab` rows (no `<image>`)."""
    with torch.device("meta"):
        model = HoneybeeForConditionalGeneration(config)
    shapes = {official_key(k): tuple(v.shape) for k, v in model.state_dict().items()}
    width = config.vision_config.hidden_size
    for suffix in ("weight", "bias"):  # CLIP's post_layernorm: in every official checkpoint, never read
        shapes["vision_model." + UNUSED_VISION_PREFIX + suffix] = (width,)
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        shapes[key] = (vocab,) + shapes[key][1:]
    order = ("vision_model.", "abstractor.", "language_model.")
    return sorted(shapes.items(), key=lambda item: next(i for i, p in enumerate(order) if item[0].startswith(p)))


def shard_plan(shapes, max_shard_bytes):
    """[(key, shape)] per shard as save_pretrained's shard_checkpoint splits bf16 weights: a new shard when the next
    tensor would pass the limit."""
    shards, size = [[]], 0
    for key, shape in shapes:
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((key, shape))
        size += nbytes
    return shards


def draw(key, shape, seed, out=None):
    """The random bf16 tensor of `key` (seeded by `seed` and the name: the same in every run), into `out` if given:
    norm scales near 1, the rest N(0, 0.02) as the models' initialisation."""
    generator = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8]))
    tensor = torch.empty(shape, dtype=torch.bfloat16) if out is None else out.view(shape)
    tensor.normal_(0.0, 0.02, generator=generator)
    if key.endswith(".weight") and len(shape) == 1:  # LayerNorm / RMSNorm scales
        tensor.add_(1.0)
    return tensor


def _write_shard(entries, path, scratch, seed):
    """torch.save one shard, its tensors drawn into file-backed buffers under `scratch` (no anonymous memory), one
    storage per tensor as save_pretrained writes them."""
    state = {}
    for i, (key, shape) in enumerate(entries):
        buffer = torch.from_file(str(scratch / f"{i}.raw"), shared=True, size=math.prod(shape), dtype=torch.bfloat16)
        state[key] = draw(key, shape, seed, buffer)
    torch.save(state, path)
    del state
    for raw in scratch.glob("*.raw"):
        raw.unlink()


def _generation_config():
    # What transformers 4.30's save_pretrained writes next to a LlamaForCausalLM-based model's config.
    return {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def write_official_checkpoint(
    config,
    name,
    out,
    vocab,
    folder=True,
    archive=True,
    seed=0,
    max_shard_bytes=MAX_SHARD_BYTES,
    compresslevel=0,
    log=None,
):
    """Write the official checkpoint `name` shaped as our `config` with random weights (`draw`): `out/<name>/last/`
    (`folder`) and/or `out/<name>.tar.gz` (`archive`), as the release: Dec-2023 config.json, generation config,
    bf16 `pytorch_model-0000k-of-0000n.bin` shards and their index, in that order. `compresslevel` 0 (stored
    deflate blocks: a valid .tar.gz written at disk speed) by default: level 1 compresses random bf16 to ~80% at
    ~15-30 MB/s on a 2-core machine, too slow for 14-26 GB. One shard at a time exists outside `out`'s final files;
    everything is written under a temporary folder in `out` and moved at the end. Returns the paths written."""
    out = Path(out)
    shapes = official_shapes(config, vocab)
    shards = shard_plan(shapes, max_shard_bytes)
    total = sum(2 * math.prod(shape) for _, shape in shapes)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.writing-", dir=out))
    scratch, files = work / "scratch", work / name / "last"
    scratch.mkdir()
    files.mkdir(parents=True)
    tar = None
    try:
        if archive:
            tar = tarfile.open(work / "archive.tar.gz", "w:gz", compresslevel=compresslevel, format=tarfile.GNU_FORMAT)
            for member in (name, f"{name}/last"):
                tar.add(work / member, arcname=member, recursive=False)

        def emit(path):
            if tar is not None:
                tar.add(path, arcname=f"{name}/last/{path.name}")
            if not folder:
                path.unlink()

        (files / "config.json").write_text(json.dumps(official_config(config, "dec2023", vocab=vocab), indent=2) + "\n")
        emit(files / "config.json")
        (files / "generation_config.json").write_text(json.dumps(_generation_config(), indent=2) + "\n")
        emit(files / "generation_config.json")
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
            _write_shard(shard, files / file, scratch, seed)
            weight_map.update(dict.fromkeys((k for k, _ in shard), file))
            emit(files / file)
            if log:
                log(f"{file} written")
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (files / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2) + "\n")
        emit(files / "pytorch_model.bin.index.json")
        written = []
        if tar is not None:
            tar.close()
            (work / "archive.tar.gz").rename(out / f"{name}.tar.gz")
            written.append(out / f"{name}.tar.gz")
        if folder:
            (work / name).rename(out / name)
            written.append(out / name / "last")
        return written
    finally:
        if tar is not None:
            tar.close()
        shutil.rmtree(work, ignore_errors=True)


def stand_in_tokenizer(folder, vocab):
    """A folder with a `tokenizer.json` of `vocab` tokens, standing in for Vicuna's 32000-token sentencepiece model
    (not downloadable here): the toy Llama-style tokenizer (same specials: <unk> 0, <s> 1, </s> 2), its vocabulary
    padded with `<extra_i>` pieces that no text produces."""
    backend = load_backend(TOY_SPM)
    data = json.loads(backend.to_str())
    pieces = data["model"]["vocab"]
    pieces.update({f"<extra_{i}>": i for i in range(len(pieces), vocab)})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    Tokenizer.from_str(json.dumps(data)).save(str(folder / "tokenizer.json"))
    return folder
