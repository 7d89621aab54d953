#!/usr/bin/env bash
# Create .venvs/llmc: llm-compressor 0.14 (it pins transformers <=5.17, hence its own environment) for
# `honeybee-quantize` and tests/test_quantize.py. Idempotent (see scripts/venv_lib.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv_lib.sh
stamp=$(cat scripts/setup_env_llmc.sh scripts/venv_lib.sh | sha1sum | cut -c1-16)
make_venv llmc "$stamp" llmcompressor==0.14.0 torch==2.13.0 transformers==5.17.0 \
  safetensors sentencepiece protobuf pillow tqdm pytest pytest-timeout
