#!/usr/bin/env bash
# Installs the official `openai` npm package (pinned by tests/js/package-lock.json)
# for the tests that call the runtime from Node.js. npm caches downloads in ~/.npm.
set -euo pipefail
cd "$(dirname "$0")/../tests/js"
stamp=node_modules/.install-stamp
key="$(sha256sum package-lock.json | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then exit 0; fi
echo "==> installing the openai npm package (tests/js)" >&2
npm ci --no-audit --no-fund --loglevel=error
echo "$key" > "$stamp"
