"""`honeybee-publish`: upload a Hub folder written by `honeybee-convert` (or `save_hub_folder`) to the Hugging Face
Hub, after checking that it is complete.

    honeybee-publish Honeybee-C-7B-M144 my-org/Honeybee-C-7B-M144 --private --dry-run
    honeybee-publish Honeybee-C-7B-M144 my-org/Honeybee-C-7B-M144 --revision bf16 --commit-message "bf16 weights"

The token is `--token`, else huggingface_hub's own (`HF_TOKEN`, `hf auth login`).
"""

import argparse
import json
import sys
from pathlib import Path

from ..cli import add_debug_flag, console_script
from .folder import CODE_FILES

SUPPORT_FILES = (
    "config.json",
    "generation_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
)
REQUIRED_AUTO_MAP = ("AutoConfig", "AutoModelForImageTextToText", "AutoProcessor")
SKIPPED_DIRS = (".git", ".cache/huggingface")  # huggingface_hub's upload_folder never uploads these
WRITE_IT_WITH = "publish the folder honeybee-convert (or save_hub_folder) wrote"


class PublishError(ValueError):
    """The folder is not a complete Honeybee Hub folder, or the arguments are wrong; the message says why."""


def folder_files(folder):
    """Relative paths (posix) of every file `upload_folder` would upload, sorted."""
    folder = Path(folder)
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_file() and not any(relative == d or relative.startswith(d + "/") for d in SKIPPED_DIRS):
            files.append(relative)
    return files


def _check_weights(folder):
    from safetensors import SafetensorError, safe_open

    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise PublishError(f"{index_path} is not a safetensors index ({error})") from error
        shards = sorted(set(weight_map.values()))
        if (folder / "model.safetensors").exists():
            raise PublishError(
                f"{folder} has both model.safetensors and model.safetensors.index.json; which one is current?"
            )
    elif (folder / "model.safetensors").is_file():
        weight_map, shards = None, ["model.safetensors"]
    else:
        raise PublishError(f"{folder} holds no model.safetensors nor model.safetensors.index.json")
    for name in shards:
        if not (folder / name).is_file():
            raise PublishError(
                f"shard {name} is missing: model.safetensors.index.json lists it but {folder} has no such file"
            )
        try:
            with safe_open(str(folder / name), framework="pt") as f:
                keys = set(f.keys())
        except (SafetensorError, OSError) as error:
            raise PublishError(f"cannot read {folder / name}: {error}; the file is truncated or corrupt") from error
        if weight_map is not None:
            indexed = {k for k, f in weight_map.items() if f == name}
            if keys != indexed:
                odd = sorted(keys ^ indexed)
                raise PublishError(
                    f"{name} and model.safetensors.index.json disagree on {len(odd)} tensors, e.g. {odd[0]!r}"
                )
    stray = sorted(p.name for p in folder.glob("*.safetensors") if p.name not in shards)
    if stray:
        raise PublishError(f"{folder} holds safetensors files the weights index does not use: {stray}")
    leftovers = sorted(p.name for p in folder.iterdir() if p.name.endswith((".bin", ".pt", ".pth", ".pkl")))
    if leftovers:
        raise PublishError(f"{folder} holds pickled files {leftovers}; a Honeybee Hub folder has safetensors only")


def check_hub_folder(folder):
    """Check that `folder` is a complete Honeybee Hub folder; returns the files to upload (`folder_files`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PublishError(f"{folder} is not a folder; {WRITE_IT_WITH}")
    try:
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise PublishError(f"{folder} has no config.json, so it is no model folder; {WRITE_IT_WITH}") from None
    except json.JSONDecodeError as error:
        raise PublishError(f"{folder / 'config.json'} is not valid JSON ({error})") from error
    if config.get("model_type") != "honeybee":
        raise PublishError(
            f"{folder}/config.json has model_type {config.get('model_type')!r}, not 'honeybee'; {WRITE_IT_WITH}"
        )
    auto_map = config.get("auto_map") or {}
    missing = [k for k in REQUIRED_AUTO_MAP if k not in auto_map]
    if missing:
        raise PublishError(
            f"{folder}/config.json has no auto_map entry for {missing}; it would not load with trust_remote_code "
            "(write the folder with honeybee-convert or save_hub_folder)"
        )
    referenced = {value.split(".")[0] + ".py" for value in auto_map.values()}
    for pipeline in (config.get("custom_pipelines") or {}).values():
        referenced.add(pipeline["impl"].split(".")[0] + ".py")
    required = sorted(set(SUPPORT_FILES) | set(CODE_FILES) | referenced)
    absent = [name for name in required if not (folder / name).is_file()]
    if absent:
        raise PublishError(f"{folder} lacks {absent}, which a Honeybee Hub repo needs")
    _check_weights(folder)
    return folder_files(folder)


def _size(nbytes):
    for unit in ("B", "kB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000


def publish(folder, repo_id, private=False, revision=None, commit_message=None, token=None, dry_run=False, log=print):
    """Create `repo_id` (if needed) and upload `folder` to it, on branch `revision` (created from main if needed).

    With `dry_run`, nothing is sent: the files that would be uploaded are logged and returned. Otherwise returns
    huggingface_hub's CommitInfo.
    """
    import huggingface_hub
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    folder = Path(folder)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PublishError(f"{repo_id!r} is not a Hub repo id (owner/name): {error}") from error
    if "/" not in repo_id:
        raise PublishError(f"{repo_id!r} has no owner; write it as owner/name")
    files = check_hub_folder(folder)
    branch = revision or "main"
    message = commit_message or f"Upload {folder.name} (Honeybee for transformers, trust_remote_code)"
    if dry_run:
        total = sum((folder / f).stat().st_size for f in files)
        visibility = "private" if private else "public"
        log(
            f"dry run: would create the {visibility} model repo {repo_id} (if missing) and upload {len(files)} files "
            f"({_size(total)}) to branch {branch!r} with commit message {message!r}:"
        )
        for name in files:
            log(f"  {name}  ({_size((folder / name).stat().st_size)})")
        return files
    api = huggingface_hub.HfApi(token=token)
    api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
    if branch != "main":
        api.create_branch(repo_id, branch=branch, repo_type="model", exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=branch, commit_message=message
    )
    log(f"uploaded {len(files)} files to https://huggingface.co/{repo_id}/tree/{branch}")
    return commit


def build_parser():
    parser = argparse.ArgumentParser(
        prog="honeybee-publish",
        description="Upload a Honeybee Hub folder (from honeybee-convert or save_hub_folder) to the Hugging Face Hub.",
    )
    parser.add_argument("folder", type=Path, help="the Hub folder to upload")
    parser.add_argument("repo_id", help="owner/name of the model repo (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", help="branch to upload to (created from main if missing; default: main)")
    parser.add_argument("--commit-message", help="commit message")
    parser.add_argument("--token", help="Hub token (default: huggingface_hub's, e.g. HF_TOKEN)")
    parser.add_argument(
        "--dry-run", action="store_true", help="check the folder and list what would be uploaded, send nothing"
    )
    add_debug_flag(parser)
    return parser


@console_script("honeybee-publish")
def main(argv):
    args = build_parser().parse_args(argv)
    try:
        publish(
            args.folder,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            token=args.token,
            dry_run=args.dry_run,
        )
    except OSError as error:  # network and Hub errors (HfHubHTTPError is an OSError): say what failed
        raise OSError(f"the upload failed: {error}") from error
    return 0


if __name__ == "__main__":
    sys.exit(main())
