#!/usr/bin/env bash
# The main job, on a fresh machine: creates .venvs/tf5 on first use (scripts/setup_envs.sh), then runs
# examples/caption_demo.py (a tiny Honeybee taught to caption the photos, saved as a Hub folder, loaded back through
# trust_remote_code and pipeline("image-to-text")). Extra arguments go to the demo, e.g. `--projector d-abs`.
# `--web` then opens the web demo (honeybee-demo, Gradio) on the model, in .venvs/web.
set -euo pipefail
cd "$(dirname "$0")/.."
env=tf5
for arg in "$@"; do [[ $arg == --web ]] && env=web; done
bash scripts/setup_envs.sh $env
exec .venvs/$env/bin/python examples/caption_demo.py "$@"
