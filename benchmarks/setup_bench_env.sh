#!/usr/bin/env bash
# Create .venvs/bench, the benchmarks' own environment: the tf5 test environment's packages (CPU torch 2.13.0,
# transformers 5.23.0, triton 3.9.0) plus what only the benchmarks need. None of it is a dependency of the package.
#   timm==0.9.8   the exact version the official Honeybee code pins; its RegStage is the official C-Abstractor's
#                 building block (benchmarks/bench_projector_official.py).
#                 timm imports torchvision at import time (data transforms, FrozenBatchNorm2d) although RegStage
#                 never uses it. PyPI has no CPU torchvision for torch 2.13: torchvision 0.28.0 (the release for
#                 torch 2.13) is a CUDA 13 build whose _C.so links libtorch_cuda.so, and `import torchvision`
#                 then fails on CPU torch ("operator torchvision::nms does not exist"). So timm goes in with
#                 --no-deps (plus its other requirements), no torchvision is installed, and
#                 benchmarks/_common.py:import_timm() stands in for torchvision when it is missing. The timm code
#                 under test is the unmodified 0.9.8 release.
#   matplotlib, psutil   plots; process memory.
# A constraints file pins torch, so no step can swap the CPU wheel for a CUDA one.
# Idempotent: an env whose stamp matches this file is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=.venvs/bench
stamp_src=$(sha1sum benchmarks/setup_bench_env.sh setup.cfg | sha1sum | cut -c1-16)
if [[ -f $dir/.stamp && $(cat "$dir/.stamp") == "$stamp_src" ]]; then echo "env bench: up to date"; exit 0; fi
rm -rf "$dir"
python3 -m venv "$dir"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==2.13.0" > "$constraints"
pip=("$dir/bin/pip" install -q -c "$constraints")
"$dir/bin/pip" install -q --upgrade pip setuptools wheel
"${pip[@]}" torch==2.13.0 transformers==5.23.0 triton==3.9.0 accelerate==1.15.0 safetensors sentencepiece protobuf pillow tqdm
"${pip[@]}" --no-deps timm==0.9.8
"${pip[@]}" pyyaml huggingface_hub matplotlib psutil
"$dir/bin/pip" install -q --no-deps -e .
(cd benchmarks && "../$dir/bin/python" - <<'EOF'
import torch, transformers, matplotlib
import _common
timm = _common.import_timm()
from timm.models.regnet import RegStage
from transformers.models.deformable_detr.modeling_deformable_detr import DeformableDetrDecoderLayer
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert timm.__version__ == "0.9.8", timm.__version__
print(f"env bench: torch {torch.__version__}, timm {timm.__version__} ({_common.TORCHVISION_NOTE}), "
      f"transformers {transformers.__version__}, matplotlib {matplotlib.__version__}")
EOF
)
echo "$stamp_src" > "$dir/.stamp"
