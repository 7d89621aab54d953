#!/usr/bin/env bash
# The main job, on a fresh machine: creates .venvs/tf5 on first use (scripts/setup_envs.sh), then runs
# examples/caption_demo.py (a tiny Honeybee taught to caption the photos, saved as a Hub folder, loaded back through
# trust_remote_code and pipeline("image-to-text")). Extra arguments go to the demo, e.g. `--projector d-abs`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_envs.sh tf5
exec .venvs/tf5/bin/python examples/caption_demo.py "$@"
