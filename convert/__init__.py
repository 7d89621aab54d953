"""Official Honeybee checkpoints (Kakao Brain's `.tar.gz` releases, or the folders they unpack to) -> Hub folders
that load with `trust_remote_code=True` on transformers 4.57 and 5.x: `honeybee-convert`.

- `official.py`: the official format: `config.json` -> `HoneybeeConfig` arguments, the weight-key mapping (no I/O)
- `archive.py`: where the weight files come from: a folder read in place, or an archive read once as a stream
- `writer.py`: the safetensors shards
- `tokenizer.py`: a Hub folder's tokenizer files, built from Vicuna's sentencepiece model
- `conversion.py`: `convert_official_checkpoint`, the steps in order
- `cli.py`: the `honeybee-convert` command (also `python -m honeybee_hf.convert`)
"""


class ConversionError(ValueError):
    """The checkpoint, archive or tokenizer cannot be converted; the message says what is wrong."""


from .conversion import convert_official_checkpoint  # noqa: E402 (every module of the package imports ConversionError)

__all__ = ["ConversionError", "convert_official_checkpoint"]
