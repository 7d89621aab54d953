"""Honeybee processor (arXiv 2312.06742; official code github.com/kakaobrain/honeybee), built like transformers'
LLaVA: the chat template renders the official prompt, the processor expands each `<image>` into the model's
placeholder tokens and assembles the pixels, the tokenizer tokenizes, pads and truncates.

The template a converted folder carries (chat_template.jinja, written from convert/chat_template.py) renders the
official prompt as text on which the plain tokenizer gives the official ids, for this processor, vLLM, TRL and any
chat client alike. The official code tokenizes a prompt in pieces, split at `<image>`, "\nHuman: " and "\nAI: ", each
piece with sentencepiece's dummy prefix, and ends every answer with `</s>`: a prompt written by hand in that format
gets those spaces and `</s>`s here before the tokenizer sees it.
"""

import bisect
import contextvars
import os
import re
import tempfile
from pathlib import Path

from transformers import BatchFeature
from transformers.dynamic_module_utils import custom_object_save
from transformers.image_utils import ImageInput
from transformers.processing_utils import MultiModalData, ProcessingKwargs, ProcessorMixin, TextKwargs, Unpack
from transformers.tokenization_utils_base import TextInput

from .image_loading_honeybee import load_rgb_image
from .transformers_compat import (
    pil_clip_image_processor_class,
    processor_class_attributes,
    processor_files,
    processor_level_text_options,
)

IMAGE_TOKEN = "<image>"
SYSTEM_PROMPT = (
    "The following is a conversation between a curious human and AI assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
HUMAN, AI = "\nHuman: ", "\nAI: "
NO_PROMPT = "[NO_PROMPT]"  # the system message of the official pre-training caption format
CAPTION_PROMPT = f"{NO_PROMPT} {IMAGE_TOKEN} "  # what precedes the caption in that format: <s> <image> caption </s>

# True while `apply_chat_template` runs: the texts it hands to `__call__` are finished prompts, whatever the template.
_RENDERED = contextvars.ContextVar("honeybee_rendered_prompt", default=False)


# ---------------------------------------------------------------------------------------------------------------
# Processor


class HoneybeeTextKwargs(TextKwargs, total=False):
    return_text_replacement_offsets: bool  # a processor option of transformers 5; 4.57 does not know it


class HoneybeeProcessorKwargs(ProcessingKwargs, total=False):
    text_kwargs: HoneybeeTextKwargs
    _defaults = {"text_kwargs": {"padding": True}}


# Tokenizer options that would pair, split or overflow texts, which the `<image>` expansion cannot follow: refused
# rather than ignored.
_UNSUPPORTED_TEXT_OPTIONS = (
    "text_pair",
    "text_target",
    "text_pair_target",
    "is_split_into_words",
    "return_overflowing_tokens",
    "return_special_tokens_mask",
    "stride",
)


class HoneybeeProcessor(ProcessorMixin):
    r"""Turns images and prompts into `input_ids`, `attention_mask` and `pixel_values` for Honeybee.

    A text is one of: a prompt rendered by a chat template (whatever `apply_chat_template` renders, or a text that
    starts with `<s>`), which goes to the tokenizer as it is; a prompt in the official format (it contains `<image>`
    or "\nHuman: ", as the official code takes it), which gets each piece's dummy-prefix space and each answer's
    `</s>` but the last one's written in first (its final answer is left open, as the official inference leaves it);
    or a bare question, which the chat template renders as one user turn with one `<image>` per image of its sample
    and the generation prompt. Batches are padded on the tokenizer's side (left, for generation). Training labels
    come from `apply_chat_template(..., return_assistant_tokens_mask=True)`: the template's generation blocks hold
    exactly what the official loss learns.

    Options are routed as transformers' processors route them: flat or in `text_kwargs`/`images_kwargs` (the same
    option in both raises), over the tokenizer's saved defaults. Text options go to the tokenizer (`padding`, default
    True, `max_length`, `truncation`, which never cuts an image's placeholders, ...), plus `return_mm_token_type_ids`
    and `return_text_replacement_offsets`; image options go to the image processor (`do_normalize`, ...).

    Args:
        image_processor (`CLIPImageProcessor`), tokenizer (Llama sentencepiece tokenizer with `<image>` added),
        chat_template (`str`, or a dict of named templates: a converted folder carries the official one,
        convert/chat_template.py), num_query_tokens (`int`): M, num_eos_tokens (`int`), image_token (`str`).
    """

    valid_processor_kwargs = HoneybeeProcessorKwargs

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        num_query_tokens=144,
        num_eos_tokens=0,
        image_token=IMAGE_TOKEN,
        **kwargs,
    ):
        self.num_query_tokens = num_query_tokens
        self.num_eos_tokens = num_eos_tokens
        self.image_token = image_token
        pil_class = pil_clip_image_processor_class()
        if image_processor is not None and not isinstance(image_processor, pil_class):
            image_processor = pil_class(**image_processor.to_dict())  # keep the official PIL resize
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @property
    def num_visual_tokens(self):
        return self.num_query_tokens + self.num_eos_tokens

    @property
    def image_token_id(self):
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values"]

    def replace_image_token(self, image_inputs=None, image_idx=0, **kwargs):
        """What each `<image>` of a prompt expands to (transformers 5's hook name; vLLM reads it back as offsets)."""
        return self.image_token * self.num_visual_tokens

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        """Placeholder tokens and `pixel_values` rows per image, for vLLM: the same for every image size."""
        count = len(image_sizes) if image_sizes is not None else 0
        return MultiModalData(num_image_tokens=[self.num_visual_tokens] * count, num_image_patches=[1] * count)

    # -----------------------------------------------------------------------------------------------------------
    # text

    def _is_bare_question(self, text):
        """A hand-written text without `<image>` or role markers; nothing `apply_chat_template` renders is one."""
        return not (_RENDERED.get() or self.image_token in text or HUMAN in text or AI in text)

    def _tokenizer_text(self, text, num_images):
        """A text of any of the three kinds -> the tokenizer-ready prompt."""
        bos, eos = self.tokenizer.bos_token, self.tokenizer.eos_token
        if self._is_bare_question(text):
            content = [{"type": "image"}] * num_images + ([{"type": "text", "text": text}] if text else [])
            rendered = self.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
            return rendered[len(bos) :] if bos and rendered.startswith(bos) else rendered
        if _RENDERED.get() or (bos and text.startswith(bos)):
            return text
        if text.startswith(CAPTION_PROMPT):  # the official pre-training format drops "[NO_PROMPT] "
            pieces = [self.image_token, text[len(CAPTION_PROMPT) :]]
        else:
            pieces = [
                p for p in re.split(f"({re.escape(self.image_token)}|{re.escape(AI)}|{re.escape(HUMAN)})", text) if p
            ]
        specials = tuple(self.tokenizer.all_special_tokens)
        prompt = ""
        for i, piece in enumerate(pieces):
            if prompt and not prompt.endswith(specials) and not piece.startswith(specials):
                prompt += " "  # sentencepiece's dummy prefix of this piece
            prompt += piece
            answered = 0 < i < len(pieces) - 1 and pieces[i - 1] == AI and piece != self.image_token
            if answered and not piece.endswith(eos):
                prompt += eos  # the official code ends every answer with </s>; the last one is left open
        return prompt

    def _text_features(
        self,
        texts,
        images_per_text,
        add_special_tokens=True,
        truncation=None,
        return_attention_mask=None,
        return_offsets_mapping=False,
        return_length=False,
        return_mm_token_type_ids=False,
        return_text_replacement_offsets=False,
        return_token_type_ids=None,  # never returned: transformers 4's generate rejects them
        **tokenizer_options,
    ):
        """Tokenizer-ready prompts, `<image>` expanded, through the tokenizer; then the offsets and image
        replacements the options ask for. Offsets index each text as given (`<image>` unexpanded), or with
        `return_text_replacement_offsets` the text with every `<image>` expanded (transformers 5 shifts the assistant
        spans by the replacements)."""
        refused = [k for k, v in tokenizer_options.items() if k in _UNSUPPORTED_TEXT_OPTIONS and v]
        if refused:
            raise ValueError(f"HoneybeeProcessor does not support {', '.join(refused)}; tokenize such text yourself")
        prompts = [self._tokenizer_text(t, n) for t, n in zip(texts, images_per_text)]
        encoded, offsets = self._tokenize(prompts, add_special_tokens, truncation=truncation, **tokenizer_options)
        if truncation not in (None, False, "do_not_truncate"):
            self._check_placeholders_kept(encoded["input_ids"], prompts, tokenizer_options.get("max_length"))
        features = {"input_ids": encoded["input_ids"]}
        if return_attention_mask is not False:
            features["attention_mask"] = encoded["attention_mask"]
        if return_length:
            features["length"] = [sum(mask) for mask in encoded["attention_mask"]]
        if return_mm_token_type_ids:
            features["mm_token_type_ids"] = [
                [int(i == self.image_token_id) for i in ids] for ids in encoded["input_ids"]
            ]
        images = [[m.start() for m in re.finditer(re.escape(self.image_token), prompt)] for prompt in prompts]
        if return_offsets_mapping:
            features["offset_mapping"] = (
                offsets
                if return_text_replacement_offsets
                else [self._offsets_as_given(*row) for row in zip(offsets, images)]
            )
        replacements = [self._image_replacements(positions) for positions in images]
        return features, (replacements if return_text_replacement_offsets else None)

    def _tokenize(self, prompts, add_special_tokens, **tokenizer_options):
        """The tokenizer on the prompts, each `<image>` expanded into its placeholders; and each token's (start, end)
        in the expanded prompt. The tokenizer adds `<s>` as text, never a second one after the chat template's."""
        tok = self.tokenizer
        bos = tok.bos_token if add_special_tokens is not False and tok.bos_token_id is not None else ""
        prefixes = ["" if prompt.startswith(bos) else bos for prompt in prompts]
        encoded = tok(
            [
                prefix + prompt.replace(self.image_token, self.replace_image_token())
                for prefix, prompt in zip(prefixes, prompts)
            ],
            add_special_tokens=False,
            return_offsets_mapping=True,
            return_attention_mask=True,
            return_token_type_ids=False,
            **tokenizer_options,
        )
        offsets = [
            [(max(start - len(prefix), 0), max(end - len(prefix), 0)) for start, end in row]
            for prefix, row in zip(prefixes, encoded["offset_mapping"])
        ]
        return encoded, offsets

    def _check_placeholders_kept(self, input_ids, prompts, max_length):
        """Truncation may cut text, never an image's placeholders (the model would get fewer than its features)."""
        for ids, prompt in zip(input_ids, prompts):
            if ids.count(self.image_token_id) < prompt.count(self.image_token) * self.num_visual_tokens:
                raise ValueError(
                    f"max_length={max_length or self.tokenizer.model_max_length} would cut an image's "
                    f"{self.num_visual_tokens} placeholder tokens out of the prompt; raise max_length or shorten the "
                    "text"
                )

    def _offsets_as_given(self, offsets, images):
        """Token offsets in the expanded prompt -> in the prompt as given (whose `<image>`s start at `images`)."""
        width = len(self.replace_image_token())
        return [_unexpanded(pair, images, len(self.image_token), width) for pair in offsets]

    def _image_replacements(self, images):
        """transformers 5's `text_replacement_offsets` of one prompt whose `<image>`s start at `images`."""
        image, replacement = self.image_token, self.replace_image_token()
        gain = len(replacement) - len(image)
        return [
            {
                "type": "image",
                "span": (p, p + len(image)),
                "new_span": (p + k * gain, p + k * gain + len(replacement)),
                "text": image,
                "replacement": replacement,
            }
            for k, p in enumerate(images)
        ]

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

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """The library's, with each prompt it renders tokenized as it is, whatever the template (the processor's own or
        `chat_template`): the official-format and bare-question readings of `__call__` are for texts written by hand.
        """
        rendered = _RENDERED.set(True)
        try:
            return super().apply_chat_template(conversation, chat_template, **kwargs)
        finally:
            _RENDERED.reset(rendered)

    def __call__(
        self,
        images: ImageInput | None = None,
        text: TextInput | list[TextInput] | None = None,
        audio=None,
        videos=None,
        **kwargs: Unpack[HoneybeeProcessorKwargs],
    ) -> BatchFeature:
        """`text`: a prompt or a list of prompts (see the class docstring); `images`: an image, a list, or one list
        per prompt."""
        if images is None and text is None:
            raise ValueError("give images, text, or both")
        options = self._merge_kwargs(
            self.valid_processor_kwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        text_options, image_options = dict(options["text_kwargs"]), dict(options["images_kwargs"])
        return_tensors = text_options.pop("return_tensors", None) or image_options.get("return_tensors")
        image_options.pop("return_tensors", None)  # the image processor always returns tensors here
        if text is None:
            flat = images if isinstance(images, (list, tuple)) else [images]
            flat = [x for sub in flat for x in (sub if isinstance(sub, (list, tuple)) else [sub])]
            return BatchFeature(self._pixel_values(flat, image_options), tensor_type=return_tensors)
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a string or a list of strings")
        per_text = self._images_per_text(texts, images)
        for t, imgs in zip(texts, per_text):
            if not self._is_bare_question(t) and t.count(self.image_token) != len(imgs):
                raise ValueError(
                    f"prompt {t[:80]!r}{'…' if len(t) > 80 else ''} holds {t.count(self.image_token)} "
                    f"{self.image_token} tokens but {len(imgs)} images were given for it"
                )
        text_options = {**processor_level_text_options(options), **text_options}
        features, replacements = self._text_features(texts, [len(imgs) for imgs in per_text], **text_options)
        flat = [img for imgs in per_text for img in imgs]
        if flat:
            features.update(self._pixel_values(flat, image_options))
        batch = BatchFeature(features, tensor_type=return_tensors)
        if replacements is not None:  # a list of dicts per prompt: set after the tensor conversion
            batch["text_replacement_offsets"] = replacements
        return batch

    # -----------------------------------------------------------------------------------------------------------
    # images

    def _pixel_values(self, images, image_options=None):
        rgb = [load_rgb_image(x, f"image {i + 1} of {len(images)}") for i, x in enumerate(images)]
        # Explicit layout: transformers 4 guesses it from the array and takes (H, W, 3) for channels-first when H is
        # 1 or 3 (a 3-pixel-high image came out scrambled, a 1-pixel-high one raised).
        options = {"input_data_format": "channels_last", **(image_options or {})}
        pixels = self.image_processor(rgb, return_tensors="pt", **options)
        return {"pixel_values": pixels["pixel_values"]}

    # -----------------------------------------------------------------------------------------------------------
    # files

    def save_pretrained(self, save_directory, push_to_hub=False, **kwargs):
        """Write the processor as files that transformers 4.57 and 5.x both load, whichever of them runs this
        (`transformers_compat.processor_files`: not `ProcessorMixin.save_pretrained`, whose 5.x files 4.57 cannot
        load), each atomically. `push_to_hub=True` then uploads them as the library does (`repo_id`, `token`,
        `commit_message`, ... in `kwargs`)."""
        settings = {key: getattr(self, key) for key in ("num_query_tokens", "num_eos_tokens", "image_token")}
        files = processor_files(self, settings)
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        if self._auto_class is not None:  # loaded as remote code: the folder gets this file and those it imports too
            custom_object_save(self, folder)
        for file_name, text in files.items():
            (folder / file_name).parent.mkdir(exist_ok=True)
            write_text_atomic(folder / file_name, text)
        if push_to_hub:  # the library's upload, which saves again (through this method) into a fresh folder
            self.push_to_hub(kwargs.pop("repo_id", folder.name), **kwargs)
        return [str(folder / file_name) for file_name in files]


for _name, _value in processor_class_attributes().items():
    setattr(HoneybeeProcessor, _name, _value)


def write_text_atomic(path, text):
    """Write `text` to `path` through a temporary file in the same folder: a reader never sees half a file."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _unexpanded(offsets, images, image_width, width):
    """A token's (start, end) in the expanded text -> in the text as given: each `<image>` (`image_width` long,
    starting at `images[k]`) grew to `width`; every placeholder of an image maps to its `<image>`."""
    gain = width - image_width
    starts = [p + k * gain for k, p in enumerate(images)]
    start, end = offsets
    k = bisect.bisect_right(starts, start) - 1
    if k >= 0:
        start = images[k] if start < starts[k] + width else start - (k + 1) * gain
    k = bisect.bisect_left(starts, end) - 1
    if k >= 0:
        end = images[k] + image_width if end < starts[k] + width else end - (k + 1) * gain
    return start, end


__all__ = ["HoneybeeProcessor"]
