"""`honeybee-convert` (also `python -m honeybee_hf.convert`): the command line of `convert_official_checkpoint`, and of
`export_trained` for a folder saved by this package."""

import argparse
import sys
from pathlib import Path

from ..cli import CommandError, add_debug_flag, console_script
from . import ConversionError
from .conversion import DTYPES, convert_official_checkpoint


def build_parser():
    parser = argparse.ArgumentParser(
        prog="honeybee-convert",
        description="Turn an official Honeybee checkpoint (.tar.gz, <name>/ or <name>/last/) into a Hugging Face Hub "
        "folder that loads with trust_remote_code on transformers 4.57 and 5.x. A folder saved by honeybee-hf "
        "(model_type 'honeybee', e.g. a fine-tuned model) is exported the same way.",
    )
    parser.add_argument(
        "src", type=Path, help="official .tar.gz archive, or its extracted <name>/ or <name>/last/ folder"
    )
    parser.add_argument("out", type=Path, help="the Hub folder to write (must not exist, unless --force)")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        help="Vicuna/Llama sentencepiece tokenizer.model, or a folder with tokenizer files "
        "(required for official checkpoints)",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="weight dtype (default: the checkpoint's, bfloat16 for the release)"
    )
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default: 5GB)")
    parser.add_argument(
        "--force", action="store_true", help="replace OUT if it exists (only once the new folder is complete)"
    )
    parser.add_argument("--name", help="checkpoint name for the model card, e.g. 7B-C-Abs-M144 (default: from SRC)")
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="where an archive's weight file waits, one at a time, when it cannot be converted as it streams (it "
        "precedes config.json, or its layout is not torch.save's; the converter says so) (default: next to OUT)",
    )
    parser.add_argument(
        "--allow-unknown-config-key",
        action="append",
        default=[],
        metavar="SECTION.KEY",
        help="accept (and ignore) a config.json key this converter does not know, e.g. projector_config.foo; "
        "check the outputs of the converted model",
    )
    parser.add_argument(
        "--processor", type=Path, help="for a honeybee-hf folder without processor files: where to take them from"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


@console_script("honeybee-convert")
def main(argv):
    parser = build_parser()
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    from ..hub.trained import export_trained, is_package_folder

    try:
        if args.src.is_dir() and is_package_folder(args.src):
            export_trained(args.src, args.out, args.processor, args.dtype, args.max_shard_size, args.force)
        else:
            if args.tokenizer is None:
                raise ConversionError("--tokenizer is required: official checkpoints ship without a tokenizer")
            convert_official_checkpoint(
                args.src,
                args.out,
                args.tokenizer,
                dtype=args.dtype,
                max_shard_size=args.max_shard_size,
                force=args.force,
                name=args.name,
                work_dir=args.work_dir,
                allow_unknown_config_keys=args.allow_unknown_config_key,
                progress=not args.quiet,
            )
    except (OSError, MemoryError) as error:  # an existing OUT, a full disk, a missing file, too little memory
        what = "out of memory" if isinstance(error, MemoryError) else error
        raise CommandError(f"{what}; {args.out} was not written or changed") from error
    except KeyboardInterrupt:
        print(f"honeybee-convert: interrupted; {args.out} was not written or changed", file=sys.stderr)
        return 130
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
