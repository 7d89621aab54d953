"""Training data for Honeybee: LLaVA-style conversations -> the official prompt -> ids, labels and pixels.

A sample is one JSON object per line (JSONL; a JSON array file, as LLaVA ships, works too):

    {"image": "coco/1.jpg", "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                                              {"from": "gpt", "value": "A cat."}, ...]}

`image` may be a list of paths (one per `<image>`) or absent (a text-only sample). Roles: `human`/`user`,
`gpt`/`assistant`, and an optional leading `system` turn that replaces the system prompt. A sample
`{"image": ..., "caption": "..."}` is trained in the official pre-training format `[NO_PROMPT] <image> {caption}`.

LLaVA writes `<image>` inside the human text; the official Honeybee layout gives each image its own human turn, so each
sample becomes chat messages with one image item per `<image>`, which the processor's chat template renders in the
official format; `apply_chat_template(tokenize=True, return_assistant_tokens_mask=True)` tokenizes it, and its assistant
mask is the official label rule (honeybee/tokenization_honeybee.py): only the answers after "\\nAI: " and their `</s>`
are learned; everything else is -100 (`encode_messages`).

Bad samples are reported as `file:line: problem` (and appended to a JSONL report file when one is given). With
`bad_samples="skip"` they are left out (problems found while loading an image mid-run are replaced by the next
good sample, so batch shapes and distributed ranks stay in step); with `"error"` the first one stops the run.
"""

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..image_loading_honeybee import load_rgb_image
from ..processing_honeybee import AI, HUMAN, IMAGE_TOKEN, NO_PROMPT, SYSTEM_PROMPT

logger = logging.getLogger(__name__)

USER_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant"}
IGNORE_INDEX = -100


class BadSampleError(ValueError):
    """A sample that cannot be trained on; `where` is `file:line` (or `file[index]` for a JSON array)."""

    def __init__(self, where, problem=None):
        # One argument: a whole message (how DataLoader workers re-raise an exception in the main process).
        super().__init__(where if problem is None else f"{where}: {problem}")
        self.where, self.problem = where, problem


@dataclass
class Sample:
    where: str  # file:line, for messages
    messages: list  # chat messages, with one image item per image
    images: list  # absolute image paths, in message order


def _is_main_process():
    return int(os.environ.get("RANK", "0")) == 0


def conversation_to_messages(conversations, num_images, system_prompt=SYSTEM_PROMPT):
    """LLaVA turns -> chat messages. Raises `ValueError` (the problem, without location) on bad input.

    Each `<image>` of a human turn becomes an image item ahead of that turn's text (in the official prompt, its own
    "\\nHuman: <image>" turn). A sample with images but no `<image>` anywhere gets them at the start of its first
    human turn, as LLaVA does.
    """
    if not isinstance(conversations, list) or not conversations:
        raise ValueError("'conversations' must be a non-empty list of turns")
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ValueError(f"turn {i} must be an object with a string 'value'")
        role = str(turn.get("from", turn.get("role", ""))).lower()
        if role == "system" and i == 0:
            system_prompt = turn["value"].strip()
            continue
        if role not in USER_ROLES | ASSISTANT_ROLES:
            name = turn.get("from", turn.get("role"))
            raise ValueError(f"turn {i} has role {name!r}; expected human/user or gpt/assistant")
        text = turn["value"]
        for marker in (HUMAN, AI):
            if marker in text:
                raise ValueError(f"turn {i} contains the role marker {marker!r}, which would corrupt the labels")
        if text.lstrip().startswith(NO_PROMPT):
            raise ValueError(f"turn {i} starts with {NO_PROMPT}, which is reserved for caption samples")
        if role in ASSISTANT_ROLES:
            if IMAGE_TOKEN in text:
                raise ValueError(f"assistant turn {i} contains {IMAGE_TOKEN}")
            if not text.strip():
                raise ValueError(f"assistant turn {i} is empty")
        turns.append((role in ASSISTANT_ROLES, text))
    if not any(is_answer for is_answer, _ in turns):
        raise ValueError("the conversation has no assistant (gpt) turn, so there is nothing to learn")
    placeholders = sum(text.count(IMAGE_TOKEN) for is_answer, text in turns if not is_answer)
    if placeholders == 0 and num_images:
        first_user = next((k for k, (is_answer, _) in enumerate(turns) if not is_answer), None)
        if first_user is None:
            raise ValueError(f"{num_images} image(s) but no human turn to put them in")
        turns[first_user] = (False, IMAGE_TOKEN * num_images + turns[first_user][1])
    elif placeholders != num_images:
        more = "more" if placeholders > num_images else "fewer"
        counts = f"{placeholders} {IMAGE_TOKEN} but {num_images} image(s)"
        raise ValueError(f"the conversation has {counts} ({more} {IMAGE_TOKEN} than images)")
    messages = [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}]
    for is_answer, text in turns:
        if is_answer:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": text.strip()}]})
            continue
        pieces = text.split(IMAGE_TOKEN)
        rest = "\n".join(p.strip() for p in pieces if p.strip())
        content = [{"type": "image"}] * (len(pieces) - 1) + ([{"type": "text", "text": rest}] if rest else [])
        messages.append({"role": "user", "content": content})
    return messages


def caption_to_messages(caption):
    """The official pre-training format, `<s> <image> caption </s>` with the loss on the caption and `</s>`."""
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError("'caption' must be a non-empty string")
    return [
        {"role": "system", "content": [{"type": "text", "text": NO_PROMPT}]},
        {"role": "user", "content": [{"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": caption.strip()}]},
    ]


def _image_list(record):
    images = record.get("image", record.get("images"))
    if images is None:
        return []
    if isinstance(images, str):
        return [images]
    if isinstance(images, list) and all(isinstance(x, str) for x in images):
        return images
    raise ValueError("'image' must be a path or a list of paths")


def _check_image(path, verify):
    if not os.path.isfile(path):
        raise ValueError(f"image file not found: {path}")
    if verify:
        try:
            with Image.open(path) as image:  # reads the header only; a full decode happens at training time
                image.verify()
        except Exception as error:  # PIL raises many types for broken files
            raise ValueError(f"corrupt or unreadable image {path}: {error}") from error


def _read_records(path):
    """(where, record or exception) for every sample of a JSONL file or a JSON array file."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if head.startswith("["):
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise BadSampleError(f"{path}:{error.lineno}", f"invalid JSON array: {error.msg}") from error
        for index, item in enumerate(items):
            yield f"{path}[{index}]", item
        return
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as error:
                yield f"{path}:{number}", ValueError(f"invalid JSON ({error.msg})")


def parse_sample(where, record, image_root, system_prompt=SYSTEM_PROMPT, verify_images=True):
    """One record -> `Sample`, or `BadSampleError` with the location."""
    try:
        if isinstance(record, Exception):
            raise record
        if not isinstance(record, dict):
            raise ValueError("a sample must be a JSON object")
        images = [os.path.join(image_root, p) for p in _image_list(record)]
        if "conversations" in record:
            messages = conversation_to_messages(record["conversations"], len(images), system_prompt)
        elif "caption" in record:
            if len(images) != 1:
                raise ValueError(f"a caption sample needs exactly one image, got {len(images)}")
            messages = caption_to_messages(record["caption"])
        else:
            raise ValueError("a sample needs 'conversations' (or 'caption' with one 'image')")
        for image in images:
            _check_image(image, verify_images)
    except ValueError as error:
        raise BadSampleError(where, str(error)) from None
    return Sample(where, messages, images)


class BadSampleReport:
    """Collects bad samples: logs each as `file:line: problem` and appends it to `path` (JSONL) if given."""

    def __init__(self, path=None, log=True):
        self.path, self.log, self.count = path, log, 0

    def add(self, error, skipped=True):
        self.count += 1
        if self.log:
            action = "skipped" if skipped else "refused"
            logger.warning("bad sample %s (%s)", error, action)
        if self.path is not None:
            entry = {"where": error.where, "problem": error.problem, "rank": int(os.environ.get("RANK", "0"))}
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")


def encode_messages(processor, messages, max_length=None, **template_options):
    """Chat messages (images inside their image items) -> dict(input_ids, labels, pixel_values or None), as training
    reads a sample: `apply_chat_template`'s ids, and as labels the ids under its assistant mask (-100 elsewhere), cut
    to `max_length` at the end; a `ValueError` if that would cut an image's placeholders."""
    encoded = processor.apply_chat_template(
        messages,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        return_tensors="pt",
        **template_options,
    )
    ids = encoded["input_ids"][0].tolist()
    labels = [i if learned else IGNORE_INDEX for i, learned in zip(ids, encoded["assistant_masks"][0].tolist())]
    # Cut here rather than through the processor's `truncation`: 4.57's apply_chat_template raises IndexError when
    # truncation removes a whole assistant turn.
    if max_length is not None and len(ids) > max_length:
        if processor.image_token_id in ids[max_length:]:
            raise ValueError(f"max_length={max_length} would cut an image's placeholder tokens; raise it")
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels, "pixel_values": encoded.get("pixel_values")}


class HoneybeeConversationDataset(Dataset):
    """LLaVA-format JSONL files as Honeybee training samples: `input_ids`, `labels` and `pixel_values`.

    Args:
        files: one path or a list of paths (JSONL, or JSON arrays).
        processor: the model's `HoneybeeProcessor` (`AutoProcessor.from_pretrained(model, trust_remote_code=True)`).
        image_root: folder that relative image paths start from; default: each data file's folder.
        max_length: token budget per sample (the official fine-tuning used 1024 with `<s>`); longer samples are
            cut at the end, unless that would cut an image or leave no answer (then they are bad samples).
        bad_samples: "skip" (report and leave out) or "error" (report and raise `BadSampleError`).
        system_prompt: the text ahead of the first turn.
        verify_images: open each image's header at start-up (cheap), so broken files are reported before training.
        report_path: a JSONL file that collects every bad sample (location, problem, rank).
    """

    def __init__(
        self,
        files,
        processor,
        image_root=None,
        max_length=1024,
        bad_samples="skip",
        system_prompt=SYSTEM_PROMPT,
        verify_images=True,
        report_path=None,
    ):
        if bad_samples not in ("skip", "error"):
            raise ValueError(f"bad_samples must be 'skip' or 'error', got {bad_samples!r}")
        self.processor, self.max_length, self.bad_samples = processor, max_length, bad_samples
        # Start-up problems are the same on every rank: only the main process reports them.
        self.report = BadSampleReport(report_path if _is_main_process() else None, log=_is_main_process())
        files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
        self.samples = []
        for file in files:
            root = image_root if image_root is not None else os.path.dirname(os.path.abspath(file))
            for where, record in _read_records(file):
                try:
                    self.samples.append(parse_sample(where, record, root, system_prompt, verify_images))
                except BadSampleError as error:
                    self.report.add(error, skipped=bad_samples == "skip")
                    if bad_samples == "error":
                        raise
        self.skipped_at_start = self.report.count
        if not self.samples:
            bad = f"{self.report.count} bad, reported above" if self.report.count else "none at all"
            raise ValueError(
                f"no usable samples in {', '.join(map(str, files))} ({bad}); each line must be a JSON object with "
                "'conversations' (LLaVA style) or 'caption' and 'image'"
            )
        if self.skipped_at_start:
            logger.warning("skipped %d bad sample(s); %d remain", self.skipped_at_start, len(self.samples))
        # Mid-run problems (an image that fails to decode) happen on the rank that reads them: every rank reports.
        self.runtime_report = BadSampleReport(report_path)
        self._bad = set()

    @property
    def has_text_only_samples(self):
        return any(not s.images for s in self.samples)

    def __len__(self):
        return len(self.samples)

    def encode(self, sample):
        """Sample -> dict(input_ids, labels, pixel_values or None); `BadSampleError` if it cannot be used."""
        images = []
        for path in sample.images:
            try:
                images.append(load_rgb_image(path))
            except (ValueError, OSError) as error:  # undecodable, though its header looked fine
                raise BadSampleError(sample.where, str(error)) from None
        pictures = iter(images)  # each image item of the messages, in order, gets its decoded image
        messages = [
            {**m, "content": [{**c, "image": next(pictures)} if c["type"] == "image" else c for c in m["content"]]}
            for m in sample.messages
        ]
        try:
            encoded = encode_messages(self.processor, messages, self.max_length)
        except (ValueError, TypeError, OSError, RuntimeError) as error:  # an image cut, or unusable pixels
            raise BadSampleError(sample.where, str(error)) from None
        if all(label == IGNORE_INDEX for label in encoded["labels"]):
            raise BadSampleError(sample.where, f"no answer token is left within max_length={self.max_length}")
        return encoded

    def __getitem__(self, index):
        for offset in range(len(self.samples)):
            k = (index + offset) % len(self.samples)
            if k in self._bad:
                continue
            try:
                return self.encode(self.samples[k])
            except BadSampleError as error:
                self._bad.add(k)
                self.runtime_report.add(error, skipped=self.bad_samples == "skip")
                if self.bad_samples == "error":
                    raise
        raise RuntimeError("every sample of the data set failed to load; see the bad-sample messages above")


class HoneybeeCollator:
    """Pads a list of samples into a batch: `input_ids` (pad id), `attention_mask` (0 on padding), `labels` (-100
    on padding), and `pixel_values` with every image of the batch in sample order (absent if there is none)."""

    def __init__(self, pad_token_id, padding_side="right", pad_to_multiple_of=None):
        self.pad_token_id, self.padding_side, self.pad_to_multiple_of = pad_token_id, padding_side, pad_to_multiple_of

    def __call__(self, samples):
        length = max(len(s["input_ids"]) for s in samples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.full((len(samples), length), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(samples), length), dtype=torch.long),
            "labels": torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long),
        }
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            span = slice(length - n, length) if self.padding_side == "left" else slice(0, n)
            batch["input_ids"][row, span] = torch.tensor(sample["input_ids"])
            batch["attention_mask"][row, span] = 1
            batch["labels"][row, span] = torch.tensor(sample["labels"])
        pixels = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
        return batch


__all__ = [
    "BadSampleError",
    "HoneybeeCollator",
    "HoneybeeConversationDataset",
    "caption_to_messages",
    "conversation_to_messages",
    "encode_messages",
    "parse_sample",
]
