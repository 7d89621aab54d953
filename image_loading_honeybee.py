"""Reading Honeybee's image inputs: a PIL image, a path, bytes, an http(s) or data URL, base64 or a uint8 array becomes
the upright 8-bit RGB PIL image the official pipeline sees, or a `ValueError` that names the input."""

import base64
import binascii
import os
import re
from io import BytesIO

import numpy as np
import torch
from PIL import Image
from transformers.image_utils import load_image

# http(s) images are fetched by transformers' `load_image` (as its pipelines do); a server that does not answer
# must not hang a training run.
IMAGE_URL_TIMEOUT = 30.0
_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]{64,}")


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
    """The input as a PIL image, possibly not decoded yet (PIL decodes lazily).

    transformers' `load_image` opens str paths, http(s) URLs, data URLs and base64 itself, but converts to RGB at
    once, which clips 16-bit images at 255 and hides 32-bit ones (see `_eight_bit`); and it takes no `Path`, bytes
    or arrays. So only URLs are its job here (its HTTP client, as its pipelines fetch); everything else is opened
    here, unconverted. Base64 is decoded strictly: `load_image`'s lenient decoder skips stray characters, and a
    payload that is not base64 would reach PIL and fail as "not an image".
    """
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        return load_image(image, timeout=IMAGE_URL_TIMEOUT)
    if isinstance(image, (str, os.PathLike)) and os.path.isfile(image):
        return Image.open(image)
    if isinstance(image, str) and (image.startswith("data:") or _BASE64.fullmatch(image)):
        payload = image.split(",", 1)[1] if image.startswith("data:") else image
        return Image.open(BytesIO(base64.b64decode("".join(payload.split()), validate=True)))
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
    raise TypeError(
        "expected a PIL image, a path, bytes or a uint8 array (or an http(s) URL, a data URL or base64), got "
        f"{type(image).__name__}"
    )


def _eight_bit(image):
    """A decoded PIL image with 8-bit channels. PIL's convert("RGB") clips 16-bit values at 255: they are scaled to
    8 bits instead; 32-bit integer or float pixels have no standard 8-bit meaning and are refused."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        eight_bit = Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8))
        eight_bit.info = image.info  # keeps the EXIF orientation for `load_image`
        return eight_bit
    if image.mode in ("I", "F"):
        raise ValueError(
            f"image mode {image.mode!r} (32-bit integer or float pixels) has no standard 8-bit meaning; convert it "
            "to an 8-bit RGB image yourself"
        )
    return image


def load_rgb_image(image, where="image"):
    """Any image input -> an 8-bit RGB PIL image, upright: transformers' `load_image` applies the EXIF orientation
    and converts to RGB as the official pipeline (alpha dropped, grayscale/CMYK/palette made RGB).

    Inputs: a PIL image, a path, bytes, an http(s) URL, a `data:image/...;base64,` URL, raw base64, or a uint8
    array (H, W, 3). Anything unreadable raises `ValueError` naming `where` (e.g. "image 2 of 3") and the input.
    """
    name = describe_image(image)
    is_url = isinstance(image, str) and image.startswith(("http://", "https://"))
    try:
        pil = _open_image(image)
        pil.load()  # PIL decodes lazily: truncated or corrupt data fails here, not later inside the resize
        return load_image(_eight_bit(pil))
    except FileNotFoundError as error:
        raise ValueError(f"{where}: image file {name} does not exist") from error
    except Image.DecompressionBombError as error:
        raise ValueError(f"{where}: {name} is too large to decode safely ({error}); downscale it first") from error
    except (ValueError, TypeError) as error:
        if not isinstance(error, binascii.Error):  # ours, about the input's type or layout
            raise type(error)(f"{where} ({name}): {error}") from error
        raise ValueError(f"cannot read {where} ({name}): it is not valid base64 ({error})") from error
    except Exception as error:  # PIL's decoding errors; requests' (4.x) or httpx's (5.x) network errors
        hint = "check the URL and that it serves an image" if is_url else "is it a valid JPEG/PNG/WebP file?"
        raise ValueError(f"cannot read {where} ({name}): {str(error)[:200]}; {hint}") from error


__all__ = ["load_rgb_image"]
