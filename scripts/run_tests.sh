#!/usr/bin/env bash
# The whole test suite, with its environments (created on first use by scripts/setup_envs.sh): all of it once on
# transformers 4.57.6 (tf4) and once on 5.23.0 (tf5), then the vLLM tests in .venvs/vllm and the llm-compressor
# tests in .venvs/llmc, the DeepSpeed test in .venvs/ds and the web demo's browser test in .venvs/web (elsewhere they skip, saying why; run as root,
# this installs the headless Chromium it drives with apt-get when missing). Extra arguments go to pytest, e.g.
# `bash scripts/run_tests.sh -k pipelines`. Ends with the time each environment took to set up and to test.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .venvs
# torch.compile's kernel cache inside the clone, one per CPU capability: inductor reuses a kernel compiled under
# another ATEN_CPU_CAPABILITY and then computes wrong numbers (seen with =avx2 on an AVX-512 machine).
export TORCHINDUCTOR_CACHE_DIR=$PWD/.venvs/.cache/torchinductor-${ATEN_CPU_CAPABILITY:-native}
setup_start=$SECONDS
bash scripts/setup_envs.sh | tee .venvs/setup.out
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "installing Debian's chromium and chromium-driver for the browser test"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      chromium chromium-driver >/dev/null; } || echo "could not install chromium: the browser test will skip"
  else
    echo "no chromium/chromedriver and not root to install them: the browser test will skip"
  fi
fi
setup_seconds=$((SECONDS - setup_start))
status=0
summary=()
declare -A TESTS=([tf4]=tests [tf5]=tests [vllm]=tests/integrations/test_vllm.py [llmc]=tests/integrations/test_quantize.py
                  [ds]="tests/training/test_finetune_distributed.py -k deepspeed" [web]=tests/demo/test_demo_browser.py)
for env in tf4 tf5 vllm llmc ds web; do
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
