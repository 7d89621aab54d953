#!/usr/bin/env bash
# The whole test suite, with its environments (created on first use by scripts/setup_envs.sh): once on
# transformers 4.57.6 (tf4) and once on 5.23.0 (tf5). Extra arguments go to pytest, e.g.
# `bash scripts/run_tests.sh -k pipelines`. Ends with the time each environment took to set up and to test.
set -euo pipefail
cd "$(dirname "$0")/.."
setup_start=$SECONDS
bash scripts/setup_envs.sh | tee .venvs/setup.out
setup_seconds=$((SECONDS - setup_start))
status=0
summary=()
for env in tf4 tf5; do
  echo "=== $env: transformers $(.venvs/$env/bin/python -c 'import transformers; print(transformers.__version__)') ==="
  began=$SECONDS
  result=passed
  .venvs/$env/bin/python -m pytest tests -q -p no:cacheprovider --timeout 900 "$@" || { status=1; result=FAILED; }
  summary+=("$env: tests $result in $((SECONDS - began)) s")
done
echo "=== timings ==="
echo "environments: $setup_seconds s in all (created in parallel)"
grep -E '^env .*: (ready|FAILED)' .venvs/setup.out || echo "  (all were current)"
printf '%s\n' "${summary[@]}"
exit $status
