"""Honeybee processor and captioning pipeline (arXiv 2312.06742; official code github.com/kakaobrain/honeybee).

Images: the official squash resize (bicubic to S×S, no crop), CLIP mean/std, via `CLIPImageProcessor`.
Text: the official prompt format, tokenised exactly as the official code does (HEAD, §5.2 of our notes): the prompt
is split at `<image>`, "\nHuman: " and "\nAI: ", each piece is tokenised on its own with sentencepiece's dummy
prefix, every answer after "\nAI: " ends with `</s>`, and each `<image>` becomes `num_query_tokens +
num_eos_tokens` placeholder ids that the model overwrites with visual tokens.
"""

import base64
import binascii
import copy
import json
import os
import re
import tempfile
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image, ImageOps
from tokenizers import Tokenizer, normalizers
from transformers import BatchFeature, Pipeline
from transformers.dynamic_module_utils import custom_object_save
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, load_image
from transformers.processing_utils import MultiModalData, ProcessingKwargs, ProcessorMixin, TextKwargs

_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

SYSTEM_PROMPT = (
    "The following is a conversation between a curious human and AI assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
HUMAN, AI = "\nHuman: ", "\nAI: "
NO_PROMPT = "[NO_PROMPT] <image> "  # pre-training captions: <s> <image> caption </s>
CAPTION_QUESTION = "Describe the image briefly."

# Renders chat messages in the official prompt format:
#   <s>{system}\nHuman: <image>\nHuman: {question}\nAI: {answer}</s>\nHuman: ...
# A system message replaces the default system prompt; the system message "[NO_PROMPT]" renders the official
# pre-training caption format instead: <s>[NO_PROMPT] <image> {caption}</s>. Each answer and its `</s>` sit in a
# `{% generation %}` block, which is exactly what the official training loss supervises.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set system = namespace(text='" + SYSTEM_PROMPT.replace("'", "\\'") + "') -%}"
    "{%- for m in messages if m['role'] == 'system' -%}"
    "{%- set system.text = m['content'] if m['content'] is string else "
    "(m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ')) -%}"
    "{%- endfor -%}"
    "{%- set turns = messages | rejectattr('role', 'equalto', 'system') | list -%}"
    "{%- if system.text == '[NO_PROMPT]' -%}"
    "{%- if turns | length != 2 or turns[0]['role'] != 'user' or turns[1]['role'] != 'assistant' -%}"
    "{{- raise_exception('[NO_PROMPT] (a pre-training caption) takes one user turn with one image and one "
    "assistant turn with the caption') -}}"
    "{%- endif -%}"
    "{%- set caption = turns[1]['content'] if turns[1]['content'] is string else "
    "(turns[1]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('')) -%}"
    "{{- '[NO_PROMPT] <image> ' -}}{%- generation -%}{{- caption + eos_token -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- system.text -}}"
    "{%- for m in turns -%}"
    "{%- set items = [{'type': 'text', 'text': m['content']}] if m['content'] is string else m['content'] -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- for item in items -%}"
    "{%- if item['type'] == 'image' -%}{{- '\\nHuman: <image>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- '\\nHuman: ' + item['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{{- '\\nAI: ' -}}{%- generation -%}"
    "{%- for item in items if item['type'] == 'text' -%}{{- item['text'] -}}{%- endfor -%}{{- eos_token -}}"
    "{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '\\nAI: ' -}}{%- endif -%}"
    "{%- endif -%}"
)

# http(s) images are fetched by transformers' `load_image` (as its pipelines do); a server that does not answer
# must not hang a training run.
IMAGE_URL_TIMEOUT = 30.0
_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]{64,}")


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


# ---------------------------------------------------------------------------------------------------------------
# Images


def describe_image(image):
    """A short name for an image input, for error messages: never the whole payload."""
    if isinstance(image, (str, os.PathLike)):
        text = os.fspath(image)
        if text.startswith("data:"):
            return f"a data URL of {len(text):,} characters ({text[:30]}…)"
        return text if len(text) <= 120 else f"{text[:60]!r}… ({len(text):,} characters)"
    if isinstance(image, (bytes, bytearray)):
        return f"<bytes> ({len(image):,} bytes)"
    if isinstance(image, Image.Image):
        return f"a {image.mode} PIL image of {image.width}x{image.height}"
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return f"an array of {image.dtype} {tuple(image.shape)}"
    return f"a {type(image).__name__}"


def _open_image(image):
    """The input as a PIL image (possibly not decoded yet)."""
    if isinstance(image, (str, os.PathLike)) and os.path.isfile(image):
        return Image.open(image)
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        # The library's loader: it fetches with the HTTP client of this transformers version.
        return load_image(image, timeout=IMAGE_URL_TIMEOUT)
    if isinstance(image, str) and (image.startswith("data:") or _BASE64.fullmatch(image)):
        # Decoded here rather than by `load_image`, which converts to RGB (16-bit images would clip at 255) and
        # repeats the whole payload in its error message.
        payload = image.split(",", 1)[1] if image.startswith("data:") else image
        return Image.open(BytesIO(base64.b64decode(payload, validate=False)))
    if isinstance(image, (str, os.PathLike)):
        raise FileNotFoundError(image)
    if isinstance(image, (bytes, bytearray)):
        return Image.open(BytesIO(image))
    if isinstance(image, (np.ndarray, torch.Tensor)):
        array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(
                f"array images must be uint8 of shape (height, width, 3), got {array.dtype} {array.shape}; "
                "pass a PIL image for anything else"
            )
        return Image.fromarray(array)
    if isinstance(image, Image.Image):
        return image
    raise TypeError(
        "expected a PIL image, a path, bytes or a uint8 array (or an http(s) URL, a data URL or base64), got "
        f"{type(image).__name__}"
    )


def load_rgb_image(image, where="image"):
    """Any image input -> an 8-bit RGB PIL image, upright (EXIF orientation applied, as transformers' `load_image`).

    Inputs: a PIL image, a path, bytes, an http(s) URL, a `data:image/...;base64,` URL, raw base64, or a uint8
    array (H, W, 3). Anything unreadable raises `ValueError` naming `where` (e.g. "image 2 of 3") and the input.
    """
    name = describe_image(image)
    try:
        pil = _open_image(image)
        pil.load()  # PIL decodes lazily: truncated or corrupt data fails here, not later inside the resize
        pil = ImageOps.exif_transpose(pil)
    except FileNotFoundError as error:
        raise ValueError(f"{where}: image file {name} does not exist") from error
    except Image.DecompressionBombError as error:
        raise ValueError(f"{where}: {name} is too large to decode safely ({error}); downscale it first") from error
    except (OSError, SyntaxError, binascii.Error) as error:  # PIL's decoding errors, bad base64, requests' errors
        raise ValueError(f"cannot read {where} ({name}): {str(error)[:200]}; is it a valid JPEG/PNG/WebP file?") from error
    except (ValueError, TypeError) as error:  # ours, about the input's type or layout
        raise type(error)(f"{where} ({name}): {error}") from error
    except Exception as error:  # httpx's network errors (transformers 5)
        raise ValueError(f"cannot load {where} ({name}): {str(error)[:200]}") from error
    if pil.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        # PIL's convert("RGB") clips 16-bit values at 255; scale to 8 bits instead.
        pil = Image.fromarray((np.asarray(pil, dtype=np.uint16) >> 8).astype(np.uint8))
    elif pil.mode in ("I", "F"):
        raise ValueError(
            f"{where} ({name}): image mode {pil.mode!r} (32-bit integer or float pixels) has no standard 8-bit "
            "meaning; convert it to an 8-bit RGB image yourself"
        )
    # As the official pipeline: alpha is dropped, grayscale/CMYK/palette images become RGB.
    return pil.convert("RGB")


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and files


def sentencepiece_front_end():
    """sentencepiece's legacy Llama front end as a `tokenizers` normalizer: a `▁` before each piece of text between
    special tokens, every space as `▁` (no pre-tokenizer). The official code tokenises with it."""
    return normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])


def with_sentencepiece_front_end(tokenizer):
    """`tokenizer`, or a copy with the legacy sentencepiece front end if it was given a Metaspace one.

    Folders written before the tokenizer files named `PreTrainedTokenizerFast` name `LlamaTokenizerFast`, which
    transformers 5 rebuilds with a Metaspace pre-tokenizer whatever tokenizer.json says; Metaspace skips the dummy
    prefix when a piece starts with a space, so ids differ from the official ones (leading or double spaces, text
    after `<image>`). Such tokenizers get the official front end back; any other tokenizer is left alone.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or json.loads(backend.to_str()).get("pre_tokenizer", None) is None:
        return tokenizer
    if json.loads(backend.to_str())["pre_tokenizer"].get("type") != "Metaspace":
        return tokenizer
    tokenizer = copy.deepcopy(tokenizer)  # the caller's object keeps its pipeline
    tokenizer.backend_tokenizer.normalizer = sentencepiece_front_end()
    tokenizer.backend_tokenizer.pre_tokenizer = None
    return tokenizer


def _json(data):
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


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


# Call-time text options the library's tokenizers keep in tokenizer_config.json and processors apply as defaults.
_SAVED_TEXT_DEFAULTS = ("padding", "max_length", "truncation", "pad_to_multiple_of")


def tokenizer_files(tokenizer, processor_class=None):
    """{file name: text} of tokenizer.json, tokenizer_config.json and special_tokens_map.json that transformers 4.57
    and 5.x both load as written, whichever version runs this.

    `tokenizer_class` is `PreTrainedTokenizerFast`, which both versions build from tokenizer.json unchanged (a Llama
    class would be rebuilt by 5.x, see `with_sentencepiece_front_end`); only keys both versions read are written
    (5.x's own `save_pretrained` writes `extra_special_tokens` as a list, which 4.57 cannot load).
    """
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_padding()  # call-time settings a fast tokenizer may have left on its backend
    backend.no_truncation()
    named = {name: getattr(tokenizer, name) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
    added = tokenizer.added_tokens_decoder
    extra = [t.content for t in added.values() if t.special and t.content not in named.values()]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{name: token for name, token in named.items() if token is not None},
        "additional_special_tokens": extra,
        "added_tokens_decoder": {
            str(i): {
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            }
            for i, t in sorted(added.items())
        },
        "padding_side": tokenizer.padding_side,
        "truncation_side": tokenizer.truncation_side,
        "model_max_length": tokenizer.model_max_length,
        "model_input_names": ["input_ids", "attention_mask"],  # PreTrainedTokenizerFast of 4.x adds token_type_ids
        "clean_up_tokenization_spaces": False,
        **{k: tokenizer.init_kwargs[k] for k in _SAVED_TEXT_DEFAULTS if tokenizer.init_kwargs.get(k) is not None},
    }
    if processor_class is not None:
        config["processor_class"] = processor_class
    specials = {name: token for name, token in named.items() if token is not None}
    specials["additional_special_tokens"] = extra
    return {
        "tokenizer.json": backend.to_str(pretty=True),
        "tokenizer_config.json": _json(config),
        "special_tokens_map.json": _json(specials),
    }


def image_processor_config(image_processor, processor_class):
    """preprocessor_config.json as both versions read it (5.x would nest it in processor_config.json)."""
    config = {
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": processor_class,
        **{
            key: getattr(image_processor, key)
            for key in (
                "do_resize", "do_center_crop", "do_rescale", "rescale_factor", "do_normalize", "do_convert_rgb"
            )
        },
        "resample": int(image_processor.resample),
        "image_mean": [float(x) for x in image_processor.image_mean],
        "image_std": [float(x) for x in image_processor.image_std],
    }
    for key in ("size", "crop_size"):
        value = getattr(image_processor, key, None)
        if value is not None:
            config[key] = {k: v for k, v in dict(value).items() if v is not None}
    return config


# ---------------------------------------------------------------------------------------------------------------
# Processor


class HoneybeeTextKwargs(TextKwargs, total=False):
    return_labels: bool  # the official training labels (answers and their `</s>`; -100 elsewhere)
    return_text_replacement_offsets: bool  # a processor option of transformers 5; 4.57 does not know it


class HoneybeeProcessorKwargs(ProcessingKwargs, total=False):
    text_kwargs: HoneybeeTextKwargs
    _defaults = {"text_kwargs": {"padding": True}}


# Tokenizer options HoneybeeProcessor cannot honour: refused rather than ignored.
_UNSUPPORTED_TEXT_OPTIONS = (
    "text_pair", "text_target", "text_pair_target", "is_split_into_words", "return_overflowing_tokens",
    "return_special_tokens_mask", "stride",
)


class HoneybeeProcessor(ProcessorMixin):
    r"""Turns images and prompts into `input_ids`, `attention_mask` and `pixel_values` for Honeybee.

    A text is either a full prompt in the official format (it contains `<image>` or "\nHuman: "; `apply_chat_template`
    renders one from chat messages), or a bare question, which is wrapped in the official inference template with one
    `<image>` per image of its sample: `"{SYSTEM}\nHuman: <image>\nHuman: {question}\nAI: "`. Batches are padded on
    the tokenizer's side (left, for generation).

    Options are routed as transformers' processors route them: flat or in `text_kwargs`/`images_kwargs` (the same
    option in both raises), over the tokenizer's saved defaults. Text options: `padding` (default True), `max_length`,
    `truncation`, `pad_to_multiple_of`, `padding_side`, `add_special_tokens`, `return_attention_mask`,
    `return_offsets_mapping`, `return_length`, `return_mm_token_type_ids`, `return_text_replacement_offsets`,
    `return_labels` (the official training labels); image options go to the image processor (`do_normalize`, ...).

    Args:
        image_processor (`CLIPImageProcessor`), tokenizer (Llama sentencepiece tokenizer with `<image>` added),
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
        if tokenizer is not None:
            tokenizer = with_sentencepiece_front_end(tokenizer)
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

    def replace_image_token(self, image_inputs=None, image_idx=0, **kwargs):
        """What each `<image>` of a prompt expands to (transformers 5's hook name; vLLM reads it back as offsets)."""
        return self.image_token * self.num_visual_tokens

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        """Placeholder tokens and `pixel_values` rows per image, for vLLM: the same for every image size."""
        count = len(image_sizes) if image_sizes is not None else 0
        return MultiModalData(num_image_tokens=[self.num_visual_tokens] * count, num_image_patches=[1] * count)

    # -----------------------------------------------------------------------------------------------------------
    # text

    def _chunks(self, prompt, start):
        """(begin, end, kind) of the pieces the official code tokenises one by one; kind: image, text or answer."""
        if prompt.startswith(NO_PROMPT, start):  # the official pre-training format
            image = start + NO_PROMPT.index(self.image_token)
            return [(image, image + len(self.image_token), "image"), (start + len(NO_PROMPT), len(prompt), "answer")]
        pattern = "|".join(map(re.escape, [self.image_token, AI, HUMAN]))
        bounds, position = [], start
        for match in re.finditer(pattern, prompt[start:]):
            begin, end = start + match.start(), start + match.end()
            if begin > position:
                bounds.append((position, begin))
            bounds.append((begin, end))
            position = end
        if position < len(prompt):
            bounds.append((position, len(prompt)))
        chunks = []
        for i, (begin, end) in enumerate(bounds):
            text = prompt[begin:end]
            after_ai = i > 0 and prompt[bounds[i - 1][0] : bounds[i - 1][1]] == AI
            chunks.append((begin, end, "image" if text == self.image_token else "answer" if after_ai else "text"))
        return chunks

    def _encode(self, prompt, add_special_tokens=True, expand_offsets=False):
        """One prompt -> dict of `ids`, `labels` mask (1 where the official training loss applies: answers and their
        `</s>`), char `offsets` per token, `open_eos` (the final `</s>` was added, not written in the prompt) and the
        `replacements` of its `<image>`s. Offsets index the prompt, or with `expand_offsets` the prompt with every
        `<image>` replaced by its placeholders (transformers 5 shifts assistant spans by the replacements)."""
        tok = self.tokenizer
        bos, eos, eos_id = tok.bos_token, tok.eos_token, tok.eos_token_id
        ids, mask, offsets, start = [], [], [], 0
        if bos is not None and prompt.startswith(bos):  # written by the chat template: never a second one
            ids, mask, offsets, start = [tok.bos_token_id], [0], [(0, len(bos))], len(bos)
        elif add_special_tokens and tok.bos_token_id is not None:
            ids, mask, offsets = [tok.bos_token_id], [0], [(0, 0)]
        chunks = self._chunks(prompt, start)
        texts = [prompt[b:e] for b, e, kind in chunks if kind != "image"]
        batch = tok(texts, add_special_tokens=False, return_offsets_mapping=True) if texts else None
        encoded = iter(zip(batch["input_ids"], batch["offset_mapping"]) if texts else [])
        replacement = self.replace_image_token()
        gain, replacements, open_eos = 0, [], False
        for begin, end, kind in chunks:
            if kind == "image":
                n, width = self.num_visual_tokens, len(self.image_token)
                ids += [self.image_token_id] * n
                mask += [0] * n
                new_begin = begin + gain
                if expand_offsets:
                    offsets += [(new_begin + k * width, new_begin + (k + 1) * width) for k in range(n)]
                else:
                    offsets += [(begin, end)] * n
                replacements.append({
                    "type": "image",
                    "span": (begin, end),
                    "new_span": (new_begin, new_begin + len(replacement)),
                    "text": self.image_token,
                    "replacement": replacement,
                })
                gain += len(replacement) - (end - begin)
                continue
            piece, piece_offsets = next(encoded)
            label = int(kind == "answer")
            ids += piece
            mask += [label] * len(piece)
            shift = begin + (gain if expand_offsets else 0)
            offsets += [(shift + s, shift + e) for s, e in piece_offsets]
            open_eos = kind == "answer" and not prompt[begin:end].endswith(eos)
            if open_eos:  # the official code ends every answer with </s>
                ids.append(eos_id)
                mask.append(1)
                offsets.append((shift + end - begin, shift + end - begin))
        return {"ids": ids, "labels": mask, "offsets": offsets, "open_eos": open_eos, "replacements": replacements}

    def encode_prompt(self, prompt, add_bos=True):
        """Token ids of one prompt and, for each id, 1 where the official training loss applies (answers + `</s>`)."""
        encoded = self._encode(prompt, add_special_tokens=add_bos)
        return encoded["ids"], encoded["labels"]

    def _is_bare_question(self, text):
        return not (self.image_token in text or HUMAN in text or AI in text or NO_PROMPT in text)

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
        per prompt. Without `return_labels` a prompt's final answer is left open for generation (its `</s>` is not
        added), as the official inference does; a `</s>` written in the prompt (the chat template's) is kept."""
        if images is None and text is None:
            raise ValueError("give images, text, or both")
        options = self._merge_kwargs(
            HoneybeeProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        text_options, image_options = dict(options["text_kwargs"]), dict(options["images_kwargs"])
        return_tensors = text_options.pop("return_tensors", None) or image_options.pop("return_tensors", None)
        image_options.pop("return_tensors", None)
        if text is None:
            flat = images if isinstance(images, (list, tuple)) else [images]
            flat = [x for sub in flat for x in (sub if isinstance(sub, (list, tuple)) else [sub])]
            return BatchFeature(self._pixel_values(flat, image_options), tensor_type=return_tensors)
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a string or a list of strings")
        per_text = self._images_per_text(texts, images)
        prompts = []
        for t, imgs in zip(texts, per_text):
            prompt = self._wrap_question(t, len(imgs)) if self._is_bare_question(t) else t
            if prompt.count(self.image_token) != len(imgs):
                raise ValueError(
                    f"prompt {prompt[:80]!r}{'…' if len(prompt) > 80 else ''} holds {prompt.count(self.image_token)} "
                    f"{self.image_token} tokens but {len(imgs)} images were given for it"
                )
            prompts.append(prompt)
        for key in (k for k in ("return_mm_token_type_ids", "return_text_replacement_offsets") if k in options):
            text_options.setdefault(key, options[key])  # processor-level options on transformers 5
        features, replacements = self._text_features(prompts, **text_options)
        flat = [img for imgs in per_text for img in imgs]
        if flat:
            features.update(self._pixel_values(flat, image_options))
        batch = BatchFeature(features, tensor_type=return_tensors)
        if replacements is not None:  # a list of dicts per prompt: set after the tensor conversion
            batch["text_replacement_offsets"] = replacements
        return batch

    def _text_features(
        self,
        prompts,
        padding=True,
        max_length=None,
        truncation=None,
        pad_to_multiple_of=None,
        padding_side=None,
        add_special_tokens=True,
        return_attention_mask=None,
        return_offsets_mapping=False,
        return_length=False,
        return_mm_token_type_ids=False,
        return_text_replacement_offsets=False,
        return_labels=False,
        return_token_type_ids=None,  # never returned: transformers 4's generate rejects them
        verbose=None,
        **unsupported,
    ):
        refused = {k: v for k, v in unsupported.items() if k in _UNSUPPORTED_TEXT_OPTIONS and v}
        if refused:
            raise ValueError(f"HoneybeeProcessor does not support {', '.join(refused)}; tokenize such text yourself")
        tok = self.tokenizer
        encoded = [
            self._encode(p, add_special_tokens is not False, expand_offsets=bool(return_text_replacement_offsets))
            for p in prompts
        ]
        if not return_labels:
            # As the official inference processor (no_eos=True): an answer that ends the prompt is left open, so that
            # generation continues it; answers inside the prompt keep their `</s>`.
            for e in encoded:
                if e["open_eos"]:
                    for key in ("ids", "labels", "offsets"):
                        e[key] = e[key][:-1]
        padding = getattr(padding, "value", padding)  # a PaddingStrategy
        truncation = getattr(truncation, "value", truncation)
        if (truncation not in (None, False, "do_not_truncate") or padding == "max_length") and max_length is None:
            max_length = tok.model_max_length
        if truncation not in (None, False, "do_not_truncate"):
            encoded = [self._truncate(e, max_length) for e in encoded]
        length = max(len(e["ids"]) for e in encoded)
        if padding == "max_length":
            length = max(length, max_length)
        if pad_to_multiple_of:
            length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
        pad = padding not in (False, None, "do_not_pad")
        side = padding_side or tok.padding_side
        columns = {"input_ids": (lambda e: e["ids"], tok.pad_token_id)}
        if return_attention_mask is not False:
            columns["attention_mask"] = (lambda e: [1] * len(e["ids"]), 0)
        if return_labels:
            columns["labels"] = (lambda e: [i if m else -100 for i, m in zip(e["ids"], e["labels"])], -100)
        if return_offsets_mapping:
            columns["offset_mapping"] = (lambda e: e["offsets"], (0, 0))
        if return_mm_token_type_ids:
            columns["mm_token_type_ids"] = (lambda e: [int(i == self.image_token_id) for i in e["ids"]], 0)
        features = {}
        for name, (values_of, fill) in columns.items():
            rows = []
            for e in encoded:
                values = list(values_of(e))
                extra = [fill] * (length - len(values)) if pad else []
                rows.append(extra + values if side == "left" else values + extra)
            features[name] = rows
        if return_length:
            features["length"] = [len(e["ids"]) for e in encoded]
        replacements = [e["replacements"] for e in encoded] if return_text_replacement_offsets else None
        return features, replacements

    def _truncate(self, encoded, max_length):
        ids = encoded["ids"]
        if self.image_token_id in ids[max_length:]:
            raise ValueError(
                f"max_length={max_length} would cut an image's {self.num_visual_tokens} placeholder tokens out of a "
                f"{len(ids)}-token prompt; raise max_length or shorten the text"
            )
        kept = {key: encoded[key][:max_length] for key in ("ids", "labels", "offsets")}
        return {**encoded, **kept}

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
        """Write the processor as files that transformers 4.57 and 5.x both load, whichever of them runs this.

        The library's writer is version-specific (5.x writes a tokenizer_config.json that 4.57 cannot read and nests
        the image processor's config); this one writes processor_config.json, preprocessor_config.json,
        chat_template.jinja and the tokenizer files (`tokenizer_files`), each atomically. `push_to_hub=True` then
        uploads them as the library does (`repo_id`, `token`, `commit_message`, ... in `kwargs`).
        """
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        if self._auto_class is not None:  # loaded as remote code: the folder gets processing_honeybee.py too
            custom_object_save(self, folder)
        if not isinstance(self.chat_template, str):
            raise ValueError("HoneybeeProcessor saves one chat template (a string); got several")
        name = type(self).__name__
        processor_config = {
            "processor_class": name,
            "auto_map": {"AutoProcessor": f"{type(self).__module__.rsplit('.', 1)[-1]}.{name}"},
            "num_query_tokens": self.num_query_tokens,
            "num_eos_tokens": self.num_eos_tokens,
            "image_token": self.image_token,
        }
        files = {
            "processor_config.json": _json(processor_config),
            "preprocessor_config.json": _json(image_processor_config(self.image_processor, name)),
            "chat_template.jinja": self.chat_template,
            **tokenizer_files(self.tokenizer, processor_class=name),
        }
        for file_name, text in files.items():
            write_text_atomic(folder / file_name, text)
        if push_to_hub:  # the library's upload, which saves again (through this method) into a fresh folder
            self.push_to_hub(kwargs.pop("repo_id", folder.name), **kwargs)
        return [str(folder / file_name) for file_name in files]

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


__all__ = [
    "HoneybeeImageToTextPipeline",
    "HoneybeeProcessor",
    "honeybee_image_processor",
    "load_rgb_image",
    "tokenizer_files",
]
