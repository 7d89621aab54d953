"""The demo's chat, without any UI: load a Honeybee once, keep a conversation about one image, stream the answer.

Only public APIs: `AutoProcessor`/`AutoModelForImageTextToText` with remote code, `processor.apply_chat_template`
(so every prompt is the official format the processor's template renders), `model.generate` with a
`TextIteratorStreamer`. `app.py` binds these functions to Gradio; the tests call them directly.
"""

import threading
from dataclasses import dataclass

import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)
from transformers.image_utils import load_image

DECODING_MODES = ("sample", "greedy", "beam search")
MAX_NEW_TOKENS_LIMIT = 1536  # the official demo's slider maximum


@dataclass
class Sampling:
    """The official web demo's controls and defaults (kakaobrain/honeybee `serve/web_server.py`)."""

    mode: str = "sample"  # one of DECODING_MODES
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_k: int = 3
    top_p: float = 0.9
    num_beams: int = 3  # used by "beam search" only
    no_repeat_ngram_size: int = 2
    length_penalty: float = 1.0

    def generate_kwargs(self):
        """What `model.generate` receives; options a mode does not use are left out (generate would warn)."""
        if self.mode not in DECODING_MODES:
            raise ValueError(f"decoding mode must be one of {', '.join(DECODING_MODES)}, got {self.mode!r}")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise ValueError(f"max_new_tokens must be in 1..{MAX_NEW_TOKENS_LIMIT}, got {self.max_new_tokens}")
        kwargs = dict(max_new_tokens=int(self.max_new_tokens), no_repeat_ngram_size=int(self.no_repeat_ngram_size))
        if self.mode == "sample":
            return kwargs | dict(
                do_sample=True, temperature=float(self.temperature), top_k=int(self.top_k), top_p=float(self.top_p)
            )
        if self.mode == "greedy":
            return kwargs | dict(do_sample=False, num_beams=1)
        return kwargs | dict(
            do_sample=False,
            num_beams=int(self.num_beams),
            length_penalty=float(self.length_penalty),
            early_stopping=True,
        )


class BadImageError(ValueError):
    """An image the demo cannot read; the message is short enough for the UI."""


def read_image(source):
    """A path, an http(s) URL or a PIL image -> an RGB PIL image, or `BadImageError` naming the input briefly."""
    if source is None or (isinstance(source, str) and not source.strip()):
        raise BadImageError("no image: upload a photo, paste one or give its URL")
    try:
        return load_image(source.strip() if isinstance(source, str) else source).convert("RGB")
    except Exception as error:  # PIL, requests and load_image raise many kinds; all mean "unreadable"
        name = source if isinstance(source, str) else type(source).__name__
        name = name if len(name) <= 60 else name[:28] + "..." + name[-28:]
        reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        raise BadImageError(f"cannot read the image {name!r} ({reason}): give a JPEG/PNG/WebP file or URL") from None


class HoneybeeChat:
    """One model and processor, loaded once per process and shared by every user of the app.

    Generation and the visualisation's hooked forward passes take `lock`: Gradio's queue already runs one at a time
    (app.py), the lock keeps that true for any other caller.
    """

    def __init__(self, model, processor):
        self.model, self.processor = model.eval(), processor
        self.lock = threading.Lock()

    @classmethod
    def load(cls, model_id, device=None):
        """A folder or Hub repo; bf16 on a GPU that supports it, fp32 otherwise."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)
        model = AutoModelForImageTextToText.from_pretrained(
            model_id, trust_remote_code=True, dtype=torch.bfloat16 if bf16 else torch.float32
        ).to(device)
        return cls(model, processor)

    def messages(self, image, history, question):
        """The conversation as chat messages: the image goes with the first question, as the official demo does.

        `history`: the earlier (question, answer) turns.
        """
        messages = []
        for turn, (asked, answered) in enumerate([*history, (question, None)]):
            content = [{"type": "text", "text": asked}]
            if turn == 0:
                content.insert(0, {"type": "image", "image": image})
            messages.append({"role": "user", "content": content})
            if answered is not None:
                messages.append({"role": "assistant", "content": [{"type": "text", "text": answered}]})
        return messages

    def inputs(self, image, history, question):
        inputs = self.processor.apply_chat_template(
            self.messages(image, history, question),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
        return inputs.to(self.model.device, dtype=self.model.dtype)  # dtype: floating tensors (pixels) only

    def stream(self, image, history, question, sampling=None):
        """Yield the answer so far after every new piece of text.

        Closing the generator (Gradio does on "Stop" and when a user leaves) stops `generate` at the next token.
        Beam search cannot stream (transformers refuses a streamer with beams): its answer comes in one piece.
        """
        kwargs = (sampling or Sampling()).generate_kwargs()
        inputs = self.inputs(image, history, question)
        stop = threading.Event()
        kwargs |= dict(stopping_criteria=StoppingCriteriaList([_StopWhenSet(stop)]))
        if kwargs.get("num_beams", 1) > 1:
            with self.lock:
                ids = self.model.generate(**inputs, **kwargs)
            yield self.processor.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
            return
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure = []
        thread = threading.Thread(target=self._generate, args=(inputs, kwargs, streamer, failure), daemon=True)
        thread.start()
        text = ""
        try:
            for piece in streamer:
                text += piece
                yield text.strip()
        finally:
            stop.set()
            thread.join()
        if failure:
            raise failure[0]

    def _generate(self, inputs, kwargs, streamer, failure):
        try:
            with self.lock:
                self.model.generate(**inputs, **kwargs, streamer=streamer)
        except Exception as error:  # re-raised by `stream` in the caller's thread
            failure.append(error)
            streamer.end()


class _StopWhenSet(StoppingCriteria):
    def __init__(self, event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)
