"""lmms-eval's generic `huggingface` backend (0.7.3) evaluates a Honeybee folder with nothing but
`pretrained=FOLDER,trust_remote_code=True`: its model class is driven directly on in-memory documents (what its
task runner hands it), so nothing is downloaded."""

import pytest

from utils import photo

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (scripts/setup_envs.sh installs it)")

TASK, SPLIT = "local_vqa", "test"
QUESTIONS = ["What is in the image?", "Describe it.", "Who is this?", "What colour is it?"]


def lmms_eval_model(folder, batch_size):
    from lmms_eval.models.chat.huggingface import Huggingface

    # lmms-eval's defaults move inputs to cuda; on CPU it needs device and device_map.
    return Huggingface(
        pretrained=str(folder), trust_remote_code=True, device="cpu", device_map="cpu", batch_size=batch_size
    )


def answer_all(lm, docs, max_new_tokens):
    """What lmms-eval's evaluator does for a generation task: one request per document, answers in document order."""
    from lmms_eval.api.instance import Instance

    def doc_to_messages(doc):
        content = [{"type": "image", "url": doc["image"]}, {"type": "text", "text": doc["question"]}]
        return [{"role": "user", "content": content}]

    lm.task_dict = {TASK: {SPLIT: docs}}
    gen_kwargs = {"max_new_tokens": max_new_tokens, "temperature": 0}
    requests = [
        Instance(
            request_type="generate_until",
            arguments=(doc["question"], doc_to_messages, gen_kwargs, doc_id, TASK, SPLIT),
            idx=0,
            metadata={"task": TASK, "doc_id": doc_id, "repeats": 1},
        )
        for doc_id, doc in enumerate(docs)
    ]
    return [result.text for result in lm.generate_until(requests)]


def test_huggingface_backend_batched_equals_one_by_one(tiny_folder):
    folder, _, _ = tiny_folder("c-abs", seed=3)
    # prompts of different lengths, so the batch is padded
    docs = [{"image": photo(i), "question": q} for i, q in enumerate(QUESTIONS)]
    batched = lmms_eval_model(folder, batch_size=len(docs))
    assert type(batched.model).__name__ == "HoneybeeForConditionalGeneration"  # a class that generates
    # lmms-eval loads in bfloat16; fp32 keeps the padded-vs-unpadded comparison clear of bf16 near-ties.
    batched.model.float()
    answers = answer_all(batched, docs, max_new_tokens=6)
    one_by_one = [answer_all(batched, [doc], max_new_tokens=6)[0] for doc in docs]
    assert answers == one_by_one
    assert all(answers)  # the tiny random model says something for every document
