#!/usr/bin/env bash
# Create the test environments under .venvs/, in parallel: `bash scripts/setup_envs.sh [NAME ...]` (default: all).
#   tf4  transformers 4.57.6
#   tf5  transformers 5.23.0, triton (its interpreter runs the kernels on CPU)
# Each gets the CPU torch wheel pinned to 2.13.0 (an unpinned torch pulls GBs of CUDA wheels) and the package in
# editable mode. Idempotent: an environment whose stamp (a hash of its package list) is current is kept, and only
# the package is reinstalled. Nothing is cached outside the clone: pip's cache lives in .venvs/.cache.
set -euo pipefail
cd "$(dirname "$0")/.."

common="torch==2.13.0 peft==0.21.2 accelerate==1.15.0 safetensors sentencepiece protobuf pillow tqdm pytest pytest-timeout"
declare -A PACKAGES=(
  [tf4]="$common transformers==4.57.6"
  [tf5]="$common transformers==5.23.0 triton==3.9.0"
)
ORDER=(tf4 tf5)
names=("$@")
[[ ${#names[@]} -eq 0 ]] && names=("${ORDER[@]}")
for name in "${names[@]}"; do
  [[ -n ${PACKAGES[$name]+x} ]] || { echo "unknown environment '$name'; known: ${ORDER[*]}" >&2; exit 2; }
done

export PIP_CACHE_DIR=$PWD/.venvs/.cache/pip PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p .venvs

make_env() {  # NAME: create .venvs/NAME unless its stamp is current; all output goes to .venvs/NAME.log
  local name=$1 dir=.venvs/$1 stamp
  stamp=$(echo "$(python3 --version) ${PACKAGES[$name]}" | sha1sum | cut -c1-16)
  if [[ -f $dir/.stamp && $(cat "$dir/.stamp") == "$stamp" ]]; then
    "$dir/bin/pip" install -q --no-deps -e . >/dev/null 2>&1  # picks up setup.cfg changes (entry points, packages)
    return
  fi
  rm -rf "$dir"
  python3 -m venv "$dir"
  "$dir/bin/pip" install --progress-bar off --upgrade pip setuptools wheel
  # shellcheck disable=SC2086  # the package list is split on purpose
  "$dir/bin/pip" install --progress-bar off ${PACKAGES[$name]}
  "$dir/bin/pip" install --progress-bar off --no-deps -e .
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
      echo "env $name: ready in $((SECONDS - began[$name])) s ($(".venvs/$name/bin/python" -c \
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
