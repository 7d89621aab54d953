#!/usr/bin/env bash
# The whole test suite, once on transformers 4.57.6 and once on 5.23.0 (see scripts/setup_envs.sh).
# Extra arguments go to pytest, e.g. `bash scripts/run_tests.sh -k pipelines`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_envs.sh
status=0
for env in tf4 tf5; do
  echo "=== transformers $(.venvs/$env/bin/python -c 'import transformers; print(transformers.__version__)') ==="
  .venvs/$env/bin/python -m pytest tests -q -p no:cacheprovider --timeout 900 "$@" || status=1
done
exit $status
