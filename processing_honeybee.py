"""Honeybee processor and captioning pipeline (arXiv 2312.06742; official code github.com/kakaobrain/honeybee).

Images: the official squash resize (bicubic to S×S, no crop), CLIP mean/std, via `CLIPImageProcessor`.
Text: the official prompt format, tokenised exactly as the official code does (HEAD, §5.2 of our notes): the prompt
is split at `<image>`, "\nHuman: " and "\nAI: ", each piece is tokenised on its own with sentencepiece's dummy
prefix, every answer after "\nAI: " ends with `</s>`, and each `<image>` becomes `num_query_tokens +
num_eos_tokens` placeholder ids that the model overwrites with visual tokens.
"""

import io
import os
import re

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import BatchFeature, Pipeline
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.processing_utils import ProcessorMixin

_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

SYSTEM_PROMPT = (
    "The following is a conversation between a curious human and AI assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
HUMAN, AI = "\nHuman: ", "\nAI: "
NO_PROMPT = "[NO_PROMPT] <image> "  # pre-training captions: <s> <image> caption </s>
CAPTION_QUESTION = "Describe the image briefly."

# Renders the official inference prompt: SYSTEM\nHuman: <image>\nHuman: {question}\nAI: {answer}...
CHAT_TEMPLATE = (
    "{%- set system = namespace(text='" + SYSTEM_PROMPT.replace("'", "\\'") + "') -%}"
    "{%- for m in messages if m['role'] == 'system' -%}"
    "{%- set system.text = m['content'] if m['content'] is string else "
    "(m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ')) -%}"
    "{%- endfor -%}"
    "{{- system.text -}}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{%- set items = [{'type': 'text', 'text': m['content']}] if m['content'] is string else m['content'] -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- for item in items -%}"
    "{%- if item['type'] == 'image' -%}{{- '\\nHuman: <image>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- '\\nHuman: ' + item['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{{- '\\nAI: ' -}}{%- for item in items if item['type'] == 'text' -%}{{- item['text'] -}}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '\\nAI: ' -}}{%- endif -%}"
)


# transformers 5 names its torchvision-backed processor `CLIPImageProcessor` whenever torchvision is installed; its
# bicubic resize differs slightly from PIL's, which the official pipeline (and so the model's training) used.
# (Looked up lazily by name: importing `CLIPImageProcessor` on 5.x without torchvision logs a fallback warning.)
PilCLIPImageProcessor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def honeybee_image_processor(image_size=224):
    """CLIP normalisation after the official squash resize: PIL bicubic to image_size×image_size, no crop."""
    return PilCLIPImageProcessor(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=3,  # PIL bicubic, as torchvision's Resize in the official pipeline
        do_center_crop=False,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True,
    )


def load_rgb_image(image):
    """A PIL image, a path, bytes, or a uint8 array (H, W, 3) -> an 8-bit RGB PIL image, or a clear error."""
    if isinstance(image, (str, os.PathLike, bytes)):
        source = image if not isinstance(image, bytes) else io.BytesIO(image)
        name = image if not isinstance(image, bytes) else "<bytes>"
        try:
            image = Image.open(source)
            image.load()
        except FileNotFoundError as error:
            raise ValueError(f"image file {name} does not exist") from error
        except Image.DecompressionBombError as error:
            raise ValueError(f"image {name} is too large to decode safely ({error}); downscale it first") from error
        except (OSError, SyntaxError) as error:
            raise ValueError(f"cannot read image {name}: {error}; is it a valid JPEG/PNG/WebP file?") from error
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(
                f"array images must be uint8 of shape (height, width, 3), got {array.dtype} {array.shape}; "
                "pass a PIL image for anything else"
            )
        image = Image.fromarray(array)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, a path, bytes or a uint8 array, got {type(image).__name__}")
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        # PIL's convert("RGB") clips 16-bit values at 255; scale to 8 bits instead.
        image = Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8))
    elif image.mode in ("I", "F"):
        raise ValueError(
            f"image mode {image.mode!r} (32-bit integer or float pixels) has no standard 8-bit meaning; "
            "convert it to an 8-bit RGB image yourself"
        )
    # As the official pipeline: alpha is dropped, grayscale/CMYK/palette images become RGB.
    return image.convert("RGB")


class HoneybeeProcessor(ProcessorMixin):
    r"""Turns images and prompts into `input_ids`, `attention_mask` and `pixel_values` for Honeybee.

    A text is either a full prompt in the official format (it contains `<image>` or "\nHuman: "), or a bare
    question, which is wrapped in the official inference template with one `<image>` per image of its sample:
    `"{SYSTEM}\nHuman: <image>\nHuman: {question}\nAI: "`. `apply_chat_template` renders the same format from
    chat messages. Batches are padded on the tokenizer's side (left, for generation).

    Args:
        image_processor (`CLIPImageProcessor`), tokenizer (Llama tokenizer with `<image>` added),
        chat_template (`str`), num_query_tokens (`int`): M, num_eos_tokens (`int`), image_token (`str`).
    """

    if _TRANSFORMERS_MAJOR < 5:  # transformers 4 finds the parts through these; 5 reads __init__ and warns on them
        attributes = ["image_processor", "tokenizer"]
        image_processor_class = "AutoImageProcessor"
        tokenizer_class = "AutoTokenizer"

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        num_query_tokens=144,
        num_eos_tokens=0,
        image_token="<image>",
        **kwargs,
    ):
        self.num_query_tokens = num_query_tokens
        self.num_eos_tokens = num_eos_tokens
        self.image_token = image_token
        if image_processor is not None and not isinstance(image_processor, PilCLIPImageProcessor):
            image_processor = PilCLIPImageProcessor(**image_processor.to_dict())  # keep the official PIL resize
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE, **kwargs)

    @property
    def num_visual_tokens(self):
        return self.num_query_tokens + self.num_eos_tokens

    @property
    def image_token_id(self):
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values"]

    def _chunk_tokenizer(self):
        """The tokenizer's BPE with sentencepiece's legacy front end: a `▁` before every piece, spaces as `▁`.

        transformers 5 rebuilds Llama tokenizers with a Metaspace pre-tokenizer that skips the dummy prefix
        when a piece already starts with a space; owning the front end keeps the official ids on 4.x and 5.x.
        """
        if getattr(self, "_spm_legacy", None) is None:
            from tokenizers import Tokenizer, normalizers

            backend = Tokenizer.from_str(self.tokenizer.backend_tokenizer.to_str())
            backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
            backend.pre_tokenizer = None
            backend.post_processor = None
            self._spm_legacy = backend
        return self._spm_legacy

    def encode_prompt(self, prompt, add_bos=True):
        """Token ids of one prompt and, for each id, 1 where the official training loss applies (answers + `</s>`)."""
        tok = self.tokenizer
        image_ids = [self.image_token_id] * self.num_visual_tokens
        if prompt.startswith(NO_PROMPT):  # the official pre-training format
            caption = self._chunk_tokenizer().encode(prompt[len(NO_PROMPT) :], add_special_tokens=False).ids
            ids = image_ids + caption + [tok.eos_token_id]
            mask = [0] * len(image_ids) + [1] * (len(caption) + 1)
        else:
            pattern = "|".join(map(re.escape, [self.image_token, AI, HUMAN]))
            chunks = [c for c in re.split(f"({pattern})", prompt) if c]
            texts = [c for c in chunks if c != self.image_token]
            encoded = iter(e.ids for e in self._chunk_tokenizer().encode_batch(texts, add_special_tokens=False))
            ids, mask = [], []
            for i, chunk in enumerate(chunks):
                if chunk == self.image_token:
                    ids += image_ids
                    mask += [0] * len(image_ids)
                    continue
                piece = list(next(encoded))
                is_answer = i > 0 and chunks[i - 1] == AI
                if is_answer:
                    piece.append(tok.eos_token_id)
                ids += piece
                mask += [int(is_answer)] * len(piece)
        if add_bos:
            ids, mask = [tok.bos_token_id] + ids, [0] + mask
        return ids, mask

    def _is_bare_question(self, text):
        return not (self.image_token in text or HUMAN in text or AI in text or text.startswith(NO_PROMPT))

    def _wrap_question(self, text, num_images):
        question = HUMAN + text if text else ""
        return SYSTEM_PROMPT + (HUMAN + self.image_token) * num_images + question + AI

    def _images_per_text(self, texts, images):
        """Split `images` (None, an image, a flat list, or one list per text) into one list per text."""
        if images is None:
            return [[] for _ in texts]
        if not isinstance(images, (list, tuple)):
            images = [images]
        if images and all(isinstance(x, (list, tuple)) for x in images):
            if len(images) != len(texts):
                raise ValueError(f"got {len(images)} lists of images for {len(texts)} texts; give one list per text")
            return [[x for x in sub if x is not None] for sub in images]
        if any(x is None for x in images):  # the official call style: None = no image for this text
            if len(images) != len(texts):
                raise ValueError(
                    f"got {len(images)} images (None = no image) for {len(texts)} texts; give one per text"
                )
            return [[] if x is None else [x] for x in images]
        counts = [t.count(self.image_token) for t in texts]
        if all(not self._is_bare_question(t) for t in texts):
            if sum(counts) != len(images):
                raise ValueError(
                    f"the prompts hold {sum(counts)} {self.image_token} tokens but {len(images)} images were given; "
                    f"give exactly one image per {self.image_token}"
                )
        elif len(texts) == 1:
            counts = [len(images)]
        elif len(images) == len(texts):
            counts = [1] * len(texts)
        else:
            raise ValueError(
                f"cannot pair {len(images)} images with {len(texts)} texts; pass one list of images per text"
            )
        it = iter(images)
        return [[next(it) for _ in range(n)] for n in counts]

    def __call__(self, images=None, text=None, audio=None, videos=None, **kwargs):
        """`text`: a prompt or a list of prompts (see the class docstring); `images`: an image, a list, or one list
        per prompt. Options: `return_tensors`, `padding` (True/"longest" or "max_length"), `max_length`,
        `truncation`, `padding_side`, `add_special_tokens`, and `return_labels` (the official training labels;
        without them a prompt's final `</s>` is dropped, as the official inference does).
        """
        # Pipelines of transformers 4 and 5 pass options flat or grouped per modality.
        for group in ("text_kwargs", "images_kwargs", "common_kwargs", "processor_kwargs"):
            kwargs.update(kwargs.pop(group, None) or {})
        return_tensors = kwargs.pop("return_tensors", None)
        if text is None:
            if images is None:
                raise ValueError("give images, text, or both")
            flat = images if isinstance(images, (list, tuple)) else [images]
            flat = [x for sub in flat for x in (sub if isinstance(sub, (list, tuple)) else [sub])]
            return BatchFeature(self._pixel_values(flat), tensor_type=return_tensors)
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a string or a list of strings")
        per_text = self._images_per_text(texts, images)
        prompts = []
        for t, imgs in zip(texts, per_text):
            prompt = self._wrap_question(t, len(imgs)) if self._is_bare_question(t) else t
            if prompt.count(self.image_token) != len(imgs):
                raise ValueError(
                    f"prompt {prompt!r} holds {prompt.count(self.image_token)} {self.image_token} tokens but "
                    f"{len(imgs)} images were given for it"
                )
            prompts.append(prompt)
        add_bos = kwargs.pop("add_special_tokens", True) is not False
        encoded = [self.encode_prompt(p, add_bos=add_bos) for p in prompts]
        if not kwargs.get("return_labels"):
            # As the official inference processor (no_eos=True): a prompt that ends with an answer is left open,
            # so that generation continues it; answers inside the prompt keep their `</s>`.
            eos = self.tokenizer.eos_token_id
            encoded = [(ids[:-1], mask[:-1]) if ids and ids[-1] == eos else (ids, mask) for ids, mask in encoded]
        features = self._pad(encoded, **kwargs)
        flat = [img for imgs in per_text for img in imgs]
        if flat:
            features.update(self._pixel_values(flat))
        return BatchFeature(features, tensor_type=return_tensors)

    def _pixel_values(self, images):
        rgb = [load_rgb_image(x) for x in images]
        # Explicit layout: transformers 4 guesses it from the array and takes (H, W, 3) for channels-first when H is
        # 1 or 3 (a 3-pixel-high image came out scrambled, a 1-pixel-high one raised).
        pixels = self.image_processor(rgb, return_tensors="pt", input_data_format="channels_last")
        return {"pixel_values": pixels["pixel_values"]}

    def _pad(
        self, encoded, padding=True, max_length=None, truncation=None, padding_side=None, return_labels=False, **_
    ):
        tok = self.tokenizer
        side = padding_side or tok.padding_side
        if truncation and max_length is not None:
            encoded = [self._truncate(ids, mask, max_length) for ids, mask in encoded]
        length = max(len(ids) for ids, _ in encoded)
        if padding == "max_length" and max_length is not None:
            length = max(length, max_length)
        columns = {"input_ids": [], "attention_mask": []}
        if return_labels:
            columns["labels"] = []
        for ids, mask in encoded:
            pad = length - len(ids)
            rows = {
                "input_ids": (ids, tok.pad_token_id),
                "attention_mask": ([1] * len(ids), 0),
                "labels": ([i if m else -100 for i, m in zip(ids, mask)], -100),
            }
            for name in columns:
                values, fill = rows[name]
                columns[name].append([fill] * pad + values if side == "left" else values + [fill] * pad)
        return columns

    def _truncate(self, ids, mask, max_length):
        if self.image_token_id in ids[max_length:]:
            raise ValueError(
                f"max_length={max_length} would cut an image's {self.num_visual_tokens} placeholder tokens out of a "
                f"{len(ids)}-token prompt; raise max_length or shorten the text"
            )
        return ids[:max_length], mask[:max_length]

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


class HoneybeeImageToTextPipeline(Pipeline):
    """`pipeline("image-to-text", model=repo, trust_remote_code=True)`: captions, or answers with `prompt=`.

    Registered in the model's config.json under `custom_pipelines`, which transformers 4 and 5 both consult
    before their own tasks (5.x routes its built-in "image-to-text" to image-text-to-text, which needs text).
    """

    _load_processor = True
    _load_image_processor = False
    _load_tokenizer = False
    _load_feature_extractor = False
    _pipeline_calls_generate = True

    def _sanitize_parameters(
        self, prompt=None, text=None, max_new_tokens=None, generate_kwargs=None, timeout=None, **kwargs
    ):
        preprocess = {"prompt": prompt if prompt is not None else text}
        generate = dict(generate_kwargs or {})
        if max_new_tokens is not None:
            generate["max_new_tokens"] = max_new_tokens
        return preprocess, {"generate_kwargs": generate}, {}

    def preprocess(self, image, prompt=None):
        inputs = self.processor(images=[image], text=prompt or CAPTION_QUESTION, return_tensors="pt")
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def _forward(self, inputs, generate_kwargs=None):
        prompt_length = inputs["input_ids"].shape[1]
        return {"new_tokens": self.model.generate(**inputs, **(generate_kwargs or {}))[:, prompt_length:]}

    def postprocess(self, outputs):
        texts = self.processor.batch_decode(outputs["new_tokens"], skip_special_tokens=True)
        return [{"generated_text": t.strip()} for t in texts]


__all__ = ["HoneybeeProcessor", "HoneybeeImageToTextPipeline", "honeybee_image_processor", "load_rgb_image"]
