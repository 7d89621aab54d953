"""`honeybee-finetune` on tiny models, on CPU: data and labels, the parameters each stage trains, overfitting the
photos, adapter save/reload/merge (also across transformers 4 and 5), and bad-data reporting."""

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from honeybee_hf.processing_honeybee import AI, HUMAN, SYSTEM_PROMPT
from honeybee_hf.train import finetune
from honeybee_hf.train.data import (
    BadSampleError,
    HoneybeeCollator,
    HoneybeeConversationDataset,
    conversation_to_messages,
)
from utils import OFFICIAL_FIXTURES as FIXTURES
from utils import other_python, photo
from utils.finetune import (
    ANSWERS,
    IMAGES,
    MIN_MARGIN,
    QUESTION,
    TEXT_ONLY,
    answer_margins,
    clean_env,
    image_sample,
    load_model,
    load_processor,
    make_base,
    probe_batch,
    small_photos,
    text_sample,
    training_records,
    unique_folder,
    write_jsonl,
)

OVERFIT_STEPS = 200  # every answer token then wins by MIN_MARGIN (60 steps left a token at -0.3 on one CPU)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(unique_folder(tmp_path_factory.mktemp("base"), "hb_ft_base"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return small_photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, photos):
    records = training_records()
    records.insert(2, image_sample("missing.jpeg", answer="Nothing."))  # reported and skipped, not fatal
    return write_jsonl(photos / "train.jsonl", records)


@pytest.fixture(scope="module")
def trained(base, data_file, photos, tmp_path_factory):
    """Stage lora, run through the CLI entry point: all samples in one batch, a high learning rate."""
    out = tmp_path_factory.mktemp("lora_run")
    merged = unique_folder(out, "hb_ft_merged")
    trainer = finetune.run(
        [
            "--model",
            str(base),
            "--data",
            str(data_file),
            "--output_dir",
            str(out),
            "--stage",
            "lora",
            "--lora_dropout",
            "0",
            "--max_steps",
            str(OVERFIT_STEPS),
            "--per_device_train_batch_size",
            "8",
            "--learning_rate",
            "1e-2",
            "--logging_steps",
            "1",
            "--save_steps",
            "1000",
            "--seed",
            "0",
            "--merge_to",
            str(merged),
        ]
    )
    trainer.model.eval()
    return {"trainer": trainer, "out": out, "merged": merged}


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


# --------------------------------------------------------------------------------------------------------------
# Data: conversation -> official prompt -> labels
# --------------------------------------------------------------------------------------------------------------


def _fixture_case(index, processor):
    meta = json.loads((FIXTURES / "tokenizer_toy.json").read_text())
    tensors = load_file(str(FIXTURES / "tokenizer_toy.safetensors"))
    ids = tensors[f"case{index}.input_ids"].tolist()
    labels = tensors[f"case{index}.labels"].tolist()
    image_id = processor.image_token_id  # the official code writes -1 where we write the <image> id
    return meta["cases"][index]["prompt"], [image_id if i == -1 else i for i in ids], labels


@pytest.fixture(scope="module")
def fixture_processor():
    """The toy tokenizer of the official fixture, with its 5 visual tokens per image."""
    from honeybee_hf.testing_utils import tiny_config, tiny_processor

    return tiny_processor(tiny_config(num_query_tokens=4, num_eos_tokens=1))


def _dataset(tmp_path, records, processor, **kwargs):
    data = write_jsonl(tmp_path / "d.jsonl", records)
    return HoneybeeConversationDataset(data, processor, image_root=IMAGES, **kwargs)


def ids_of(processor, prompt, num_images):
    """The ids of a prompt, rendered or in the official format (its final answer closed by hand)."""
    return processor(text=prompt, images=[photo(i) for i in range(num_images)])["input_ids"][0]


def test_llava_conversation_becomes_official_prompt(fixture_processor):
    """The chat template's rendering of the messages has the ids and labels of the official prompt."""
    turns = [
        {"from": "human", "value": "<image>\nWhat is it?"},
        {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "And this?\n<image>"},
        {"from": "gpt", "value": " A dog. "},
    ]
    expected = (
        SYSTEM_PROMPT
        + HUMAN
        + "<image>"
        + HUMAN
        + "What is it?"
        + AI
        + "A cat."
        + HUMAN
        + "<image>"
        + HUMAN
        + "And this?"
        + AI
        + "A dog."
    )
    rendered = fixture_processor.apply_chat_template(conversation_to_messages(turns, 2))
    assert ids_of(fixture_processor, rendered, 2) == ids_of(fixture_processor, expected + "</s>", 2)
    # Images without <image> go to the first human turn, as in LLaVA; a system turn replaces the system prompt.
    plain = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]
    rendered = fixture_processor.apply_chat_template(conversation_to_messages(plain, 1))
    expected = "Be brief." + HUMAN + "<image>" + HUMAN + "Q" + AI + "A"
    assert ids_of(fixture_processor, rendered, 1) == ids_of(fixture_processor, expected + "</s>", 1)


def test_labels_match_official_single_turn_and_caption(tmp_path, fixture_processor):
    # case 2: SYSTEM\nHuman: <image>\nHuman: What is in the image?\nAI: A dog lying on the floor.
    prompt, ids, labels = _fixture_case(2, fixture_processor)
    question = "What is in the image?"
    answer = prompt.split(AI)[-1]
    ds = _dataset(tmp_path, [image_sample("ca.jpeg", question, answer)], fixture_processor)
    item = ds[0]
    assert item["input_ids"] == ids and item["labels"] == labels
    assert item["pixel_values"].shape == (1, 3, 32, 32)
    # case 3: the pre-training caption format
    prompt, ids, labels = _fixture_case(3, fixture_processor)
    ds = _dataset(tmp_path, [{"image": "ca.jpeg", "caption": prompt.split("<image> ")[1]}], fixture_processor)
    item = ds[0]
    assert item["input_ids"] == ids and item["labels"] == labels


def test_labels_multi_turn_match_official_rule(tmp_path, fixture_processor):
    """Official case 4 (two human turns, one answer, open last turn) plus a second answer: the official ids and
    labels come first unchanged, then only the new answer and its </s> carry labels."""
    prompt, ids, labels = _fixture_case(4, fixture_processor)
    turns = [("Is there a cat?", "No"), ("Explain why this meme is funny.", "Because the cat is a dog.")]
    conversations = [t for q, a in turns for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
    ds = _dataset(tmp_path, [{"conversations": conversations}], fixture_processor)
    item = ds[0]
    n = len(ids)
    assert item["input_ids"][:n] == ids and item["labels"][:n] == labels
    tail_ids, tail_labels = item["input_ids"][n:], item["labels"][n:]
    assert tail_labels == tail_ids and tail_ids[-1] == fixture_processor.tokenizer.eos_token_id
    tok = fixture_processor.tokenizer
    learned = [i for i in item["labels"] if i != -100]
    assert tok.decode(learned, skip_special_tokens=True).split() == "No Because the cat is a dog.".split()
    assert learned.count(tok.eos_token_id) == 2  # one </s> per answer


def test_collator_pads_and_mixes_text_only(tmp_path, fixture_processor):
    records = [
        image_sample("ca.jpeg", "Q?", "Long answer with many words."),
        text_sample("Hi", "Yo"),
        image_sample("titanic.jpeg", "Q?", "A"),
    ]
    ds = _dataset(tmp_path, records, fixture_processor)
    items = [ds[i] for i in range(3)]
    batch = HoneybeeCollator(fixture_processor.tokenizer.pad_token_id)(items)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)  # the text-only sample brings no image
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert batch["labels"][row, n:].eq(-100).all() and batch["input_ids"][row, n:].eq(0).all()
        assert batch["labels"][row, :n].tolist() == item["labels"]


# --------------------------------------------------------------------------------------------------------------
# What each stage trains
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["projector", "lora", "full"])
def test_only_intended_parameters_get_gradients(stage, base, tmp_path):
    processor = load_processor(base)
    ds = _dataset(tmp_path, [image_sample("ca.jpeg"), text_sample(*TEXT_ONLY)], processor)
    batch = HoneybeeCollator(processor.tokenizer.pad_token_id)([ds[0], ds[1]])
    args = finetune.FinetuneArguments(model=str(base), data=[], stage=stage, lora_dropout=0.0)
    model = finetune.prepare_model(load_model(base), args)
    model.train()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable  # 5.x / 4.x
    enable({"use_reentrant": False})
    model(**batch, use_cache=False).loss.backward()

    def intended(name):
        if stage == "projector":
            return name.startswith("model.abstractor.")
        if stage == "full":
            return name.startswith(("model.abstractor.", "model.language_model.", "lm_head."))
        # PEFT names: LoRA factors on the LLM's projections, and the trained copy of the abstractor
        return ("lora_A" in name or "lora_B" in name) or "abstractor.modules_to_save" in name

    params = dict(model.named_parameters())
    trained = {n for n, p in params.items() if p.requires_grad}
    assert trained == {n for n in params if intended(n)}
    assert all(params[n].grad is not None for n in trained)
    assert all(p.grad is None for n, p in params.items() if n not in trained)
    assert any(params[n].grad.abs().sum() > 0 for n in trained if "abstractor" in n)
    assert not any("vision_tower" in n for n in trained)
    if stage == "lora":
        lora = [n for n in trained if "lora_" in n]
        assert lora and all("language_model" in n for n in lora)
        kinds = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora}
        assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        assert any(params[n].grad.abs().sum() > 0 for n in lora if "lora_B" in n)


def test_lora_target_is_restricted_to_the_language_model():
    assert finetune.lora_target_regex("q_proj,v_proj") == r".*language_model.*\.(q_proj|v_proj)"
    assert finetune.lora_target_regex(r".*language_model.*\.q_proj") == r".*language_model.*\.q_proj"


# --------------------------------------------------------------------------------------------------------------
# Loss normalisation: a batch of 2 in one process = two data-parallel ranks of 1
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["full", "lora"])
def test_two_ranks_of_one_sample_get_the_gradient_of_one_batch_of_two(stage, base, tmp_path):
    """Trainer gives each rank `num_items_in_batch`, the supervised tokens of the whole global batch, if the model's
    forward passes it to its loss; each rank's loss is then its tokens' summed loss over that global count (times the
    world size, which the gradient all-reduce's mean divides out). Summed over the ranks, those gradients must equal a
    batch of 2 padded by our collator, and both the reference: each sample's own token-mean gradient, weighted by its
    share of the tokens. A plain mean of the two per-sample means would differ here (15 vs 6 supervised tokens; 78 vs
    56 ids, so the batch right-pads the second by 22)."""
    from transformers import TrainingArguments

    processor = load_processor(base)
    ds = _dataset(tmp_path, [image_sample("ca.jpeg"), text_sample(*TEXT_ONLY)], processor)
    collate = HoneybeeCollator(processor.tokenizer.pad_token_id)
    args = finetune.FinetuneArguments(model=str(base), data=[], stage=stage, lora_dropout=0.0)
    model = finetune.prepare_model(load_model(base), args).train()  # a tiny C-Abstractor model: no dropout
    training_args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none")
    trainer = finetune.HoneybeeTrainer(model=model, args=training_args)
    assert trainer.model_accepts_loss_kwargs and training_args.average_tokens_across_devices

    def gradient(batch, num_items_in_batch=None):
        model.zero_grad()
        loss = trainer.compute_loss(model, batch, num_items_in_batch=num_items_in_batch)
        loss.backward()
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in trained}  # None: unused

    tokens = [sum(label != -100 for label in ds[i]["labels"][1:]) for i in range(2)]  # shifted: t predicts t + 1
    assert tokens[0] != tokens[1]
    total = torch.tensor(sum(tokens))
    one_batch = gradient(collate([ds[0], ds[1]]), total)
    ranks = [gradient(collate([ds[i]]), total) for i in range(2)]
    alone = [gradient(collate([ds[i]])) for i in range(2)]
    for name, reference in one_batch.items():
        weighted = (tokens[0] * alone[0][name] + tokens[1] * alone[1][name]) / total
        scale = weighted.abs().max().item() + 1e-6
        torch.testing.assert_close(one_batch[name], weighted, atol=1e-4 * scale, rtol=1e-4)
        torch.testing.assert_close(ranks[0][name] + ranks[1][name], weighted, atol=1e-4 * scale, rtol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# Overfitting, adapters, merging
# --------------------------------------------------------------------------------------------------------------


def test_overfits_the_photos_and_generates_a_trained_answer(trained, base, photos, data_file):
    history = [h["loss"] for h in trained["trainer"].state.log_history if "loss" in h]
    assert len(history) == OVERFIT_STEPS
    first, last = history[0], min(history[-5:])
    print(f"loss {first:.3f} -> {last:.3f} ({100 * (1 - last / first):.1f}% lower)")
    assert last <= 0.2 * first, history
    assert any("samples_per_second" in h for h in trained["trainer"].state.log_history)

    from peft import PeftModel

    processor = load_processor(base)
    model = PeftModel.from_pretrained(load_model(base), trained["out"] / "adapter").eval()
    # Every answer token wins by a wide margin (teacher-forced), so the greedy answers below cannot flip with another
    # CPU's rounding; then greedy generation (KV cache, the released adapter) must write each trained answer.
    dataset = HoneybeeConversationDataset(data_file, processor, bad_samples="skip")
    for index, sample in enumerate(dataset.samples):
        margins = answer_margins(model, dataset[index])
        print(f"{sample.where}: smallest margin {margins.min():.2f}")
        assert margins.min() >= MIN_MARGIN, (sample.where, margins.tolist())
    for name, answer in ANSWERS.items():
        inputs = processor(text=QUESTION, images=[str(photos / name)], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
        written = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
        assert written.strip() == answer


def test_bad_sample_in_training_data_was_reported(trained, data_file):
    lines = (trained["out"] / "bad_samples.jsonl").read_text().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["where"] == f"{data_file}:3" and "not found" in entry["problem"]


def test_adapter_reload_and_merge_give_the_same_logits(trained, base):
    from peft import PeftModel

    processor = load_processor(base)
    batch = probe_batch(processor)
    in_memory = _logits(trained["trainer"].model, batch)
    adapter_dir = trained["out"] / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter_dir.iterdir()}
    keys = load_file(str(adapter_dir / "adapter_model.safetensors")).keys()
    assert any("abstractor" in k for k in keys) and not any("vision_tower" in k for k in keys)
    reloaded = PeftModel.from_pretrained(load_model(base), adapter_dir).eval()
    assert torch.equal(_logits(reloaded, batch), in_memory)
    assert not torch.allclose(_logits(load_model(base), batch), in_memory, atol=1e-3)  # the adapter matters

    # merged in memory, and the Hub folder that --merge_to wrote (trust_remote_code, like any converted model)
    merged = reloaded.merge_and_unload()
    torch.testing.assert_close(_logits(merged, batch), in_memory, atol=1e-4, rtol=1e-4)
    exported = load_model(trained["merged"])
    assert not any("lora" in n for n, _ in exported.named_parameters())
    torch.testing.assert_close(_logits(exported, batch), in_memory, atol=1e-4, rtol=1e-4)
    assert load_processor(trained["merged"]).image_token_id == processor.image_token_id


def test_merge_command(trained, base, tmp_path):
    out = unique_folder(tmp_path, "hb_ft_cli_merged")
    adapter = trained["out"] / "adapter"
    assert finetune.main(["merge", "--model", str(base), "--adapter", str(adapter), "--output", str(out)]) == 0
    batch = probe_batch(load_processor(base))
    torch.testing.assert_close(_logits(load_model(out), batch), _logits(load_model(trained["merged"]), batch))


_OTHER_VERSION_SCRIPT = r"""
import sys, torch, transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor
from peft import PeftModel
base, adapter, batch_file, out_file = sys.argv[1:]
AutoProcessor.from_pretrained(adapter, trust_remote_code=True)  # the adapter folder carries a loadable processor
model = AutoModelForImageTextToText.from_pretrained(base, trust_remote_code=True, dtype=torch.float32)
model = PeftModel.from_pretrained(model, adapter).eval()
with torch.no_grad():
    logits = model(**load_file(batch_file)).logits
save_file({"logits": logits.contiguous()}, out_file)
print(transformers.__version__)
"""


def test_adapter_loads_in_the_other_transformers_version(trained, base, tmp_path):
    python = other_python()
    if python is None:
        pytest.skip("the other transformers version's venv (.venvs/tf4 or .venvs/tf5) is not installed")
    batch = {k: v.contiguous() for k, v in probe_batch(load_processor(base)).items()}
    save_file(batch, str(tmp_path / "batch.safetensors"))
    expected = _logits(trained["trainer"].model, batch)
    script = tmp_path / "other.py"
    script.write_text(_OTHER_VERSION_SCRIPT)
    env = clean_env(HF_MODULES_CACHE=tmp_path / "modules")
    paths = [base, trained["out"] / "adapter", tmp_path / "batch.safetensors", tmp_path / "logits.safetensors"]
    result = subprocess.run(
        [str(python), str(script), *map(str, paths)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    import transformers

    assert result.stdout.strip().split(".")[0] != transformers.__version__.split(".")[0]
    logits = load_file(str(tmp_path / "logits.safetensors"))["logits"]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stage", ["projector", "full"])
def test_projector_and_full_stages_write_a_hub_folder(stage, base, data_file, tmp_path):
    out = tmp_path / "run"
    finetune.run(
        [
            "--model",
            str(base),
            "--data",
            str(data_file),
            "--output_dir",
            str(out),
            "--gradient_checkpointing",
            "--stage",
            stage,
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "4",
            "--save_steps",
            "1000",
            "--logging_steps",
            "1",
        ]
    )
    before, after = load_model(base).state_dict(), load_model(out / "model").state_dict()
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    allowed = ("model.abstractor.", "model.language_model.", "lm_head.") if stage == "full" else ("model.abstractor.",)
    assert changed and all(k.startswith(allowed) for k in changed)
    if stage == "full":
        assert any(k.startswith("model.language_model.") for k in changed) and "lm_head.weight" in changed


# --------------------------------------------------------------------------------------------------------------
# Bad data
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def bad_data(tmp_path):
    (tmp_path / "corrupt.jpeg").write_bytes(b"this is not a JPEG")
    whole = (IMAGES / "ca.jpeg").read_bytes()
    (tmp_path / "truncated.jpeg").write_bytes(whole[: len(whole) // 3])  # header fine, pixels missing
    for name in ANSWERS:
        (tmp_path / name).write_bytes((IMAGES / name).read_bytes())
    records = [
        image_sample("ca.jpeg"),  # 1 good
        image_sample("nowhere.jpeg", answer="x"),  # 2 missing file
        image_sample("corrupt.jpeg", answer="x"),  # 3 corrupt file
        {"image": "ca.jpeg", "conversations": [{"from": "human", "value": "<image>\nHello?"}]},  # 4 no answer
        image_sample("ca.jpeg", "<image>\nQ", "A"),  # 5 two <image>, one image
        '{"image": "ca.jpeg", "conversations": [',  # 6 invalid JSON
        text_sample(*TEXT_ONLY),  # 7 good
        image_sample("truncated.jpeg", answer="x"),  # 8 fails only when decoded
        image_sample("titanic.jpeg"),  # 9 good
    ]
    return write_jsonl(tmp_path / "bad.jsonl", records)


EXPECTED_PROBLEMS = {2: "not found", 3: "corrupt", 4: "no assistant", 5: "more <image> than images", 6: "invalid JSON"}


def test_bad_samples_are_reported_with_file_and_line_and_skipped(bad_data, base, tmp_path, caplog):
    processor = load_processor(base)
    report = tmp_path / "report.jsonl"
    with caplog.at_level("WARNING", logger="honeybee_hf"):
        ds = HoneybeeConversationDataset(bad_data, processor, report_path=report)
    assert [s.where for s in ds.samples] == [f"{bad_data}:{n}" for n in (1, 7, 8, 9)]
    entries = [json.loads(line) for line in report.read_text().splitlines()]
    assert [e["where"] for e in entries] == [f"{bad_data}:{n}" for n in EXPECTED_PROBLEMS]
    for entry, problem in zip(entries, EXPECTED_PROBLEMS.values()):
        assert problem in entry["problem"]
    for n in EXPECTED_PROBLEMS:
        assert f"{bad_data}:{n}:" in caplog.text
    # The truncated image passes the header check and fails when decoded: reported, replaced by the next sample.
    caplog.clear()
    with caplog.at_level("WARNING", logger="honeybee_hf"):
        item = ds[2]
    assert f"{bad_data}:8:" in caplog.text
    assert item["input_ids"] == ds.encode(ds.samples[3])["input_ids"]
    assert json.loads(report.read_text().splitlines()[-1])["where"] == f"{bad_data}:8"
    assert len(ds[2]["input_ids"]) > 0  # known bad now: skipped without a second report
    assert len(report.read_text().splitlines()) == len(EXPECTED_PROBLEMS) + 1


def test_bad_samples_error_mode_refuses_with_location(bad_data, base, tmp_path):
    processor = load_processor(base)
    with pytest.raises(BadSampleError, match=rf"{re.escape(str(bad_data))}:2: image file not found"):
        HoneybeeConversationDataset(bad_data, processor, bad_samples="error")
    # The command refuses before training starts (run raises; the console entry point says why and exits 1).
    argv = ["--model", str(base), "--data", str(bad_data), "--output_dir", str(tmp_path), "--bad_samples", "error"]
    with pytest.raises(BadSampleError, match=rf"{re.escape(str(bad_data))}:2:"):
        finetune.run(argv)
    assert finetune.main(argv) == 1
    # Decode failures mid-run also stop an error-mode run, with the location.
    good = write_jsonl(tmp_path / "late.jsonl", [image_sample("truncated.jpeg", answer="x")])
    ds = HoneybeeConversationDataset(good, processor, image_root=bad_data.parent, bad_samples="error")
    with pytest.raises(BadSampleError, match=rf"{re.escape(str(good))}:1: cannot read image"):
        ds[0]


def test_too_long_samples_are_bad(tmp_path, base):
    processor = load_processor(base)
    records = [image_sample("ca.jpeg"), text_sample("Q " * 80, "A")]
    ds = _dataset(tmp_path, records, processor, max_length=40)
    with pytest.raises(BadSampleError, match="no answer token"):
        ds.encode(ds.samples[1])
    with pytest.raises(BadSampleError, match="would cut an image"):
        _dataset(tmp_path, records, processor, max_length=20).encode(ds.samples[0])


def test_a_sample_cut_after_its_first_answer_keeps_that_answer(tmp_path, base):
    """max_length cutting into the second answer's turn: the tokens kept are the whole sample's first tokens, labelled
    as in the whole sample (4.57's own truncation raised IndexError when a whole assistant turn fell off)."""
    processor = load_processor(base)
    turns = [("human", "Q one?"), ("gpt", "First answer."), ("human", "Q two " * 20), ("gpt", "Second answer.")]
    record = {"conversations": [{"from": role, "value": value} for role, value in turns]}
    whole = _dataset(tmp_path, [record], processor, max_length=None)
    full = whole.encode(whole.samples[0])
    first = next(i for i, label in enumerate(full["labels"]) if label != -100)
    first_end = next(i for i in range(first, len(full["labels"])) if full["labels"][i] == -100)  # past its </s>
    for max_length in (first_end, first_end + 20):
        cut = _dataset(tmp_path, [record], processor, max_length=max_length)
        sample = cut.encode(cut.samples[0])
        assert sample["input_ids"] == full["input_ids"][:max_length]
        assert sample["labels"] == full["labels"][:max_length]
        assert processor.tokenizer.decode([i for i in sample["labels"] if i != -100]).strip() == "First answer.</s>"


def test_bf16_lora_keeps_the_base_in_bf16_and_trains_in_fp32(base, data_file, tmp_path):
    trainer = finetune.run(
        [
            "--model",
            str(base),
            "--data",
            str(data_file),
            "--output_dir",
            str(tmp_path),
            "--bf16",
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "4",
            "--logging_steps",
            "1",
            "--save_steps",
            "1000",
        ]
    )
    dtypes = {(p.requires_grad, p.dtype) for p in trainer.model.parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}


def test_qlora_outside_stage_lora_is_a_clear_error(base, data_file, tmp_path):
    # QLoRA itself trains from the command line on bitsandbytes' CPU backend: tests/integrations/test_quantization.py
    with pytest.raises(ValueError, match="only works with --stage lora"):
        finetune.run([
            "--model", str(base), "--data", str(data_file), "--output_dir", str(tmp_path), "--load_in_4bit",
            "--stage", "full",
        ])  # fmt: skip


def test_shipped_launch_configs(capsys):
    import yaml

    for name in finetune.CONFIGS:
        path = finetune.config_path(name)
        text = path.read_text()
        config = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        assert config
    assert finetune.main(["config", "fsdp"]) == 0
    assert capsys.readouterr().out.strip().endswith("accelerate_fsdp.yaml")
    json_config = str(finetune.config_path("ds_zero2"))
    assert finetune._rewrite_argv(["--deepspeed", "zero2"]) == ["--deepspeed", json_config]
    assert finetune._rewrite_argv(["--deepspeed=ds_zero2"]) == [f"--deepspeed={json_config}"]
    zero3 = str(finetune.config_path("ds_zero3"))
    assert finetune._rewrite_argv(["--deepspeed", "zero3"]) == ["--deepspeed", zero3]
    assert json.loads(Path(zero3).read_text())["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
