"""The web demo's functions without a browser (they take and return plain values; Gradio is not needed): the
conversation across turns renders the official prompt, streaming assembles what `generate` returns, the sampling
settings reach `generate`, stop ends generation, and a bad image or setting becomes a message."""

import pytest
import torch

from honeybee_hf.demo import app
from honeybee_hf.demo.chat import BadImageError, HoneybeeChat, Sampling, read_image
from honeybee_hf.processing_honeybee import SYSTEM_PROMPT
from utils import PHOTOS, photo


@pytest.fixture(scope="module")
def chat():
    from honeybee_hf.testing_utils import tiny_config, tiny_model, tiny_processor

    config = tiny_config("c-abs")
    return HoneybeeChat(tiny_model(config, seed=3), tiny_processor(config))


def greedy(**overrides):
    return Sampling(**{"mode": "greedy", "max_new_tokens": 12, **overrides})


def run(generator):
    """Every value a handler yields; the last one is what the page ends with."""
    return list(generator)


def values(sampling):
    return [getattr(sampling, name) for name in app.SAMPLING_FIELDS]


def test_defaults_are_the_official_demo_controls():
    # kakaobrain/honeybee serve/web_server.py: the UI's sliders and their defaults
    assert Sampling().generate_kwargs() == dict(
        max_new_tokens=512, no_repeat_ngram_size=2, do_sample=True, temperature=1.0, top_k=3, top_p=0.9
    )


def test_conversation_renders_the_official_prompt_across_turns(chat):
    image = photo(0)
    first = run(app.answer(chat, str(PHOTOS[0]), "", [], "What is this?", *values(greedy())))
    history = first[-1][1]
    assert [question for question, _ in history] == ["What is this?"] and history[0][1]
    second = run(app.answer(chat, str(PHOTOS[0]), "", history, "And then?", *values(greedy())))
    history2 = second[-1][1]
    assert history2[0] == history[0] and history2[1][0] == "And then?"
    assert second[-1][0] == [
        {"role": "user", "content": "What is this?"},
        {"role": "assistant", "content": history[0][1]},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": history2[1][1]},
    ]
    # The prompt of turn 3, by hand in the official format (one image, in the first human turn; </s> after answers),
    # tokenized as the official code does (piece by piece): the demo's inputs, the chat template's text through the
    # processor (its tokenizer reads the text as written), must be those ids.
    official = (
        f"{SYSTEM_PROMPT}\nHuman: <image>\nHuman: What is this?\nAI: {history[0][1]}</s>"
        f"\nHuman: And then?\nAI: {history2[1][1]}</s>\nHuman: Third?\nAI: "
    )
    rendered = chat.processor.apply_chat_template(
        chat.messages(image, history2, "Third?"), add_generation_prompt=True, tokenize=False
    )
    assert rendered.startswith("<s>") and rendered.endswith("AI: ")
    ids = chat.inputs(image, history2, "Third?")["input_ids"]
    assert ids[0].tolist() == chat.processor(text=official, images=[image])["input_ids"][0]
    assert (ids == chat.model.config.image_token_id).sum() == chat.model.config.num_visual_tokens  # one image


def test_streaming_assembles_what_generate_returns(chat):
    image = photo(1)
    pieces = list(chat.stream(image, [("Hi?", "Hello.")], "What is it?", greedy(max_new_tokens=20)))
    assert len(pieces) > 1  # it streamed
    assert all(later.startswith(earlier) for earlier, later in zip(pieces, pieces[1:]))
    inputs = chat.inputs(image, [("Hi?", "Hello.")], "What is it?")
    ids = chat.model.generate(**inputs, **greedy(max_new_tokens=20).generate_kwargs())
    assert pieces[-1] == chat.processor.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


@pytest.mark.parametrize("mode", ["sample", "greedy", "beam search"])
def test_sampling_settings_reach_generate(chat, monkeypatch, mode):
    seen = []
    generate = chat.model.generate

    def recording(**kwargs):
        seen.append(kwargs)
        return generate(**kwargs)

    monkeypatch.setattr(chat.model, "generate", recording)
    settings = Sampling(mode, max_new_tokens=7, temperature=0.7, top_k=11, top_p=0.8, num_beams=2,
                        no_repeat_ngram_size=3, length_penalty=0.5)  # fmt: skip
    torch.manual_seed(0)
    outputs = run(app.answer(chat, str(PHOTOS[2]), "", [], "What?", *values(settings)))
    assert len(seen) == 1 and outputs[-1][2] == ""
    kwargs = seen[0]
    expected = {
        "sample": dict(do_sample=True, temperature=0.7, top_k=11, top_p=0.8),
        "greedy": dict(do_sample=False, num_beams=1),
        "beam search": dict(do_sample=False, num_beams=2, length_penalty=0.5),
    }[mode]
    assert {key: kwargs[key] for key in expected} == expected
    assert kwargs["max_new_tokens"] == 7 and kwargs["no_repeat_ngram_size"] == 3
    assert ("streamer" in kwargs) == (mode != "beam search")  # beams cannot stream; they answer in one piece


def test_stop_ends_generation(chat, monkeypatch):
    steps = []
    generate = chat.model.generate

    def counting(**kwargs):
        kwargs["min_new_tokens"] = 300  # so that only the stop can end it early
        kwargs["stopping_criteria"].append(lambda input_ids, scores, **_: steps.append(1) or False)
        return generate(**kwargs)

    monkeypatch.setattr(chat.model, "generate", counting)
    stream = chat.stream(photo(0), [], "Talk.", greedy(max_new_tokens=300, no_repeat_ngram_size=0))
    next(stream)
    stream.close()  # what Gradio does on "Stop": the generation thread must end well before 300 tokens
    assert 0 < len(steps) < 300
    assert chat.lock.acquire(blocking=False)  # and it let go of the model
    chat.lock.release()


def test_regenerate_replaces_the_last_answer(chat):
    history = [("First?", "One."), ("Second?", "Two.")]
    last = run(app.regenerate(chat, str(PHOTOS[0]), "", history, *values(greedy())))[-1]
    assert [q for q, _ in last[1]] == ["First?", "Second?"] and last[1][0] == ("First?", "One.")
    assert last[1][1][1] != "Two."
    assert run(app.regenerate(chat, str(PHOTOS[0]), "", [], *values(greedy())))[-1][2] == "Nothing to regenerate yet."


@pytest.mark.parametrize(
    "upload, url, says",
    [
        (None, "", "no image"),
        ("corrupt", "", "cannot read the image"),
        (None, "/etc/hostname", "the image URL must start with http:// or https://, got '/etc/hostname'"),
        (None, "http://127.0.0.1:9/photo.jpg", "cannot read the image 'http://127.0.0.1:9/photo.jpg'"),
    ],
)
def test_a_bad_image_gives_a_message(chat, tmp_path, upload, url, says):
    if upload == "corrupt":
        upload = tmp_path / "broken.jpg"
        upload.write_bytes(b"\xff\xd8 not really a JPEG")
        upload = str(upload)
    history = [("Earlier?", "Yes.")]
    (messages, kept, status), = run(app.answer(chat, upload, url, history, "What?", *values(greedy())))  # fmt: skip
    assert says in status and status.startswith("⚠️") and "\n" not in status
    assert kept == history and len(messages) == 2  # the conversation is untouched
    overlay, caption = app.show_token_map(chat, upload, url, 0, "all")
    assert overlay is None and says in caption


def test_read_image_reads_a_photo_and_refuses_a_text_file(tmp_path):
    assert read_image(str(PHOTOS[0])).mode == "RGB"
    with pytest.raises(BadImageError, match="cannot read the image '/no/such/photo.jpg'"):
        read_image("/no/such/photo.jpg")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(BadImageError, match="notes.txt"):
        read_image(str(text))


def test_a_bad_setting_gives_a_message(chat):
    settings = values(greedy(max_new_tokens=5000))
    (_, _, status), = run(app.answer(chat, str(PHOTOS[0]), "", [], "What?", *settings))  # fmt: skip
    assert "max_new_tokens must be in 1..1536" in status


def test_the_cli_needs_a_model(monkeypatch, capsys):
    monkeypatch.delenv(app.MODEL_VARIABLE, raising=False)
    assert app.main([]) == 1
    assert capsys.readouterr().err.strip() == (
        "honeybee-demo: error: no model: pass --model FOLDER_OR_REPO or set HONEYBEE_MODEL"
    )
