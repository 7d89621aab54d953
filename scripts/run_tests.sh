#!/usr/bin/env bash
# The whole test suite, with its environments (created on first use by scripts/setup_envs.sh): all of it once on
# transformers 4.57.6 (tf4) and once on 5.23.0 (tf5), then the vLLM tests in .venvs/vllm and the llm-compressor
# tests in .venvs/llmc (elsewhere they skip, saying why). Extra arguments go to pytest, e.g.
# `bash scripts/run_tests.sh -k pipelines`. Ends with the time each environment took to set up and to test.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .venvs
# torch.compile's kernel cache inside the clone, one per CPU capability: inductor reuses a kernel compiled under
# another ATEN_CPU_CAPABILITY and then computes wrong numbers (seen with =avx2 on an AVX-512 machine).
export TORCHINDUCTOR_CACHE_DIR=$PWD/.venvs/.cache/torchinductor-${ATEN_CPU_CAPABILITY:-native}
setup_start=$SECONDS
bash scripts/setup_envs.sh | tee .venvs/setup.out
setup_seconds=$((SECONDS - setup_start))
status=0
summary=()
declare -A TESTS=([tf4]=tests [tf5]=tests [vllm]=tests/test_vllm.py [llmc]=tests/test_quantize.py)
for env in tf4 tf5 vllm llmc; do
  echo "=== $env: transformers $(.venvs/$env/bin/python -c 'import transformers; print(transformers.__version__)') ==="
  began=$SECONDS
  result=passed
  # exit code 5 (no test collected, e.g. all deselected by -k) is not a failure
  .venvs/$env/bin/python -m pytest ${TESTS[$env]} -q -p no:cacheprovider --timeout 900 --durations=10 "$@" || {
    code=$?
    [[ $code -eq 5 ]] || { status=1; result=FAILED; }
  }
  summary+=("$env: tests $result in $((SECONDS - began)) s")
done
echo "=== timings ==="
echo "environments: $setup_seconds s in all (created in parallel)"
grep -E '^env .*: (ready|FAILED)' .venvs/setup.out || echo "  (all were current)"
printf '%s\n' "${summary[@]}"
exit $status
