#!/usr/bin/env bash
# Create the two test environments: .venvs/tf4 (transformers 4.57.6) and .venvs/tf5 (transformers 5.23.0).
# Both get the CPU torch wheel pinned to 2.13.0 (an unpinned torch would pull GBs of CUDA wheels) and the
# package itself in editable mode. tf5 also gets triton, whose interpreter runs the kernels on CPU.
# Idempotent: an environment whose stamp matches this file is kept (only the package is reinstalled).
set -euo pipefail
cd "$(dirname "$0")/.."
stamp_src=$(sha1sum scripts/setup_envs.sh | cut -c1-16)
common=(torch==2.13.0 peft==0.21.2 accelerate==1.15.0 safetensors sentencepiece protobuf pillow tqdm pytest pytest-timeout
        trl==1.16.0 bitsandbytes==0.50.2 torchao==0.18.0 evaluate==0.4.6 loguru==0.7.3 pydantic==2.14.4 pytz==2026.6)
# lmms-eval's model classes import only a few of its dependencies (the line above); its full list adds ~80 packages,
# among them a CUDA-only torchvision that transformers 5 would pick up for every image processor.
no_deps=(lmms-eval==0.7.3)
quiet() { grep -v "WARNING: Location .* is ignored" || true; }  # this machine's pip.conf names missing indexes
make_env() {
  local name=$1; shift
  local dir=.venvs/$name
  if [[ -f $dir/.stamp && $(cat "$dir/.stamp") == "$stamp_src" ]]; then
    "$dir/bin/pip" install -q --no-deps -e . >/dev/null  # picks up setup.cfg changes (entry points, packages)
    echo "env $name: up to date"
    return
  fi
  rm -rf "$dir"
  python3 -m venv "$dir"
  "$dir/bin/pip" install -q --upgrade pip setuptools wheel 2>&1 | quiet
  "$dir/bin/pip" install -q "${common[@]}" "$@" 2>&1 | quiet
  "$dir/bin/pip" install -q --no-deps "${no_deps[@]}" 2>&1 | quiet
  "$dir/bin/pip" install -q --no-deps -e .
  echo "$stamp_src" > "$dir/.stamp"
  echo "env $name: $("$dir/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
}
make_env tf4 transformers==4.57.6 datasets==5.0.1  # datasets 5.2 needs the huggingface_hub of transformers 5
make_env tf5 transformers==5.23.0 triton==3.9.0 datasets==5.2.0
