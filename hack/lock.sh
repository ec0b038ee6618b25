#!/usr/bin/env bash
# Recompiles the pinned requirement files. dev.txt is the resolution of
# everything together; operator.txt and runtime.txt are constrained by it, so
# the images ship exactly the versions the tests ran with.
set -euo pipefail
cd "$(dirname "$0")/.."
compile=(uv pip compile -q --python-version 3.11 --python-platform x86_64-unknown-linux-gnu)
"${compile[@]}" --override requirements/overrides.txt \
  operator/pyproject.toml runtime/pyproject.toml requirements/dev.in -o requirements/dev.txt
"${compile[@]}" -c requirements/dev.txt operator/pyproject.toml -o requirements/operator.txt
"${compile[@]}" --override requirements/overrides.txt -c requirements/dev.txt \
  runtime/pyproject.toml -o requirements/runtime.txt
