"""TRL trains Honeybee as it trains transformers' own VLMs: its trainers run the backbone (`model.base_model`, or
`model.model` before transformers 5) and apply `lm_head` themselves. SFT with a LoRA `peft_config` on a TRL-format
dataset (`messages` + `images`), with the loss on the assistant turns only, and a DPO run, on a tiny model, CPU."""

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from utils import TF4, photo

pytest.importorskip("trl", reason="TRL is not installed (scripts/setup_envs.sh installs it)")
datasets = pytest.importorskip("datasets", reason="datasets is not installed (TRL needs it)")

QA = [
    ("What is in the image?", "A man in a suit."),
    ("What colour is the car?", "Red and shiny."),
    ("What is written on the mug?", "Good morning."),
]
# LoRA on the language model only: a plain list of names would also match CLIP's q_proj/k_proj/v_proj.
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
COMMON_ARGS = dict(report_to=[], save_strategy="no", logging_steps=1, bf16=False, max_length=None, seed=0)


def user_turn(question):
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}


def assistant_turn(answer):
    return {"role": "assistant", "content": [{"type": "text", "text": answer}]}


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS)


def load(folder):
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    return model, AutoProcessor.from_pretrained(folder, trust_remote_code=True)


def sft_dataset():
    rows = [{"images": [photo(i)], "messages": [user_turn(q), assistant_turn(a)]} for i, (q, a) in enumerate(QA)]
    return datasets.Dataset.from_list(rows)


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("assistant_only_loss", [True, False])
def test_sft_with_lora_trains(tiny_folder, tmp_path, assistant_only_loss):
    from trl import SFTConfig, SFTTrainer

    if assistant_only_loss and TF4:
        pytest.skip("TRL supports assistant_only_loss for vision datasets from transformers 5.18 on")
    folder, _, _ = tiny_folder("c-abs", seed=2)
    model, processor = load(folder)
    args = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=12,
        per_device_train_batch_size=3,
        learning_rate=1e-2,
        assistant_only_loss=assistant_only_loss,
        **COMMON_ARGS,
    )
    dataset = sft_dataset()
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=processor, peft_config=lora_config()
    )
    batch = trainer.data_collator([dict(row) for row in dataset])
    supervised = batch["labels"] != -100
    if assistant_only_loss:
        # exactly each answer and its </s>
        for row, (_, answer) in enumerate(QA):
            ids = batch["input_ids"][row][supervised[row]]
            assert ids[-1] == processor.tokenizer.eos_token_id
            assert processor.tokenizer.decode(ids, skip_special_tokens=True).strip() == answer
        with torch.no_grad():
            # the model's own loss on the batch (LoRA starts at zero): TRL's fused head must find the same
            expected_first_loss = model(**batch).loss.item()
    else:
        assert supervised.sum() == batch["attention_mask"].sum()  # every real token: TRL's default
    trainer.train()
    history = losses(trainer)
    assert len(history) == 12
    if assistant_only_loss:
        assert history[0] == pytest.approx(expected_first_loss, abs=1e-4)
    # A tiny random LLM (32 wide, lm_head std 0.02) can only move its logits a little: measured 6.39 -> 6.06.
    assert history[-1] < history[0] - 0.15, history
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name and "language_model" in name for name in trainable)


def test_dpo_with_lora_trains(tiny_folder, tmp_path):
    from trl import DPOConfig, DPOTrainer

    folder, _, _ = tiny_folder("c-abs", seed=4)
    model, processor = load(folder)
    rows = [
        {
            "images": [photo(i)],
            "prompt": [user_turn(q)],
            "chosen": [assistant_turn(a)],
            "rejected": [assistant_turn(QA[(i + 1) % len(QA)][1])],
        }
        for i, (q, a) in enumerate(QA)
    ]
    args = DPOConfig(
        output_dir=str(tmp_path / "dpo"),
        max_steps=4,
        per_device_train_batch_size=3,
        learning_rate=1e-2,
        **COMMON_ARGS,
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=processor,
        peft_config=lora_config(),
    )
    trainer.train()
    history = losses(trainer)
    # step 1: the policy is the reference (LoRA starts at zero), so every reward is 0 and the loss is log 2
    assert history[0] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-4)
    assert history[-1] < history[0], history
