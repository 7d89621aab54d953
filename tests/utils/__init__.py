"""What the tests share: where things are, the transformers version, the photos, running a script in another
interpreter, and training inputs from chat messages. Area-specific helpers sit beside this module: `cli` (console
scripts and their stderr), `finetune` (a tiny trainable model and the photo data set), `kernel_check` (kernel against
reference), `official_format` (checkpoints written as the official code writes them) and `load_and_run` (load a Hub
folder and run it, also a script).

Test modules import it as `utils`: pytest puts tests/ (the folder of the root conftest.py) on sys.path. A script the
tests run in a fresh process puts tests/ there itself.
"""

import re
import subprocess
from pathlib import Path

import transformers

import honeybee_hf
from honeybee_hf.processing_honeybee import AI, CAPTION_PROMPT, HUMAN, IMAGE_TOKEN, NO_PROMPT
from honeybee_hf.train.data import HoneybeeCollator, encode_messages

TF4 = transformers.__version__.startswith("4.")  # the tests' one name for "running on transformers 4.57"
TESTS = Path(__file__).resolve().parent.parent
REPO = TESTS.parent  # the checkout the tests run from: README, setup.cfg, examples/, its .venvs/
PACKAGE_DIR = Path(honeybee_hf.__file__).resolve().parent  # the package the tests import: its code files and assets
PHOTO_DIR = PACKAGE_DIR / "assets" / "images"
PHOTOS = sorted(PHOTO_DIR.glob("*.jpeg"))
OFFICIAL_FIXTURES = TESTS / "fixtures" / "official"  # tensors the official code computed (shared/fixtures/official)
OFFICIAL_CKPT = TESTS / "fixtures" / "official_ckpt"  # a tiny checkpoint saved as the official release archives


def photo(i=0):
    """One of the repository's real photographs, as a PIL image."""
    from PIL import Image

    return Image.open(PHOTOS[i])


def venv_python(name):
    """The interpreter of the checkout's test environment `name` (.venvs/NAME, scripts/setup_envs.sh), or None."""
    python = REPO / ".venvs" / name / "bin" / "python"
    return python if python.exists() else None


def other_python():
    """The interpreter of the other transformers version's test environment, or None."""
    return venv_python("tf5" if TF4 else "tf4")


def run_script(python, *args, env=None):
    result = subprocess.run([str(python), *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"{python} {args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def training_inputs(processor, conversations, padding_side="right", **template_options):
    """What training feeds the model for chat messages (one conversation or a list of them): each through
    train/data.py's `encode_messages`, padded into one batch by its collator."""
    rows = [conversations] if isinstance(conversations[0], dict) else conversations
    samples = [encode_messages(processor, messages, **template_options) for messages in rows]
    return HoneybeeCollator(processor.tokenizer.pad_token_id, padding_side)(samples)


def official_messages(prompt, images=()):
    """A prompt in the official format -> (chat messages, whether it ends with an open "\\nAI: " turn), `images`
    filling its `<image>`s in order: the official test cases as a chat client would send them."""
    images = iter(images)
    if prompt.startswith(CAPTION_PROMPT):
        caption = {"role": "assistant", "content": [{"type": "text", "text": prompt[len(CAPTION_PROMPT) :]}]}
        image = {"role": "user", "content": [{"type": "image", "image": next(images)}]}
        return [{"role": "system", "content": [{"type": "text", "text": NO_PROMPT}]}, image, caption], False
    system, *turns = re.split(f"({re.escape(HUMAN)}|{re.escape(AI)})", prompt)
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}]
    for marker, text in zip(turns[::2], turns[1::2]):
        if marker == AI:
            if text:
                messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
            continue
        item = {"type": "image", "image": next(images)} if text == IMAGE_TOKEN else {"type": "text", "text": text}
        if messages[-1]["role"] == "user":
            messages[-1]["content"].append(item)
        else:
            messages.append({"role": "user", "content": [item]})
    return messages, turns[-2:] == [AI, ""]
