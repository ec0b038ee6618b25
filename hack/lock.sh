#!/usr/bin/env bash
# Recompiles the pinned requirement files. dev.txt is the resolution of
# everything together; operator.txt (the operator image, which also runs the
# gateway) and runtime.txt are constrained by it, so the images ship exactly the
# versions the tests ran with. The project's own packages are resolved from the
# repository (requirements/local-packages.in) and never written into the files.
set -euo pipefail
cd "$(dirname "$0")/.."
compile=(uv pip compile -q --python-version 3.11 --python-platform x86_64-unknown-linux-gnu
         --no-emit-package modelendpoint-operator)
"${compile[@]}" --override requirements/overrides.txt \
  operator/pyproject.toml runtime/pyproject.toml gateway/pyproject.toml requirements/local-packages.in \
  requirements/dev.in -o requirements/dev.txt
"${compile[@]}" -c requirements/dev.txt operator/pyproject.toml gateway/pyproject.toml \
  requirements/local-packages.in -o requirements/operator.txt
"${compile[@]}" --override requirements/overrides.txt -c requirements/dev.txt \
  runtime/pyproject.toml -o requirements/runtime.txt
