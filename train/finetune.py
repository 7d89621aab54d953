"""`honeybee-finetune`: fine-tune a converted Honeybee with transformers' `Trainer`, the way the paper trained it.

    honeybee-finetune --model ./honeybee-c7b --data train.jsonl --output_dir runs/lora            # stage 2, LoRA
    honeybee-finetune --model ./honeybee-c7b --data train.jsonl --output_dir runs/pt --stage projector
    torchrun --nproc_per_node 8 -m honeybee_hf.train.finetune --model ... --bf16 --gradient_checkpointing
    accelerate launch --config_file "$(honeybee-finetune config fsdp)" -m honeybee_hf.train.finetune ...
    honeybee-finetune merge --model ./honeybee-c7b --adapter runs/lora/adapter --output ./honeybee-c7b-mine

Stages: `projector` trains the abstractor only (paper stage 1); `lora` trains LoRA adapters on the language
model's attention and MLP projections plus a full copy of the abstractor (paper stage 2, with LoRA instead of full
LLM training); `full` trains the language model and the abstractor. The CLIP tower is always frozen.

Every `TrainingArguments` option is a flag too (`--learning_rate`, `--num_train_epochs`, `--save_steps`,
`--bf16`, `--gradient_checkpointing`, `--fsdp`, `--deepspeed`, ...); `--deepspeed zero2` / `zero3` names a shipped
DeepSpeed json, and `honeybee-finetune config {ddp,fsdp,zero2,zero3,ds_zero2,ds_zero3}` prints a shipped config's
path. The learning rate defaults per stage (projector 1e-3, lora 2e-4, full 2e-5). A run started again with the
same `--output_dir` resumes from its last complete checkpoint (`--resume never` starts afresh).

Outputs in `--output_dir`: `adapter/` (stage lora: `adapter_config.json` + `adapter_model.safetensors`, for
`PeftModel.from_pretrained(base, path)`), or `model/` (stages projector and full: a Hub-ready folder), plus
`checkpoint-*/`, `trainer_state.json` and `bad_samples.jsonl` when some samples were skipped.
"""

import dataclasses
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from ..cli import DEBUG_HELP, CommandError, add_debug_flag, check_model_source, console_script
from ..configuration_honeybee import HoneybeeConfig
from ..hub.folder import save_hub_folder
from ..processing_honeybee import SYSTEM_PROMPT
from .data import BadSampleError, HoneybeeCollator, HoneybeeConversationDataset
from .engine import (
    DEEPSPEED,
    check_engine,
    configure_cpu_state,
    has_accelerator,
    keep_fp32_modules_in_fsdp2,
    requested_engine,
)

logger = logging.getLogger("honeybee_hf.train")

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CONFIGS = {
    "ddp": "accelerate_ddp.yaml",
    "fsdp": "accelerate_fsdp.yaml",
    "zero2": "accelerate_zero2.yaml",
    "zero3": "accelerate_zero3.yaml",
    "ds_zero2": "ds_zero2.json",
    "ds_zero3": "ds_zero3.json",
}
# `--deepspeed NAME` shortcuts
DEEPSPEED_CONFIGS = {"ds_zero2": "ds_zero2", "zero2": "ds_zero2", "ds_zero3": "ds_zero3", "zero3": "ds_zero3"}
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
DEFAULT_LEARNING_RATE = {"projector": 1e-3, "lora": 2e-4, "full": 2e-5}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _arg(default=dataclasses.MISSING, help=""):
    return field(default=default, metadata={"help": help})


@dataclass
class FinetuneArguments:
    model: str = _arg(help="A converted Honeybee: a Hub-ready folder (or Hub repo id), loaded with trust_remote_code.")
    data: list[str] = _arg(help="Training data: LLaVA-style conversation JSONL (or JSON array) files.")
    stage: Literal["projector", "lora", "full"] = _arg(
        "lora", "projector: the abstractor (paper stage 1); lora: LoRA on the LLM + abstractor; full: LLM + abstractor."
    )
    image_root: Optional[str] = _arg(None, "Folder that relative image paths start from (default: each data file's).")
    bad_samples: Literal["skip", "error"] = _arg("skip", "Bad samples are reported (file:line), then skipped or fatal.")
    verify_images: bool = _arg(True, "Open every image's header at start-up: broken files show before training.")
    max_length: int = _arg(1024, "Tokens per sample, <s> and image placeholders included (official fine-tuning: 1024).")
    system_prompt: str = _arg(SYSTEM_PROMPT, "Text ahead of the first turn.")
    lora_r: int = _arg(16, "LoRA rank.")
    lora_alpha: int = _arg(32, "LoRA alpha (scale = alpha / r).")
    lora_dropout: float = _arg(0.05, "LoRA dropout.")
    lora_target: str = _arg(
        LORA_TARGETS, "Comma-separated projection names (language model only), or a full regex for target_modules."
    )
    lora_modules_to_save: str = _arg(
        "abstractor", "Modules trained in full and stored in the adapter (comma-separated; 'none': frozen projector)."
    )
    load_in_4bit: bool = _arg(False, "QLoRA: the language model in 4-bit NF4 (bitsandbytes; stage lora).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _arg(
        "auto",
        "Weights' dtype at load. auto: stage lora with --bf16/--fp16 loads the frozen base in that dtype, otherwise "
        "float32 (mixed precision keeps float32 masters).",
    )
    attn_implementation: Optional[str] = _arg(None, "eager, sdpa or flash_attention_2 (default: the model's).")
    resume: str = _arg(
        "auto", "auto: continue from the last complete checkpoint in --output_dir, if any; never; or a checkpoint path."
    )
    merge_to: Optional[str] = _arg(None, "Stage lora: also write base + adapter, merged, as a Hub-ready folder here.")
    allow_engine_fallback: bool = _arg(
        False, "Train even when accelerate set up another engine than the launch asks for (FSDP, DeepSpeed, DDP)."
    )


def config_path(name):
    """Path of a shipped launcher config: ddp, fsdp, zero2, zero3 (accelerate yaml) or ds_zero2, ds_zero3 (DeepSpeed
    json)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; choose from {', '.join(CONFIGS)}")
    return CONFIG_DIR / CONFIGS[name]


def lora_target_regex(spec):
    """`q_proj,v_proj` -> a regex on the language model's modules only (a plain list would also hit CLIP)."""
    if any(c in spec for c in "*\\|()[]^$"):
        return spec
    names = [name.strip() for name in spec.split(",") if name.strip()]
    return r".*language_model.*\.(" + "|".join(map(re.escape, names)) + ")"


def lora_config(args):
    from peft import LoraConfig

    to_save = [m.strip() for m in args.lora_modules_to_save.split(",") if m.strip() and m.strip().lower() != "none"]
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=lora_target_regex(args.lora_target),
        modules_to_save=to_save or None,
        task_type="CAUSAL_LM",
    )


def _load_dtype(args, training_args):
    if args.dtype != "auto":
        return _DTYPES[args.dtype]
    if args.stage == "lora" and training_args.bf16:
        return torch.bfloat16
    if args.stage == "lora" and training_args.fp16:
        return torch.float16
    return torch.float32


def check_qlora(args):
    """QLoRA needs stage lora and bitsandbytes; say which is missing before anything is loaded."""
    if args.stage != "lora":
        raise ValueError("--load_in_4bit (QLoRA) only works with --stage lora: 4-bit weights cannot be trained")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise RuntimeError("--load_in_4bit (QLoRA) needs bitsandbytes: pip install bitsandbytes") from error


def load_model(args, training_args):
    kwargs = {"trust_remote_code": True, "dtype": _load_dtype(args, training_args)}
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    if args.load_in_4bit:
        check_qlora(args)
        from transformers import BitsAndBytesConfig

        # bitsandbytes' CPU backend computes in float32 or bfloat16 (its float16 path is CUDA's)
        compute = torch.bfloat16 if training_args.bf16 else torch.float16 if has_accelerator() else torch.float32
        kwargs["dtype"] = compute
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )  # only the LLM is quantized: the model lists its vision tower and abstractor, lm_head is the default
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0")) if has_accelerator() else "cpu"}
    return AutoModelForImageTextToText.from_pretrained(args.model, **kwargs)


def prepare_model(model, args, training_args=None):
    """Freeze what the stage does not train; wrap in PEFT for stage lora. Returns the model to train."""
    model.requires_grad_(False)
    if args.stage == "projector":
        model.abstractor.requires_grad_(True)
        return model
    if args.stage == "full":
        model.abstractor.requires_grad_(True)
        model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if args.load_in_4bit:
        checkpointing = bool(training_args is not None and _checkpointing_on(training_args))
        model = prepare_model_for_kbit_training(model, checkpointing, {"use_reentrant": False})
    model = get_peft_model(model, lora_config(args))
    for param in model.parameters():  # LoRA weights and the abstractor copy train in float32 (mixed precision)
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def _checkpointing_on(training_args):
    return bool(getattr(training_args, "activation_checkpointing", None) or training_args.gradient_checkpointing)


def _sharded_parameters(training_args):
    """FSDP or ZeRO-3: every rank must run every module in every step."""
    if training_args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return True
    plugin = getattr(training_args, "deepspeed_plugin", None)
    return plugin is not None and getattr(plugin, "zero_stage", 0) == 3


class HoneybeeTrainer(Trainer):
    """`Trainer` that also logs samples/s between logging steps, and trains without a KV cache."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        inputs["use_cache"] = False
        return super().compute_loss(model, inputs, *args, **kwargs)

    def _load_optimizer_and_scheduler(self, checkpoint):
        # transformers 4.57 loads the optimizer state onto `args.device` in distributed runs; under torchrun on CPUs
        # that is "cpu:<rank>", which torch.load cannot restore. 5.x loads onto plain "cpu"; do the same here.
        device = self.args.device
        cached = "_setup_devices" in vars(self.args)
        if checkpoint is None or device.type != "cpu" or device.index is None or not cached:
            return super()._load_optimizer_and_scheduler(checkpoint)
        vars(self.args)["_setup_devices"] = torch.device("cpu")  # the cached value behind `args.device`
        try:
            return super()._load_optimizer_and_scheduler(checkpoint)
        finally:
            vars(self.args)["_setup_devices"] = device

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:
            now, step = time.perf_counter(), self.state.global_step
            last = getattr(self, "_throughput_mark", None)
            if last is not None and step > last[1] and now > last[0]:
                per_step = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
                logs["samples_per_second"] = round((step - last[1]) * per_step / (now - last[0]), 3)
            self._throughput_mark = (now, step)
        super().log(logs, *args, **kwargs)


def _checkpoint_complete(path, world_size):
    if not (path / "trainer_state.json").is_file():
        return False
    if world_size > 1:
        return all((path / f"rng_state_{rank}.pth").is_file() for rank in range(world_size))
    return True


def resolve_checkpoint(resume, output_dir, world_size=1):
    """The checkpoint to resume from: `resume` is auto, never or a path; auto skips half-written checkpoints."""
    if resume in ("never", "no", "none", "false"):
        return None
    if resume not in ("auto", "last"):
        if not os.path.isdir(resume):
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint folder")
        return resume
    candidates = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    for path in sorted(candidates, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        if _checkpoint_complete(path, world_size):
            return str(path)
        logger.warning("%s is incomplete (interrupted while saving?); trying an older checkpoint", path)
    return None


def _rewrite_argv(argv):
    """Version-neutral flags: `--gradient_checkpointing` is a deprecated alias on transformers 5; `--deepspeed
    ds_zero2` names a shipped config."""
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    out = []
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if "activation_checkpointing" in names and flag in ("--gradient_checkpointing", "--gradient-checkpointing"):
            arg = "--activation_checkpointing" + eq + value
        previous = argv[i - 1] if i else ""
        if previous == "--deepspeed" and arg in DEEPSPEED_CONFIGS:
            arg = str(config_path(DEEPSPEED_CONFIGS[arg]))
        elif flag == "--deepspeed" and eq and value in DEEPSPEED_CONFIGS:
            arg = f"--deepspeed={config_path(DEEPSPEED_CONFIGS[value])}"
        out.append(arg)
    return out


def _given(argv, name):
    flags = {f"--{name}", f"--{name.replace('_', '-')}"}
    return any(a.partition("=")[0] in flags for a in argv)


def parse_args(argv):
    argv = _rewrite_argv(list(argv))
    parser = HfArgumentParser(
        (FinetuneArguments, TrainingArguments), prog="honeybee-finetune", epilog=f"--debug, -v (no value): {DEBUG_HELP}"
    )
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    defaults = {
        "remove_unused_columns": False,  # the collator needs the raw sample dicts
        "report_to": "none",
        "logging_steps": 10,
        "logging_first_step": True,
        "save_steps": 500,
        "save_total_limit": 3,
        "label_names": ["labels"],
        "dataloader_pin_memory": torch.cuda.is_available(),
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "activation_checkpointing_kwargs": {"use_reentrant": False},
    }
    engine = requested_engine(argv)
    if configure_cpu_state(engine):
        defaults["accelerator_config"] = {"use_configured_state": True}
    if not has_accelerator() and engine != DEEPSPEED:
        # What happens anyway without a GPU, said explicitly: torchrun on CPUs then runs DDP over gloo (accelerate's
        # MULTI_CPU needs cpu=True), and --bf16 runs with CPU autocast instead of being refused. DeepSpeed's CPU
        # accelerator must not be told: accelerate drops DeepSpeed under cpu=True.
        defaults["use_cpu"] = True
    parser.set_defaults(**{k: v for k, v in defaults.items() if k in names})
    args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if not _given(argv, "output_dir"):
        parser.error("--output_dir is required")
    if args.merge_to and args.stage != "lora":
        parser.error("--merge_to merges a LoRA adapter: it needs --stage lora (the other stages write a full model)")
    if args.load_in_4bit:
        check_qlora(args)
    if not _given(argv, "learning_rate"):
        training_args.learning_rate = DEFAULT_LEARNING_RATE[args.stage]
    training_args.remove_unused_columns = False
    return args, training_args


def _setup_logging(training_args):
    level = logging.INFO if training_args.process_index == 0 else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, stream=sys.stderr)
    logging.getLogger("honeybee_hf").setLevel(level)


def _trainable_summary(model):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable:,} trainable parameters of {total:,} ({100 * trainable / max(total, 1):.3f}%)"


def save_trained(trainer, args, processor, out_dir):
    """Stage lora: the adapter (+ processor files); stages projector/full: a Hub-ready folder. Under FSDP and
    DeepSpeed the weights are first gathered onto rank 0, a collective every rank takes part in."""
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    # DeepSpeed gathers through its engine (`model_wrapped`); FSDP2 through the sharded module itself.
    state_dict = (
        trainer.accelerator.get_state_dict(trainer.model_wrapped if trainer.is_deepspeed_enabled else trainer.model)
        if sharded
        else None
    )
    if trainer.is_deepspeed_enabled:
        # Training is over: models built from here on (below, and by --merge_to) are plain ones. Under ZeRO-3,
        # transformers would otherwise partition each across the ranks, a collective the other ranks are not in.
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    if not trainer.is_world_process_zero():
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    if args.stage == "lora":
        model.save_pretrained(out_dir, state_dict=state_dict)  # PEFT keeps the adapter's entries
        processor.save_pretrained(out_dir)  # version-neutral files (HoneybeeProcessor.save_pretrained)
        return
    if sharded:  # the wrapped model holds shards: put the gathered weights into a plain copy
        model = AutoModelForImageTextToText.from_pretrained(
            args.model, trust_remote_code=True, dtype=_load_dtype(args, trainer.args)
        )
        model.load_state_dict(state_dict)
    save_hub_folder(model, processor, out_dir, force=True)


def merge_adapter(base, adapter, out_dir, dtype="auto", force=False):
    """Base + LoRA adapter -> merged weights -> a Hub-ready folder (hub/folder.py). Returns the merged model."""
    from peft import PeftModel

    dtype = _DTYPES.get(dtype, dtype)
    model = AutoModelForImageTextToText.from_pretrained(base, trust_remote_code=True, dtype=dtype)
    processor = AutoProcessor.from_pretrained(base, trust_remote_code=True)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    save_hub_folder(merged, processor, out_dir, force=force)
    return merged


def run(argv=None, callbacks=None):
    """Parse `argv` (default: sys.argv[1:]), train, save; returns the `Trainer`."""
    # TrainingArguments exports settings to os.environ (ACCELERATE_MIXED_PRECISION, FSDP_*...), where a later run in
    # the same process (a notebook, a test) would pick them up: undo that when this run ends.
    environ = dict(os.environ)
    try:
        return _run(sys.argv[1:] if argv is None else list(argv), callbacks)
    finally:
        os.environ.clear()
        os.environ.update(environ)


def _run(argv, callbacks):
    engine = requested_engine(argv)
    args, training_args = parse_args(argv)
    check_inputs(args, training_args)
    _setup_logging(training_args)
    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    processor = load_processor(args, training_args)
    bad_samples_report = output_dir / "bad_samples.jsonl"
    dataset = load_training_data(args, processor, bad_samples_report)
    if dataset.has_text_only_samples:
        allow_batches_without_images(training_args)
    model = prepare_model(load_model(args, training_args), args, training_args)
    logger.info("stage %s: %s", args.stage, _trainable_summary(model))

    trainer = build_trainer(model, processor, dataset, training_args, callbacks, engine, args.allow_engine_fallback)
    trainer.train(resume_from_checkpoint=checkpoint_to_resume(args, training_args))
    trainer.save_state()
    where = save_outputs(trainer, args, processor, output_dir)

    bad = dataset.report.count + dataset.runtime_report.count
    if bad:
        logger.warning("%d bad sample(s) were skipped; see %s", bad, bad_samples_report)
    logger.info("done: %s", where)
    return trainer


def load_processor(args, training_args):
    """The model's processor, its code and the model's copied into transformers' modules cache by one process first.

    transformers copies remote code into that cache in place: a rank importing a file while another rank rewrites it
    imports half a file (huggingface/transformers#27421). So the main process copies first, then each node's main
    process (a cache per node: its copy; one cache shared by all nodes: nothing left to copy), then the other ranks,
    which find every file there.
    """
    with training_args.main_process_first(local=False, desc="copying the model's code"):
        with training_args.main_process_first(local=True, desc="copying the model's code"):
            config = AutoConfig.from_pretrained(args.model, trust_remote_code=True)
            if config.model_type != HoneybeeConfig.model_type:
                raise CommandError(
                    f"--model {args.model}: a {config.model_type!r} model, not a Honeybee; pass a folder "
                    "honeybee-convert wrote (or its Hub repo id)"
                )
            processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
            get_class_from_dynamic_module(config.auto_map["AutoModelForImageTextToText"], args.model)
    return processor


def load_training_data(args, processor, report_path):
    """The conversation files as a dataset of tokenized samples; bad samples are reported to `report_path`."""
    dataset = HoneybeeConversationDataset(
        args.data,
        processor,
        image_root=args.image_root,
        max_length=args.max_length,
        bad_samples=args.bad_samples,
        system_prompt=args.system_prompt,
        verify_images=args.verify_images,
        report_path=report_path,
    )
    logger.info("%d training samples from %s", len(dataset), ", ".join(args.data))
    return dataset


def allow_batches_without_images(training_args):
    """Text-only samples make batches without an image, in which the vision tower and the projector do not run:
    refused under FSDP / ZeRO-3, announced to DDP."""
    if _sharded_parameters(training_args):
        raise ValueError(
            "the data mixes in text-only samples, but FSDP / ZeRO-3 need every rank to run the vision tower and "
            "projector in every step (a rank whose batch has no image would stall the others); use DDP or "
            "ZeRO-2, or give every sample an image"
        )
    if training_args.ddp_find_unused_parameters is None:
        # A batch without images leaves the projector unused on that rank; DDP must be told.
        training_args.ddp_find_unused_parameters = True


def build_trainer(model, processor, dataset, training_args, callbacks, engine, allow_engine_fallback):
    """The `Trainer`, checked to run on the distributed engine the launch asked for."""
    trainer = HoneybeeTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=HoneybeeCollator(processor.tokenizer.pad_token_id),
        processing_class=processor,
        callbacks=callbacks,
    )
    logger.info("engine: %s", check_engine(engine, trainer.accelerator, allow_engine_fallback))
    for name in keep_fp32_modules_in_fsdp2(trainer):
        logger.info("%s: its own FSDP2 unit, computing in float32", name)
    return trainer


def checkpoint_to_resume(args, training_args):
    """`--resume_from_checkpoint` if given, else what `--resume` picks in the output folder (or None)."""
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is None:
        checkpoint = resolve_checkpoint(args.resume, Path(training_args.output_dir), training_args.world_size)
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    return checkpoint


def save_outputs(trainer, args, processor, output_dir):
    """The trained adapter (stage lora) or Hub folder, and the merged model `--merge_to` asks for; returns where the
    trained result is."""
    where = output_dir / ("adapter" if args.stage == "lora" else "model")
    save_trained(trainer, args, processor, where)
    trainer.accelerator.wait_for_everyone()
    if args.merge_to and args.stage == "lora":
        if trainer.is_world_process_zero():
            merge_adapter(args.model, where, args.merge_to, force=True)
            logger.info("merged model written to %s", args.merge_to)
        trainer.accelerator.wait_for_everyone()
    return where


def check_inputs(args, training_args):
    """The paths a run reads and writes, checked before anything loads: each mistake in one line."""
    check_model_source(args.model, "--model")
    for path in args.data:
        if not os.path.isfile(path):
            what = "a folder" if os.path.isdir(path) else "no such file"
            raise CommandError(f"--data {path}: {what}; pass LLaVA-style conversation JSONL (or JSON array) files")
    if args.image_root is not None and not os.path.isdir(args.image_root):
        raise CommandError(f"--image_root {args.image_root}: no such folder; pass the folder image paths start from")
    if os.path.exists(training_args.output_dir) and not os.path.isdir(training_args.output_dir):
        raise CommandError(f"--output_dir {training_args.output_dir}: a file; pass a folder (created if missing)")


def merge_main(argv):
    import argparse

    parser = argparse.ArgumentParser(
        prog="honeybee-finetune merge", description="Merge a LoRA adapter into its base and write a Hub-ready folder."
    )
    parser.add_argument("--model", required=True, help="the base model the adapter was trained on")
    parser.add_argument("--adapter", required=True, help="the adapter folder (output_dir/adapter)")
    parser.add_argument("--output", required=True, help="where to write the merged Hub-ready folder")
    parser.add_argument("--dtype", default="auto", choices=["auto", *_DTYPES], help="dtype of the merged weights")
    parser.add_argument("--force", action="store_true", help="replace --output if it exists")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    check_model_source(args.model, "--model")
    if not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
        raise CommandError(
            f"--adapter {args.adapter}: no adapter_config.json there; pass the adapter folder a LoRA run wrote "
            "(OUTPUT_DIR/adapter)"
        )
    merge_adapter(args.model, args.adapter, args.output, dtype=args.dtype, force=args.force)
    print(args.output)
    return 0


@console_script("honeybee-finetune")
def main(argv):
    if argv and argv[0] == "merge":
        return merge_main(argv[1:])
    if argv and argv[0] == "config":
        if len(argv) != 2 or argv[1] not in CONFIGS:
            print(f"usage: honeybee-finetune config {{{','.join(CONFIGS)}}}", file=sys.stderr)
            return 2
        print(config_path(argv[1]))
        return 0
    try:
        run(argv)
    except BadSampleError as error:  # --bad_samples error: say where, without a traceback
        logger.error("bad sample %s; fix it, or pass --bad_samples skip to leave such samples out", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
