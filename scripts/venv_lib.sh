# Sourced by the setup_env_*.sh scripts: `make_venv NAME STAMP PIP_ARGS...` creates .venvs/NAME with the CPU torch
# wheel (the args must pin torch: an unpinned one pulls GBs of CUDA wheels) and the package in editable mode.
# An environment whose .stamp equals STAMP is kept (only the package is reinstalled); any other is recreated.
# A caller may define `after_install DIR` to adjust the environment before it is stamped.

quiet() { grep -v "WARNING: Location .* is ignored" || true; }  # this machine's pip.conf names missing indexes
editable_install() {  # setuptools' editable-install warning is noise; pip's output is shown only if it fails
  local log
  log=$("$1/bin/pip" install -q --no-deps -e . 2>&1) || { echo "$log"; return 1; }
}

make_venv() {
  local name=$1 stamp=$2; shift 2
  local dir=.venvs/$name start=$SECONDS
  if [[ -f $dir/.stamp && $(cat "$dir/.stamp") == "$stamp" ]]; then
    editable_install "$dir"  # picks up setup.cfg changes (entry points, packages)
    echo "env $name: up to date"
    return
  fi
  echo "env $name: creating (a few minutes: pip downloads and installs the packages)"
  rm -rf "$dir"
  python3 -m venv "$dir"
  "$dir/bin/pip" install -q --upgrade pip setuptools wheel 2>&1 | quiet
  "$dir/bin/pip" install -q "$@" 2>&1 | quiet
  editable_install "$dir"
  if declare -F after_install >/dev/null; then after_install "$dir"; fi
  echo "$stamp" > "$dir/.stamp"
  echo "env $name: $("$dir/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)') ($((SECONDS - start)) s)"
}
