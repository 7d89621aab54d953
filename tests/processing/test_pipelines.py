"""Both pipelines on real photos, through the remote-code loader, against direct generation."""

import pytest
import transformers
from PIL import Image

from utils import PHOTOS


def direct_answer(model, processor, image, text, max_new_tokens):
    inputs = processor(images=image, text=text, return_tensors="pt")
    new = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)[:, inputs["input_ids"].shape[1] :]
    return processor.batch_decode(new, skip_special_tokens=True)[0]


def pipeline_text(expected):
    """What the library's image-text-to-text pipeline may return for an answer decoded alone: it cuts the prompt off
    the decoded whole sequence, so it keeps the space that a first answer piece starting with "▁" stands for."""
    return {expected, " " + expected}


@pytest.mark.parametrize("projector_type", ["c-abs", "d-abs"])
def test_image_to_text_captions_without_a_prompt_and_answers_with_one(tiny_folder, projector_type):
    from honeybee_hf.pipeline_honeybee import CAPTION_QUESTION

    folder, model, processor = tiny_folder(projector_type, seed=5)
    pipe = transformers.pipeline("image-to-text", model=str(folder), trust_remote_code=True)
    assert type(pipe).__name__ == "HoneybeeImageToTextPipeline"  # ours, on 4.x and on 5.x
    photos = [Image.open(p) for p in PHOTOS[:3]]
    captions = pipe(photos, max_new_tokens=6)
    assert len(captions) == 3
    for image, caption in zip(photos, captions):
        assert caption[0]["generated_text"] == direct_answer(model, processor, image, CAPTION_QUESTION, 6).strip()
    answer = pipe(str(PHOTOS[0]), prompt="Who is this?", max_new_tokens=6)  # a file path works too
    assert answer[0]["generated_text"] == direct_answer(model, processor, photos[0], "Who is this?", 6).strip()


def test_image_text_to_text_with_text_and_with_chat_messages(tiny_folder):
    folder, model, processor = tiny_folder("c-abs", seed=6)
    pipe = transformers.pipeline("image-text-to-text", model=str(folder), trust_remote_code=True)
    image = Image.open(PHOTOS[1])
    expected = direct_answer(model, processor, image, "What is this?", 6)
    out = pipe(images=image, text="What is this?", max_new_tokens=6, return_full_text=False)
    assert out[0]["generated_text"] in pipeline_text(expected)
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is this?"}]}
    ]
    chat = pipe(text=messages, max_new_tokens=6)
    assert chat[0]["generated_text"][-1]["role"] == "assistant"
    assert chat[0]["generated_text"][-1]["content"] in pipeline_text(expected)
