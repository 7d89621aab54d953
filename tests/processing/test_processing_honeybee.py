"""HoneybeeProcessor against the official code (kakaobrain/honeybee HEAD, transformers 4.38.1) and its edge cases.

Official fixtures (tests/fixtures/official/): `tokenizer_toy` holds the official `HoneybeeTokenizerMixin` output on a
toy Llama sentencepiece model (the same bytes as assets/toy_spm.model) with 5 placeholders per image, written as -1;
`image_preprocess_224` holds the official `DefaultProcessor` output for a 263x147 uint8 image.
"""

import io
import json
import re
import uuid

import numpy as np
import pytest
import sentencepiece
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from honeybee_hf.convert.official import official_image_processor
from honeybee_hf.hub.folder import save_hub_folder
from honeybee_hf.image_loading_honeybee import load_rgb_image
from honeybee_hf.processing_honeybee import AI, HUMAN, SYSTEM_PROMPT, HoneybeeProcessor
from honeybee_hf.testing_utils import TOY_SPM, tiny_config, tiny_model, tiny_processor
from utils import OFFICIAL_FIXTURES as FIXTURES
from utils import PHOTO_DIR, TF4, official_messages, training_inputs

NUM_QUERY, NUM_EOS = 4, 1  # 5 placeholders per image, as the fixture; num_eos_tokens != 0 on purpose
MEAN, STD = np.array(OPENAI_CLIP_MEAN, np.float32), np.array(OPENAI_CLIP_STD, np.float32)

# Strings where a re-implementation of sentencepiece's legacy front end usually slips.
TRICKY = [
    "hello world",
    " leading space",
    "  two leading spaces",
    "double  space",
    "trailing space ",
    "trailing  ",
    " ",
    "   ",
    "",
    "a\nb",
    "\n",
    "\n\nHuman: x",
    "line\n\n",
    "tab\tsep",
    "\r\n",
    "café naïve ÀÉÎõü",
    "emoji 🐝 bee 🍯",
    "中文字",
    "zero\u200bwidth",
    "12345 678.90",
    "3.14159",
    "2024-01-01",
    "!?.,;:'\"()[]{}",
    "x<y>z",
    "$100 & 50% #1 @a",
    "▁already",
    "CamelCaseWord",
    "What is in the image?",
]
SPECIAL_IN_TEXT = ["<s> not special", "</s>", "a</s>b", "<unk>", "x <s>y"]


# ---------------------------------------------------------------------------------------------------------------
# helpers


def fixture(name):
    return json.loads((FIXTURES / f"{name}.json").read_text()), load_file(str(FIXTURES / f"{name}.safetensors"))


@pytest.fixture(scope="module")
def processor():
    return tiny_processor(tiny_config(num_query_tokens=NUM_QUERY, num_eos_tokens=NUM_EOS))


@pytest.fixture(scope="module")
def spm():
    return sentencepiece.SentencePieceProcessor(model_file=str(TOY_SPM))


@pytest.fixture(scope="module")
def toy():
    return fixture("tokenizer_toy")


def photo(seed=0, size=(30, 20)):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def official_ids(tensor, processor):
    ids = tensor.clone()
    ids[ids == -1] = processor.image_token_id
    return ids


def labels_of(ids, mask):
    return [i if m else -100 for i, m in zip(ids, mask)]


def runs(ids, token):
    """Lengths of the runs of `token` in `ids`."""
    return [len(m) for m in re.findall(r"x+", "".join("x" if i == token else "." for i in ids))]


def reference_pixels(image, size):
    """The official preprocessing written out: squash-resize (PIL bicubic), /255, CLIP mean/std; (3, S, S)."""
    x = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), np.float32) / 255
    return torch.from_numpy(((x - MEAN) / STD).transpose(2, 0, 1))


def official_encode(spm, prompt, num_visual_tokens, image_id):
    """The official `HoneybeeTokenizerMixin.encode_prompt` on raw sentencepiece: ids and loss mask."""
    ids, mask = [spm.bos_id()], [0]
    chunks = [c for c in re.split(f"({re.escape('<image>')}|{re.escape(AI)}|{re.escape(HUMAN)})", prompt) if c]
    for i, chunk in enumerate(chunks):
        if chunk == "<image>":
            ids, mask = ids + [image_id] * num_visual_tokens, mask + [0] * num_visual_tokens
            continue
        label = int(i > 0 and chunks[i - 1] == AI)
        piece = spm.encode(chunk) + [spm.eos_id()] * label
        ids, mask = ids + piece, mask + [label] * len(piece)
    return ids, mask


def pixel_values_of(processor, image):
    return processor(images=[image], return_tensors="pt")["pixel_values"][0]


# ---------------------------------------------------------------------------------------------------------------
# 1. tokenisation parity


@pytest.mark.parametrize("case", range(5))
def test_prompts_and_chat_messages_match_official(processor, toy, case):
    """Each official case as the official code takes it (the prompt, written by hand: inference leaves a final answer
    open, `no_eos=True`) and as a chat client sends it (messages: training ids and labels, `no_eos=False`)."""
    meta, tensors = toy
    assert meta["num_visual_tokens"] == processor.num_visual_tokens
    prompt = meta["cases"][case]["prompt"]
    images = [photo(i) for i in range(prompt.count("<image>"))]
    expected = official_ids(tensors[f"case{case}.input_ids"], processor).tolist()
    messages, open_turn = official_messages(prompt, images)
    ids = processor(text=prompt, images=images or None)["input_ids"][0]
    assert ids == (expected if open_turn else expected[:-1])
    out = training_inputs(processor, messages, add_generation_prompt=open_turn)
    assert out["input_ids"][0].tolist() == expected and len(expected) == meta["cases"][case]["seq_length"]
    assert out["labels"][0].tolist() == tensors[f"case{case}.labels"].tolist()


@pytest.mark.parametrize("batch", ["batch_left", "batch_right"])
def test_batches_match_official(processor, toy, batch):
    meta, tensors = toy
    spec = meta[batch]
    prompts = [meta["cases"][i]["prompt"] for i in spec["prompts"]]
    images = [photo(i) for i in range(sum(p.count("<image>") for p in prompts))]
    pictures = iter(images)
    chats = [official_messages(p, [next(pictures) for _ in range(p.count("<image>"))]) for p in prompts]
    conversations, (open_turn, *_) = zip(*chats)
    if batch == "batch_left":  # official inference: padding_side="left", no_eos=True; ours by default
        out = processor(text=prompts, images=images, return_tensors="pt")
        labels = training_inputs(processor, list(conversations), "left", add_generation_prompt=open_turn)["labels"]
    else:  # official training batch: padding_side="right", no_eos=False
        out = training_inputs(processor, list(conversations), "right")
        labels = out["labels"]
    assert set(out) >= {"input_ids", "attention_mask", "pixel_values"} and "token_type_ids" not in out
    assert torch.equal(out["input_ids"], official_ids(tensors[f"{batch}.input_ids"], processor))
    assert torch.equal(out["attention_mask"], tensors[f"{batch}.attention_mask"])
    assert torch.equal(labels, tensors[f"{batch}.labels"])
    assert out["attention_mask"].sum(1).tolist() == tensors[f"{batch}.seq_length"].tolist()
    assert out["pixel_values"].shape == (len(images), 3, 32, 32)


def test_final_answer_eos_follows_official_no_eos(processor, toy):
    """Official inference (no_eos=True) drops only a final `</s>`; inner answers keep theirs; a `</s>` written by
    hand stays."""
    meta, tensors = toy
    eos = processor.tokenizer.eos_token_id
    answered = meta["cases"][2]["prompt"]  # ends with "\nAI: A dog lying on the floor."
    full = official_ids(tensors["case2.input_ids"], processor).tolist()
    assert full[-1] == eos
    assert processor(text=answered, images=[photo()])["input_ids"][0] == full[:-1]
    assert processor(text=answered + "</s>", images=[photo()])["input_ids"][0] == full
    multi_turn = processor(text=meta["cases"][4]["prompt"])["input_ids"][0]  # "...AI: No</s>\nHuman: ...\nAI: "
    assert multi_turn == tensors["case4.input_ids"].tolist() and eos in multi_turn


def plain_ids(tokenizer, text, **kwargs):
    return tokenizer(text, add_special_tokens=False, **kwargs)["input_ids"]


@pytest.mark.parametrize("text", TRICKY)
def test_tokenizer_matches_sentencepiece(processor, spm, text):
    """`processor.tokenizer`, the one tokenizer every collator calls, is sentencepiece's legacy Llama tokenisation."""
    assert plain_ids(processor.tokenizer, text) == spm.encode(text)
    assert processor.tokenizer(text)["input_ids"] == [spm.bos_id()] + spm.encode(text)


def test_prompts_and_chat_messages_match_sentencepiece_reference(processor, spm):
    """The whole official algorithm on raw sentencepiece, with tricky text in every slot of the prompt: the prompt
    written by hand (ids; a final answer left open for generation) and the same turns as chat messages (ids and
    labels)."""
    image_id = processor.image_token_id
    for text in TRICKY:
        answer = text if text.strip() else f"{text}x"  # an empty answer is no assistant turn
        for prompt in [
            f"{SYSTEM_PROMPT}{HUMAN}<image>{HUMAN}{text}{AI}",
            f"{text}{HUMAN}<image>{text}<image>{HUMAN}{text}{AI}{text}{HUMAN}{text}{AI}",
            f"{text}{HUMAN}<image>{HUMAN}{text}{AI}{answer}{HUMAN}{text}{AI}{answer}",
            f"[NO_PROMPT] <image> {answer}",
        ]:
            images = [photo(i) for i in range(prompt.count("<image>"))]
            ids, mask = official_encode(spm, prompt, processor.num_visual_tokens, image_id)
            if prompt.startswith("[NO_PROMPT]"):  # <s> <image> caption </s>, loss on caption and </s>
                caption = spm.encode(prompt[len("[NO_PROMPT] <image> ") :])
                ids, mask = [1] + [image_id] * 5 + caption + [2], [0] * 6 + [1] * (len(caption) + 1)
            inference = ids[:-1] if mask[-1] else ids  # a final answer is left open
            assert processor(text=prompt, images=images)["input_ids"][0] == inference, prompt
            if "<image>" + text + "<image>" in prompt:  # no chat message puts text between two images of a turn
                continue
            messages, open_turn = official_messages(prompt, images)
            out = training_inputs(processor, messages, add_generation_prompt=open_turn)
            assert out["input_ids"][0].tolist() == ids and out["labels"][0].tolist() == labels_of(ids, mask), prompt


@pytest.fixture(scope="module")
def whitespace_vocab(tmp_path_factory):
    """A sentencepiece BPE model whose vocabulary merges runs of spaces (`▁▁`, `▁▁▁`), as Llama's does (the toy one
    does not): BPE over a whole rendered prompt would merge a marker's trailing `▁` with the next piece's dummy
    prefix, where the official code tokenises the two apart."""
    rng = np.random.RandomState(0)
    words = "the a cat dog Human: AI: What is in image picture answer question brief helpful".split()
    lines = [rng.choice([" ", "  ", "   "]).join(rng.choice(words, 8)) for _ in range(400)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        split_by_whitespace=False,
        normalization_rule_name="identity",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("whitespace_vocab") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def test_rendered_prompts_give_official_ids_with_a_vocabulary_that_merges_spaces(processor, whitespace_vocab):
    from honeybee_hf.convert.tokenizer import load_backend, save_tokenizer_files

    spm = sentencepiece.SentencePieceProcessor(model_file=str(whitespace_vocab))
    assert spm.piece_to_id("▁▁") != spm.unk_id()
    folder = whitespace_vocab.parent / "files"
    folder.mkdir()
    save_tokenizer_files(load_backend(whitespace_vocab), folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    proc = HoneybeeProcessor(
        processor.image_processor,
        tokenizer,
        chat_template=processor.chat_template,
        num_query_tokens=NUM_QUERY,
        num_eos_tokens=NUM_EOS,
    )
    image_id = proc.image_token_id
    for text in ["What is in the image?", " a  cat ", "  What", "dog\n", "Human: AI:"]:
        messages = [
            user({"type": "image"}, {"type": "text", "text": text}),
            {"role": "assistant", "content": text},
            user({"type": "text", "text": text}),
        ]
        official_prompt = f"{SYSTEM_PROMPT}{HUMAN}<image>{HUMAN}{text}{AI}{text}{HUMAN}{text}{AI}"
        ids, _ = official_encode(spm, official_prompt, proc.num_visual_tokens, image_id)
        rendered = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert tokenizer_ids(proc, rendered) == ids, repr(text)
        assert proc(text=official_prompt, images=[photo()])["input_ids"][0] == ids, repr(text)
    tokenizer.backend_tokenizer.pre_tokenizer = None  # without the role-marker pieces, BPE merges across them
    assert tokenizer_ids(proc, rendered) != ids


@pytest.mark.parametrize("text", SPECIAL_IN_TEXT)
def test_special_token_text_is_split_as_slow_llama(processor, spm, text):
    """The slow tokenizer splits `<s>`, `</s>`, `<unk>` out of the text and runs sentencepiece on each piece."""
    expected = []
    for piece in (p for p in re.split("(<s>|</s>|<unk>)", text) if p):
        expected += [spm.piece_to_id(piece)] if piece in ("<s>", "</s>", "<unk>") else spm.encode(piece)
    assert plain_ids(processor.tokenizer, text) == expected


@pytest.mark.skipif(not TF4, reason="transformers 5 has no slow sentencepiece LlamaTokenizer")
def test_tokenizer_matches_slow_legacy_llama_tokenizer(processor):
    """The class the official code loads: slow `LlamaTokenizer(legacy=True)`, chunks with add_special_tokens=False."""
    slow = transformers.LlamaTokenizer(str(TOY_SPM), legacy=True)
    for text in TRICKY + SPECIAL_IN_TEXT + [HUMAN, AI, SYSTEM_PROMPT]:
        assert plain_ids(processor.tokenizer, text) == slow.encode(text, add_special_tokens=False), text


# ---------------------------------------------------------------------------------------------------------------
# 2. image preprocessing parity


def test_image_preprocessing_matches_official(processor):
    meta, tensors = fixture("image_preprocess_224")
    size = meta["image_size"]
    big = HoneybeeProcessor(
        official_image_processor(size),
        processor.tokenizer,
        chat_template=processor.chat_template,
        num_query_tokens=NUM_QUERY,
        num_eos_tokens=NUM_EOS,
    )
    array = tensors["image_uint8_hwc"].numpy()
    expected = tensors["pixel_values"]
    for image in [Image.fromarray(array), array, torch.from_numpy(array)]:
        out = big(images=[image], text="What is in the image?", return_tensors="pt")["pixel_values"]
        assert out.shape == (1, 3, size, size) and out.dtype == torch.float32
        diff = (out[0] - expected).abs().max().item()
        print(f"official pixel_values max abs diff ({type(image).__name__}): {diff:.3g}")
        assert diff <= 1e-5
    assert torch.equal(big(images=Image.fromarray(array), return_tensors="pt")["pixel_values"][0], out[0])


@pytest.mark.parametrize("size", [(1, 1), (5, 1), (1, 5), (7, 3), (3, 3), (3, 7), (263, 147)])
def test_odd_image_sizes(processor, size):
    """Every size, including a 1x1 image and heights of 1 or 3 (which transformers 4 took for channel axes)."""
    image = photo(1, size)
    pixels = pixel_values_of(processor, image)
    assert pixels.shape == (3, 32, 32) and torch.isfinite(pixels).all()
    assert (pixels - reference_pixels(image, 32)).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# 3. chat template


def user(*content):
    return {"role": "user", "content": list(content)}


def tokenizer_ids(processor, rendered):
    """What vLLM, TRL and chat clients do with a rendered prompt: the plain tokenizer, `<image>` expanded."""
    expanded = rendered.replace("<image>", "<image>" * processor.num_visual_tokens)
    return processor.tokenizer(expanded, add_special_tokens=False)["input_ids"]


def test_chat_template_renders_official_prompts(processor, toy):
    """The official prompts, with the `<s>` the official tokenizer adds, the `</s>` it ends each answer with and a
    space where it tokenises a piece with sentencepiece's dummy prefix written out, so that the plain tokenizer on
    the rendering (TRL's, vLLM's) gives the official ids."""
    meta, tensors = toy
    question = [user({"type": "image"}, {"type": "text", "text": "What is in the image?"})]
    rendered = processor.apply_chat_template(question, add_generation_prompt=True, tokenize=False)
    assert rendered == f"<s>{SYSTEM_PROMPT} \nHuman: <image>\nHuman:  What is in the image? \nAI: "
    assert tokenizer_ids(processor, rendered) == official_ids(tensors["case0.input_ids"], processor).tolist()

    custom = [{"role": "system", "content": "Be brief."}, *question]
    assert processor.apply_chat_template(custom, add_generation_prompt=True, tokenize=False) == (
        "<s>Be brief. \nHuman: <image>\nHuman:  What is in the image? \nAI: "
    )
    custom[0]["content"] = [{"type": "text", "text": "Be brief."}]
    rendered = processor.apply_chat_template(custom, add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<s>Be brief. \nHuman: ")

    history = question + [
        {"role": "assistant", "content": [{"type": "text", "text": "A dog."}]},
        user({"type": "text", "text": "What color is it?"}),
    ]
    assert processor.apply_chat_template(history, add_generation_prompt=True, tokenize=False) == (
        f"<s>{SYSTEM_PROMPT} \nHuman: <image>\nHuman:  What is in the image? \nAI:  A dog.</s>"
        "\nHuman:  What color is it? \nAI: "
    )
    text_only = [  # the official multi-turn, text-only fixture prompt; plain-string contents
        {"role": "user", "content": "Is there a cat?"},
        {"role": "assistant", "content": "No"},
        {"role": "user", "content": "Explain why this meme is funny."},
    ]
    rendered = processor.apply_chat_template(text_only, add_generation_prompt=True, tokenize=False)
    assert tokenizer_ids(processor, rendered) == tensors["case4.input_ids"].tolist()
    assert not processor.apply_chat_template(text_only, tokenize=False).endswith("\nAI: ")  # no generation prompt

    answered = question + [{"role": "assistant", "content": meta["cases"][2]["prompt"].split(AI)[-1]}]
    rendered = processor.apply_chat_template(answered, tokenize=False)
    assert tokenizer_ids(processor, rendered) == official_ids(tensors["case2.input_ids"], processor).tolist()


def test_chat_template_tokenized_equals_processor(processor, toy):
    meta, tensors = toy
    image = photo(3)
    messages = [user({"type": "image", "image": image}, {"type": "text", "text": "What is in the image?"})]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    out = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    direct = processor(text=rendered, images=[image], return_tensors="pt")
    assert "token_type_ids" not in out
    assert torch.equal(out["input_ids"], direct["input_ids"])
    assert torch.equal(out["attention_mask"], direct["attention_mask"])
    assert torch.equal(out["pixel_values"], direct["pixel_values"])
    assert out["input_ids"][0].tolist() == official_ids(tensors["case0.input_ids"], processor).tolist()


# ---------------------------------------------------------------------------------------------------------------
# 4. prompt building, image pairing, padding


def test_bare_question_is_wrapped(processor):
    a, b = photo(0), photo(1)
    cases = [
        ("What?", [a], f"{SYSTEM_PROMPT}{HUMAN}<image>{HUMAN}What?{AI}"),
        ("What?", [a, b], f"{SYSTEM_PROMPT}{HUMAN}<image>{HUMAN}<image>{HUMAN}What?{AI}"),
        ("", [a], f"{SYSTEM_PROMPT}{HUMAN}<image>{AI}"),  # captioning with no question
        ("What is the capital of France?", None, f"{SYSTEM_PROMPT}{HUMAN}What is the capital of France?{AI}"),
    ]
    for text, images, prompt in cases:
        out = processor(text=text, images=images)
        assert out["input_ids"][0] == processor(text=prompt, images=images)["input_ids"][0], (text, prompt)
        assert ("pixel_values" in out) == bool(images)
    single = processor(text="What?", images=a, return_tensors="pt")  # one image, not in a list
    assert torch.equal(single["pixel_values"], processor(text="What?", images=[a], return_tensors="pt")["pixel_values"])


def test_images_are_paired_with_texts_in_order(processor):
    imgs = [photo(i) for i in range(4)]
    alone = [pixel_values_of(processor, im) for im in imgs]
    per_image = processor.num_query_tokens + processor.num_eos_tokens
    image_id = processor.image_token_id

    full = ["One\nHuman: <image>\nAI: ", "Two\nHuman: <image> and <image>\nAI: ", "None\nHuman: hi\nAI: ", "<image>"]
    out = processor(text=full, images=imgs, return_tensors="pt")  # flat list, consumed in prompt order
    assert [(row == image_id).sum().item() for row in out["input_ids"]] == [per_image, 2 * per_image, 0, per_image]
    assert all(torch.equal(out["pixel_values"][i], alone[i]) for i in range(4))

    nested = processor(
        text=["first", "second", "third"], images=[[imgs[0]], [imgs[1], imgs[2]], []], return_tensors="pt"
    )
    assert [(row == image_id).sum().item() for row in nested["input_ids"]] == [per_image, 2 * per_image, 0]
    assert nested["pixel_values"].shape[0] == 3
    assert all(torch.equal(nested["pixel_values"][i], alone[i]) for i in range(3))
    third = processor(text=f"{SYSTEM_PROMPT}{HUMAN}third{AI}")["input_ids"][0]  # no images: wrapped without <image>
    assert nested["input_ids"][2, -len(third) :].tolist() == third

    flat = processor(text=["first", "second"], images=[imgs[0], imgs[1]], return_tensors="pt")  # one image per text
    assert [(row == image_id).sum().item() for row in flat["input_ids"]] == [per_image, per_image]

    text_only = processor(text=["Say hello.", "What is two plus two?"], return_tensors="pt")
    assert "pixel_values" not in text_only and not (text_only["input_ids"] == image_id).any()


@pytest.mark.parametrize("num_query_tokens,num_eos_tokens", [(NUM_QUERY, NUM_EOS), (9, 0), (144, 1)])
def test_image_token_expansion(processor, num_query_tokens, num_eos_tokens):
    proc = HoneybeeProcessor(
        processor.image_processor, processor.tokenizer, num_query_tokens=num_query_tokens, num_eos_tokens=num_eos_tokens
    )
    prompt = "Two images\nHuman: <image>\nHuman: between <image>\nHuman: Compare them.\nAI: "
    ids = proc(text=prompt, images=[photo(0), photo(1)])["input_ids"][0]
    assert runs(ids, proc.image_token_id) == [num_query_tokens + num_eos_tokens] * 2
    assert proc.num_visual_tokens == num_query_tokens + num_eos_tokens


def test_outputs_and_padding(processor):
    texts = ["Short?", "A much longer question about the picture, with many more words in it?"]
    images = [photo(0), photo(1)]
    for kwargs in [{}, {"return_tensors": "pt"}, {"padding_side": "right"}, {"text_kwargs": {"padding": True}}]:
        assert "token_type_ids" not in processor(text=texts, images=images, **kwargs)
    assert processor.model_input_names == ["input_ids", "attention_mask", "pixel_values"]

    left = processor(text=texts, images=images, return_tensors="pt")
    assert processor.tokenizer.padding_side == "left"
    pad = int((left["attention_mask"][0] == 0).sum())
    assert pad > 0 and left["attention_mask"][0, :pad].eq(0).all() and left["attention_mask"][0, pad:].eq(1).all()
    assert left["input_ids"][0, :pad].eq(processor.tokenizer.pad_token_id).all() and left["input_ids"][0, pad] == 1

    right = processor(text=texts, images=images, return_tensors="pt", padding_side="right")
    assert right["attention_mask"][0, -pad:].eq(0).all()
    assert torch.equal(right["input_ids"][0, : right["input_ids"].shape[1] - pad], left["input_ids"][0, pad:])

    fixed = processor(text=texts, images=images, return_tensors="pt", padding="max_length", max_length=100)
    assert fixed["input_ids"].shape == (2, 100)


# ---------------------------------------------------------------------------------------------------------------
# 5. bad input


def test_placeholder_and_image_count_mismatches(processor):
    two = "X\nHuman: <image>\nHuman: <image>\nAI: "
    with pytest.raises(ValueError, match="give exactly one image per <image>"):
        processor(text=two, images=[photo()])  # more <image> than images
    with pytest.raises(ValueError, match="give exactly one image per <image>"):
        processor(text="X\nHuman: <image>\nAI: ", images=[photo(0), photo(1)])  # fewer
    with pytest.raises(ValueError, match="0 images were given"):
        processor(text="X\nHuman: <image>\nAI: ")  # placeholders, no images
    with pytest.raises(ValueError, match="give one list per text"):
        processor(text=["a", "b"], images=[[photo()]])
    with pytest.raises(ValueError, match="pass one list of images per text"):
        processor(text=["a", "b", "c"], images=[photo(0), photo(1)])
    with pytest.raises(ValueError, match="holds 2 <image> tokens but 1 images"):
        processor(text=[two, "b"], images=[[photo()], [photo()]])
    with pytest.raises(TypeError, match="list of strings"):
        processor(text=[1, 2])
    with pytest.raises(ValueError, match="give images, text, or both"):
        processor()


def test_truncation_never_cuts_image_placeholders(processor):
    prompt = f"{SYSTEM_PROMPT}{HUMAN}<image>{HUMAN}What is in the image?{AI}"
    ids = processor(text=prompt, images=[photo()])["input_ids"][0]
    length, image_end = len(ids), max(i for i, t in enumerate(ids) if t == processor.image_token_id) + 1
    with pytest.raises(ValueError, match="raise max_length or shorten the text"):
        processor(text=prompt, images=[photo()], truncation=True, max_length=image_end - 1)
    cut = processor(text=prompt, images=[photo()], truncation=True, max_length=image_end)["input_ids"][0]
    assert len(cut) == image_end < length and runs(cut, processor.image_token_id) == [processor.num_visual_tokens]
    assert len(processor(text="a b c d e f g h i j", truncation=True, max_length=5)["input_ids"][0]) == 5


def palette_image():
    image = Image.new("P", (2, 2), 0)
    image.putpalette([10, 20, 30] * 256)
    return image


@pytest.mark.parametrize(
    "make,rgb",
    [
        (lambda: Image.new("L", (2, 2), 77), (77, 77, 77)),
        (lambda: Image.new("LA", (2, 2), (77, 0)), (77, 77, 77)),
        (lambda: Image.new("RGBA", (2, 2), (10, 20, 30, 0)), (10, 20, 30)),  # alpha dropped, not composited
        (lambda: Image.new("CMYK", (2, 2), (255, 0, 0, 0)), (0, 255, 255)),
        (lambda: Image.new("1", (2, 2), 1), (255, 255, 255)),
        (palette_image, (10, 20, 30)),
    ],
    ids=["L", "LA", "RGBA", "CMYK", "1", "P"],
)
def test_modes_convert_to_rgb_as_official(processor, make, rgb):
    image = make()
    converted = load_rgb_image(image)
    assert converted.mode == "RGB" and np.asarray(converted).reshape(-1, 3).tolist() == [list(rgb)] * 4
    assert converted.tobytes() == image.convert("RGB").tobytes()  # the official load_image: .convert("RGB")
    assert torch.equal(pixel_values_of(processor, image), pixel_values_of(processor, image.convert("RGB")))


def test_grayscale_pixels_have_equal_channels(processor):
    gray = Image.fromarray(np.random.RandomState(0).randint(0, 256, (20, 30), dtype=np.uint8))
    raw = pixel_values_of(processor, gray) * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
    assert (raw[0] - raw[1]).abs().max() < 1e-5 and (raw[0] - raw[2]).abs().max() < 1e-5


def test_16_bit_images_scale_to_8_bits(processor, tmp_path):
    values = np.array([[65535, 25600], [0, 256]], dtype=np.uint16)
    expected = [[255, 100], [0, 1]]
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    big_endian = Image.frombytes("I;16B", (2, 2), values.astype(">u2").tobytes())
    for image in [Image.fromarray(values), big_endian, path, str(path)]:
        rgb = np.asarray(load_rgb_image(image))
        assert rgb[..., 0].tolist() == expected and (rgb == rgb[..., :1]).all(), image
    assert pixel_values_of(processor, path).shape == (3, 32, 32)


def test_16_bit_images_keep_their_exif_orientation(tmp_path):
    values = (np.arange(12, dtype=np.uint16).reshape(3, 4) + 1) * 5000
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(values).save(tmp_path / "turned.png", exif=exif.tobytes())
    rgb = np.asarray(load_rgb_image(tmp_path / "turned.png"))
    assert rgb[..., 0].tolist() == (np.rot90(values, k=-1) >> 8).tolist()


@pytest.mark.parametrize("mode", ["I", "F"])
def test_32_bit_modes_raise(processor, mode):
    with pytest.raises(ValueError, match="convert it to an 8-bit RGB image yourself"):
        processor(text="What?", images=[Image.new(mode, (4, 4))])


def test_one_pixel_image(processor):
    pixels = processor(text="What?", images=[Image.new("RGB", (1, 1), (200, 100, 50))], return_tensors="pt")[
        "pixel_values"
    ]
    assert pixels.shape == (1, 3, 32, 32) and torch.isfinite(pixels).all()
    expected = (np.array([200, 100, 50], np.float32) / 255 - MEAN) / STD
    assert torch.allclose(pixels[0], torch.from_numpy(expected)[:, None, None].expand(3, 32, 32), atol=1e-5)


def test_unreadable_files_raise_value_error(processor, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    buffer = io.BytesIO()
    photo(0, (64, 64)).save(buffer, "JPEG")
    truncated = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    (tmp_path / "truncated.jpg").write_bytes(truncated)
    for source, name in [
        (corrupt, "corrupt.png"),
        (str(tmp_path / "truncated.jpg"), "truncated.jpg"),
        (truncated, "<bytes>"),
    ]:
        with pytest.raises(ValueError, match=f"cannot read image .*{re.escape(name)}.*valid JPEG/PNG/WebP"):
            processor(text="What?", images=[source])
    with pytest.raises(ValueError, match="missing.png does not exist"):
        processor(text="What?", images=[tmp_path / "missing.png"])


def test_decompression_bomb_raises_value_error(processor, tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 px > 2x the limit: DecompressionBombError
    with pytest.raises(ValueError, match="huge.png is too large to decode safely.*downscale it first"):
        processor(text="What?", images=[path])


@pytest.mark.parametrize(
    "array",
    [np.zeros((4, 4, 3), np.float32), torch.zeros(4, 4, 3), np.zeros((3, 4, 4), np.uint8), np.zeros((4, 4), np.uint8)],
    ids=["float-numpy", "float-torch", "chw-uint8", "2d-uint8"],
)
def test_bad_arrays_raise(processor, array):
    with pytest.raises(ValueError, match=r"uint8 of shape \(height, width, 3\).*pass a PIL image"):
        processor(text="What?", images=[array])


def test_unknown_image_type_raises(processor):
    with pytest.raises(TypeError, match="expected a PIL image, a path, bytes or a uint8 array"):
        processor(text="What?", images=[42])


# ---------------------------------------------------------------------------------------------------------------
# 6. Hub folder round trip


def test_processor_round_trip_through_hub_folder(processor, tmp_path):
    config = tiny_config(num_query_tokens=NUM_QUERY, num_eos_tokens=NUM_EOS)
    folder = tmp_path / f"hb_processor_roundtrip_{uuid.uuid4().hex[:8]}"  # dynamic modules are cached by basename
    save_hub_folder(tiny_model(config), processor, folder)
    loaded = AutoProcessor.from_pretrained(folder, trust_remote_code=True)

    assert type(loaded).__name__ == "HoneybeeProcessor" and type(loaded).__module__.startswith("transformers_modules")
    assert (loaded.num_query_tokens, loaded.num_eos_tokens, loaded.image_token) == (NUM_QUERY, NUM_EOS, "<image>")
    assert loaded.image_token_id == processor.image_token_id
    assert loaded.tokenizer.padding_side == "left" and loaded.chat_template == processor.chat_template

    texts = ["What is this?", "Two\nHuman: <image>\nHuman: <image>\nAI: ", "Text only, with  double spaces 🐝"]
    images = [[photo(0)], [photo(1), photo(2, (7, 3))], []]
    for kwargs in [{}, {"padding_side": "right"}]:
        ours = processor(text=texts, images=images, return_tensors="pt", **kwargs)
        theirs = loaded(text=texts, images=images, return_tensors="pt", **kwargs)
        assert set(ours) == set(theirs)
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), key
    for text in TRICKY:
        assert plain_ids(loaded.tokenizer, text) == plain_ids(processor.tokenizer, text)
    messages = [user({"type": "image"}, {"type": "text", "text": "What?"})]
    assert loaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
        processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    )


def test_official_none_image_style_and_missing_files():
    config = tiny_config()
    processor = tiny_processor(config)
    image = Image.open(PHOTO_DIR / "ca.jpeg")
    batch = processor(text=["Say hello.", "What is it?"], images=[None, image], return_tensors="pt")
    alone = processor(text="What is it?", images=image, return_tensors="pt")
    assert batch["pixel_values"].shape[0] == 1
    assert batch["input_ids"][1, -alone["input_ids"].shape[1] :].tolist() == alone["input_ids"][0].tolist()
    with pytest.raises(ValueError, match="does not exist"):
        processor(text="What is it?", images=str(PHOTO_DIR / "no_such_photo.jpeg"))


def test_image_processor_keeps_the_official_pil_resize():
    """transformers 5 resizes with torchvision when it is installed; the processor pins PIL's bicubic."""
    processor = tiny_processor(tiny_config())
    assert type(processor.image_processor).__name__ in ("CLIPImageProcessor", "CLIPImageProcessorPil")
    assert "Pil" in type(processor.image_processor).__name__ or TF4


# ---------------------------------------------------------------------------------------------------------------
# 7. one tokenizer, in the files


def hub_folder(tmp_path, processor, stem):
    folder = tmp_path / f"{stem}_{uuid.uuid4().hex[:8]}"  # dynamic modules are cached by basename
    save_hub_folder(tiny_model(tiny_config(num_query_tokens=NUM_QUERY, num_eos_tokens=NUM_EOS)), processor, folder)
    return folder


def test_tokenizer_files_load_as_written(processor, spm, tmp_path):
    """`PreTrainedTokenizerFast` files: a plain `AutoTokenizer` (no processor involved) is sentencepiece."""
    folder = hub_folder(tmp_path, processor, "hb_tokenizer_files")
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    for text in TRICKY + SPECIAL_IN_TEXT:
        assert plain_ids(tokenizer, text) == plain_ids(processor.tokenizer, text), text
    for text in TRICKY:
        assert plain_ids(tokenizer, text) == spm.encode(text), text
    assert "token_type_ids" not in tokenizer("a b") and tokenizer.padding_side == "left"


def test_several_chat_templates_save_and_load(processor, tmp_path):
    """A dict of named templates, as the library's processors allow: the default in chat_template.jinja, the others
    in additional_chat_templates/, which both versions' loaders read."""
    templates = {"default": processor.chat_template, "plain": "{{ bos_token }}{{ messages[0]['content'] }}"}
    several = HoneybeeProcessor(
        processor.image_processor,
        processor.tokenizer,
        chat_template=templates,
        num_query_tokens=NUM_QUERY,
        num_eos_tokens=NUM_EOS,
    )
    folder = hub_folder(tmp_path, several, "hb_chat_templates")
    assert (folder / "additional_chat_templates" / "plain.jinja").read_text() == templates["plain"]
    loaded = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert loaded.chat_template == templates
    messages = [{"role": "user", "content": "hi"}]
    assert loaded.apply_chat_template(messages, chat_template="plain") == "<s>hi"
    assert loaded.apply_chat_template(messages, add_generation_prompt=True) == (
        processor.apply_chat_template(messages, add_generation_prompt=True)
    )


def test_a_processor_without_chat_template_saves_and_loads(processor, tmp_path):
    """Built from parts without a template (HoneybeeProcessor has no default, as LLaVA's): saved without
    chat_template.jinja, loaded without one; it tokenizes official-format prompts as the processor with the template
    does, and a bare question, which only a template can wrap, is refused."""
    bare = HoneybeeProcessor(
        processor.image_processor, processor.tokenizer, num_query_tokens=NUM_QUERY, num_eos_tokens=NUM_EOS
    )
    folder = hub_folder(tmp_path, bare, "hb_no_template")
    assert not list(folder.rglob("*.jinja"))
    loaded = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert loaded.chat_template is None
    prompt = f"{SYSTEM_PROMPT}{HUMAN}<image>{HUMAN}What?{AI}"
    assert loaded(text=prompt, images=[photo()])["input_ids"] == processor(text=prompt, images=[photo()])["input_ids"]
    with pytest.raises(ValueError, match="chat template"):
        loaded(text="What?", images=[photo()])


def test_chat_template_names_cannot_leave_the_folder(processor, tmp_path):
    """A template's name becomes a file name under additional_chat_templates/: one with a path in it is refused
    before anything is written (as the library's processors refuse it), never written outside the folder."""
    for name in ("../../escaped", "sub/dir", "..", ""):
        bad = HoneybeeProcessor(
            processor.image_processor,
            processor.tokenizer,
            chat_template={"default": processor.chat_template, "plain": "{{ bos_token }}", name: "x"},
            num_query_tokens=NUM_QUERY,
            num_eos_tokens=NUM_EOS,
        )
        with pytest.raises(ValueError, match=f"invalid chat template name {re.escape(repr(name))}"):
            bad.save_pretrained(tmp_path / "root" / "saved")
        assert not any((tmp_path / "root").rglob("*.jinja")) and not list(tmp_path.glob("*.jinja"))


def test_processor_kwargs_are_honeybees(processor):
    """What transformers' generic code reads to route and check options (its processor tests do)."""
    from honeybee_hf.processing_honeybee import HoneybeeProcessorKwargs

    assert type(processor).valid_processor_kwargs is HoneybeeProcessorKwargs


# ---------------------------------------------------------------------------------------------------------------
# 8. call-time options


def unnormalized_pixels(image, size=32):
    x = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), np.float32) / 255
    return torch.from_numpy(x.transpose(2, 0, 1))


def test_call_time_image_options_take_effect(processor):
    image = photo(4)
    expected = unnormalized_pixels(image)
    for kwargs in [{"do_normalize": False}, {"images_kwargs": {"do_normalize": False}}]:
        pixels = processor(text="What?", images=[image], return_tensors="pt", **kwargs)["pixel_values"][0]
        assert (pixels - expected).abs().max() < 1e-5, kwargs
    alone = processor(images=[image], do_normalize=False, return_tensors="pt")["pixel_values"][0]
    assert (alone - expected).abs().max() < 1e-5
    normalized = processor(text="What?", images=[image], return_tensors="pt")["pixel_values"][0]
    assert (normalized - reference_pixels(image, 32)).abs().max() < 1e-5
    rescaled = processor(images=[image], images_kwargs={"rescale_factor": -1.0}, return_tensors="pt")["pixel_values"]
    assert rescaled.mean() < -1


def test_call_time_text_options_take_effect(processor):
    texts = ["Short?", "A longer question about the picture?"]
    default = processor(text=texts, return_tensors="pt")
    fixed = processor(text=texts, text_kwargs={"padding": "max_length", "max_length": 90}, return_tensors="pt")
    assert fixed["input_ids"].shape == (2, 90)
    multiple = processor(text=texts, pad_to_multiple_of=64, return_tensors="pt")["input_ids"]
    assert multiple.shape[1] == 64 * -(-default["input_ids"].shape[1] // 64) > default["input_ids"].shape[1]
    assert "attention_mask" not in processor(text=texts, return_attention_mask=False)
    assert processor(text=texts, return_length=True)["length"] == default["attention_mask"].sum(1).tolist()
    unpadded = processor(text=texts, padding=False)["input_ids"]
    assert [len(row) for row in unpadded] == default["attention_mask"].sum(1).tolist()
    no_bos = processor(text="What?", add_special_tokens=False)["input_ids"][0]
    assert [processor.tokenizer.bos_token_id] + no_bos == processor(text="What?")["input_ids"][0]


def test_options_passed_twice_raise(processor):
    with pytest.raises(ValueError, match="passed two times"):
        processor(text="What?", images=[photo()], do_normalize=False, images_kwargs={"do_normalize": True})
    with pytest.raises(ValueError, match="passed two times"):
        processor(text="What?", padding="max_length", text_kwargs={"padding": True})


def test_unsupported_text_options_raise(processor):
    with pytest.raises(ValueError, match="does not support text_pair"):
        processor(text="What?", text_pair="Why?")
    with pytest.raises(ValueError, match="does not support return_overflowing_tokens"):
        processor(text="What?", return_overflowing_tokens=True)


def test_saved_tokenizer_defaults_apply(processor, tmp_path):
    """Defaults saved in tokenizer_config.json apply to every call, call-time options win, and they survive a save."""
    folder = hub_folder(tmp_path, processor, "hb_saved_defaults")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "padding": "max_length", "max_length": 77}))
    loaded = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert len(loaded(text="What?")["input_ids"][0]) == 77
    assert len(loaded(text="What?", padding="longest")["input_ids"][0]) == len(processor(text="What?")["input_ids"][0])
    resaved = tmp_path / f"hb_saved_defaults_again_{uuid.uuid4().hex[:8]}"
    loaded.save_pretrained(resaved)
    again = AutoProcessor.from_pretrained(resaved, trust_remote_code=True)
    assert len(again(text="What?")["input_ids"][0]) == 77


# ---------------------------------------------------------------------------------------------------------------
# 9. image sources


def jpeg_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture
def http_server(tmp_path, monkeypatch):
    """A local HTTP server on 127.0.0.1 serving `tmp_path/www`; image downloads time out after 2 s."""
    import functools
    import http.server
    import threading

    import honeybee_hf.image_loading_honeybee as module

    monkeypatch.setattr(module, "IMAGE_URL_TIMEOUT", 2.0)
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_every_image_source_gives_the_same_pixels(processor, tmp_path, http_server):
    import base64

    root, url = http_server
    original = Image.open(PHOTO_DIR / "ca.jpeg")
    original.thumbnail((80, 80))
    data = jpeg_bytes(original)
    (root / "photo.jpg").write_bytes(data)
    (tmp_path / "photo.jpg").write_bytes(data)
    decoded = Image.open(io.BytesIO(data))
    encoded = base64.b64encode(data).decode()
    sources = {
        "path": tmp_path / "photo.jpg",
        "str path": str(tmp_path / "photo.jpg"),
        "bytes": data,
        "http url": f"{url}/photo.jpg",
        "data url": f"data:image/jpeg;base64,{encoded}",
        "base64": encoded,
        "PIL": decoded,
        "numpy": np.asarray(decoded.convert("RGB")),
        "torch": torch.from_numpy(np.asarray(decoded.convert("RGB")).copy()),
    }
    expected = reference_pixels(decoded, 32)
    for name, source in sources.items():
        pixels = processor(text="What?", images=[source], return_tensors="pt")["pixel_values"][0]
        assert (pixels - expected).abs().max() < 1e-5, name
    messages = [user({"type": "image", "url": f"{url}/photo.jpg"}, {"type": "text", "text": "What?"})]
    out = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert (torch.as_tensor(np.asarray(out["pixel_values"]))[0] - expected).abs().max() < 1e-5


def test_bad_image_sources_raise_short_errors_naming_the_image(processor, http_server):
    import base64
    import socket

    root, url = http_server
    good = jpeg_bytes(photo(0, (64, 64)))
    garbage = base64.b64encode(np.random.RandomState(0).bytes(100_000)).decode()
    truncated = Image.open(io.BytesIO(good[: len(good) // 2]))  # PIL opens lazily: decoding fails later
    silent = socket.socket()  # accepts connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    cases = [
        (f"{url}/missing.jpg", "missing.jpg.*check the URL"),
        (f"http://127.0.0.1:{silent.getsockname()[1]}/slow.jpg", "slow.jpg.*check the URL"),
        (f"data:image/jpeg;base64,{garbage}", "a data URL of 133,3.. characters.*valid JPEG/PNG/WebP"),
        (garbage, "133,3.. characters.*valid JPEG/PNG/WebP"),
        ("data:image/png;base64,@@@", "not valid base64"),
        (truncated, "a RGB PIL image of 64x64.*valid JPEG/PNG/WebP"),
        (good[:100], r"<bytes> \(100 bytes\).*valid JPEG/PNG/WebP"),
    ]
    try:
        for source, message in cases:
            with pytest.raises(ValueError, match=f"image 2 of 2.*{message}") as error:
                processor(text="Two\nHuman: <image>\nHuman: <image>\nAI: ", images=[photo(1), source])
            assert len(str(error.value)) < 600, str(error.value)[:1000]
    finally:
        silent.close()


# ---------------------------------------------------------------------------------------------------------------
# 10. chat template for training: assistant masks, captions


def official_labels(tensors, case):
    return [int(label != -100) for label in tensors[f"case{case}.labels"].tolist()]


def test_assistant_mask_is_the_official_label_rule(processor, toy, spm):
    meta, tensors = toy
    question, answer = "What is in the image?", meta["cases"][2]["prompt"].split(AI)[-1]
    image = photo(5)
    messages = [
        user({"type": "image", "image": image}, {"type": "text", "text": question}),
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]
    out = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert out["input_ids"][0] == official_ids(tensors["case2.input_ids"], processor).tolist()
    assert out["assistant_masks"][0] == official_labels(tensors, 2)

    turns = [("Is there a cat?", "No"), ("Explain why  this meme is funny.", " Because the cat is a dog. ")]
    messages = [
        m
        for q, a in turns
        for m in (user({"type": "text", "text": q}), {"role": "assistant", "content": [{"type": "text", "text": a}]})
    ]
    out = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    prompt = SYSTEM_PROMPT + "".join(HUMAN + q + AI + a for q, a in turns)
    ids, mask = official_encode(spm, prompt, processor.num_visual_tokens, processor.image_token_id)
    assert out["input_ids"][0].tolist() == ids and out["assistant_masks"][0].tolist() == mask


def test_any_chat_template_is_tokenized_as_rendered(processor):
    """A template given to apply_chat_template renders the whole prompt, so it reaches the tokenizer as it is, `<s>`
    in front and each `<image>` expanded (the official-format reading of `__call__` is for texts written by hand),
    and the assistant mask marks the tokens the tokenizer's own apply_chat_template marks on the same turns without
    images (transformers' common processor test). With images in several turns, and without any: a text-only prompt
    is not a bare question to wrap in the official prompt."""
    template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' + '\\n' }}"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'][0]['text'] + '.' }}{% endgeneration %}"
        "{% else %}{% for c in m['content'] %}{{ '<image>' if c['type'] == 'image' else c['text'] }}{% endfor %}"
        "{% endif %}{{ '\\n' }}{% endfor %}"
    )

    def turns(with_images):
        def turn(role, text, images):
            pictures = [{"type": "image", "image": photo(i)} for i in range(images if with_images else 0)]
            return {"role": role, "content": [*pictures, {"type": "text", "text": text}]}

        return [turn("user", "What is it?", 2), turn("assistant", "A cat", 0), turn("user", "Here?", 1)] + [
            turn("assistant", "A dog on a mat", 0)
        ]

    reference = processor.tokenizer.apply_chat_template(
        turns(False), chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    expected = [i for i, marked in zip(reference["input_ids"], reference["assistant_masks"]) if marked]
    assert expected
    for with_images in (True, False):
        messages = turns(with_images)
        out = processor.apply_chat_template(
            messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        rendered = processor.apply_chat_template(messages, chat_template=template)
        assert rendered.count("<image>") == len(out.get("pixel_values", [])) == (3 if with_images else 0)
        assert out["input_ids"][0] == [processor.tokenizer.bos_token_id] + tokenizer_ids(processor, rendered)
        assert [i for i, m in zip(out["input_ids"][0], out["assistant_masks"][0]) if m] == expected


def test_caption_messages_render_the_pre_training_format(processor, toy):
    meta, tensors = toy
    caption = meta["cases"][3]["prompt"].split("<image> ")[1]
    messages = [
        {"role": "system", "content": "[NO_PROMPT]"},
        user({"type": "image", "image": photo(6)}),
        {"role": "assistant", "content": caption},
    ]
    rendered = processor.apply_chat_template(messages, tokenize=False)
    assert rendered == f"<s><image>{caption}</s>"  # the official tokenization drops the "[NO_PROMPT] " text
    assert tokenizer_ids(processor, rendered) == official_ids(tensors["case3.input_ids"], processor).tolist()
    # transformers 4 tokenizes list contents only
    messages[0]["content"] = [{"type": "text", "text": "[NO_PROMPT]"}]
    messages[2]["content"] = [{"type": "text", "text": caption}]
    out = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert out["input_ids"][0] == official_ids(tensors["case3.input_ids"], processor).tolist()
    assert out["assistant_masks"][0] == official_labels(tensors, 3)


# ---------------------------------------------------------------------------------------------------------------
# 11. what vLLM's Transformers backend and transformers 5's generic code read


def test_vllm_processor_contract(processor):
    n, image_id = processor.num_visual_tokens, processor.image_token_id
    assert processor.image_token == "<image>" and image_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    counts = processor._get_num_multimodal_tokens(image_sizes=[(10, 20), (480, 640)])
    assert counts["num_image_tokens"] == [n, n] and counts["num_image_patches"] == [1, 1]
    assert processor._get_num_multimodal_tokens(image_sizes=[])["num_image_tokens"] == []

    text = "<image><image>"  # vLLM's dummy text: one placeholder per image
    out = processor(
        text=text,
        images=[photo(0), photo(1)],
        return_text_replacement_offsets=True,
        return_mm_token_type_ids=True,
        return_tensors="pt",
        add_special_tokens=False,
        truncation=False,
    )
    assert out["pixel_values"].shape[0] == 2
    (entries,) = out["text_replacement_offsets"]
    assert [e["type"] for e in entries] == ["image", "image"] and [e["span"] for e in entries] == [(0, 7), (7, 14)]
    expanded = "".join(e["replacement"] for e in entries)
    for e in entries:
        assert plain_ids(processor.tokenizer, e["replacement"]) == [image_id] * n
        assert expanded[e["new_span"][0] : e["new_span"][1]] == e["replacement"]
    assert out["input_ids"][0].tolist() == [image_id] * 2 * n
    assert out["mm_token_type_ids"][0].tolist() == [1] * 2 * n

    prompt = f"{SYSTEM_PROMPT}{HUMAN}<image>{HUMAN}What?{AI}"
    out = processor(text=prompt, images=[photo(0)], return_mm_token_type_ids=True)
    assert out["mm_token_type_ids"][0] == [int(i == image_id) for i in out["input_ids"][0]]


def test_offsets_index_the_prompt_or_the_expanded_prompt(processor):
    prompt = f"<s>{SYSTEM_PROMPT}{HUMAN}<image>{HUMAN}What is it?{AI}A dog.</s>"
    plain = processor(text=prompt, images=[photo()], return_offsets_mapping=True)
    expanded = processor(
        text=prompt, images=[photo()], return_offsets_mapping=True, return_text_replacement_offsets=True
    )
    (entry,) = expanded["text_replacement_offsets"][0]
    wide = prompt.replace("<image>", entry["replacement"])
    for ids, offsets, text in [
        (plain["input_ids"][0], plain["offset_mapping"][0], prompt),
        (expanded["input_ids"][0], expanded["offset_mapping"][0], wide),
    ]:
        pieces = [text[s:e] for s, e in offsets]
        assert pieces[0] == "<s>" and pieces[-1] == "</s>" and "".join(pieces[-4:-1]).strip() == "A dog."
        image_pieces = [p for i, p in zip(ids, pieces) if i == processor.image_token_id]
        assert image_pieces == ["<image>"] * processor.num_visual_tokens
    assert plain["input_ids"][0][-1] == processor.tokenizer.eos_token_id  # a written </s> is kept


def test_push_to_hub_uploads_the_version_neutral_files(processor, tmp_path, monkeypatch):
    """`push_to_hub` and `save_pretrained(push_to_hub=True)` upload what `save_pretrained` writes (the Hub is faked:
    repo creation and upload are the library's own calls, replaced here by a copy of the uploaded folder)."""
    import shutil
    import types

    import transformers.utils.hub as hub

    uploads = []

    def upload(self, working_dir, repo_id, files_timestamps, **kwargs):
        uploads.append((repo_id, tmp_path / f"upload{len(uploads)}"))
        shutil.copytree(working_dir, uploads[-1][1])

    class Api:
        def create_repo(self, repo_id, **kwargs):
            return types.SimpleNamespace(repo_id=repo_id)

    card = types.SimpleNamespace(save=lambda path: None)  # the library would fetch the repo's model card
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *args, **kwargs: card)
    monkeypatch.setattr(hub, "hf_api", lambda *args, **kwargs: Api(), raising=False)  # transformers 5
    monkeypatch.setattr(type(processor), "_create_repo", lambda self, repo_id, **kwargs: repo_id, raising=False)  # 4
    monkeypatch.setattr(type(processor), "_upload_modified_files", upload)
    monkeypatch.chdir(tmp_path)  # transformers 4 stages the upload in ./<repo name> if that folder exists
    processor.push_to_hub("someone/honeybee-toy")
    local = tmp_path / "local" / "honeybee-toy"
    processor.save_pretrained(local, push_to_hub=True, repo_id="someone/honeybee-toy")
    expected = {p.name: p.read_bytes() for p in local.iterdir()}
    assert [repo for repo, _ in uploads] == ["someone/honeybee-toy"] * 2
    for _, folder in uploads:
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == expected
    assert json.loads(expected["tokenizer_config.json"])["tokenizer_class"] == "PreTrainedTokenizerFast"
