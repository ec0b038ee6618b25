"""The gateway's compiled data plane (the Rust crate gateway/dataplane) in the unit
tier: its own tests, run by cargo the way `make setup` builds it (``--release
--locked``, the target folder in the cache, through hack/dataplane.sh), and the
binary `make setup` installs beside the venv's Python."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CRATE = REPO / "gateway" / "dataplane"
BINARY = "modelendpoint-gateway-dataplane"


def test_cargo_test_passes():
    # The same script, target folder and flags as the build: the dependencies
    # `make setup` compiled are reused, so a warm run only checks fingerprints.
    proc = subprocess.run([str(REPO / "hack" / "dataplane.sh"), "test"], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0, (
        f"`hack/dataplane.sh test` (cargo test --release --locked in gateway/dataplane) failed:\n"
        f"{proc.stdout[-8000:]}")
    assert "test result: ok" in proc.stdout, proc.stdout[-2000:]


def test_the_crate_builds_the_binary_the_gateway_runs():
    manifest = tomllib.loads((CRATE / "Cargo.toml").read_text())
    assert [b["name"] for b in manifest["bin"]] == [BINARY]
    # --locked needs the lock file next to the manifest (it is what pins the crates).
    assert (CRATE / "Cargo.lock").is_file()


def test_setup_installed_the_binary_beside_the_venvs_python():
    # Where the Python gateway finds it when the venv is not on PATH; `make setup` (hack/dataplane.sh) puts it there.
    path = Path(sys.executable).parent / BINARY
    assert path.is_file() and os.access(path, os.X_OK), f"{path} is missing: run `make setup`"
