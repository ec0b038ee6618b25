"""Cache keys of the node's images: what a Dockerfile's COPY takes (after
.dockerignore) decides whether it is rebuilt; the rust stand-in made of this
machine's toolchain; the embedded model's node-local cache and its PersistentVolume."""

from __future__ import annotations

import os
import shutil
import tomllib
from pathlib import Path

from images import build
from node import models

DOCKERIGNORE = "# comment\n.git\n**/__pycache__\n**/*.pyc\n**/*.egg-info\ntests\n"


def _context(tmp_path: Path) -> Path:
    root = tmp_path / "ctx"
    (root / "pkg" / "mod" / "__pycache__").mkdir(parents=True)
    (root / "pkg" / "mod" / "a.py").write_text("A = 1\n")
    (root / "pkg" / "mod" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    (root / "pkg" / "x.egg-info").mkdir()
    (root / "pkg" / "x.egg-info" / "PKG-INFO").write_text("x")
    (root / "req.txt").write_text("fastapi==1\n")
    (root / "tests").mkdir()
    (root / "tests" / "t.py").write_text("")
    (root / ".dockerignore").write_text(DOCKERIGNORE)
    (root / "Dockerfile").write_text("FROM base\nCOPY req.txt /r/req.txt\nCOPY --chown=1:1 pkg/ /opt/pkg/\n"
                                     "COPY --from=builder /x /x\nRUN true\n")
    return root


def test_copy_sources_are_the_context_paths_of_copy_lines():
    text = "FROM b\nCOPY a.txt /a\nCOPY --chown=1 dir/ b.txt /d/\nADD c.tar /c\nCOPY --from=x /y /y\n"
    assert build.copy_sources(text) == ["a.txt", "dir", "b.txt", "c.tar"]


def test_dockerignore_patterns_exclude_at_any_depth():
    pats = build.dockerignore_patterns(DOCKERIGNORE)
    assert pats == [".git", "**/__pycache__", "**/*.pyc", "**/*.egg-info", "tests"]
    assert build.ignored("pkg/mod/__pycache__/a.pyc", pats)
    assert build.ignored("pkg/x.egg-info/PKG-INFO", pats)
    assert build.ignored("tests/t.py", pats)
    assert not build.ignored("pkg/mod/a.py", pats)


def test_context_files_are_what_copy_takes(tmp_path):
    root = _context(tmp_path)
    pats = build.dockerignore_patterns(DOCKERIGNORE)
    assert build.context_files(root, ["req.txt", "pkg"], pats) == ["pkg/mod/a.py", "req.txt"]


def test_dockerfile_key_follows_the_copied_files_and_nothing_else(tmp_path):
    root = _context(tmp_path)
    key = build.dockerfile_key(root, "Dockerfile", "base-1")
    # Ignored or uncopied files change nothing: a warm run rebuilds nothing.
    (root / "pkg" / "mod" / "__pycache__" / "b.pyc").write_bytes(b"\1")
    (root / "tests" / "t.py").write_text("changed")
    (root / "README").write_text("new")
    assert build.dockerfile_key(root, "Dockerfile", "base-1") == key
    # A copied file, the Dockerfile or the base image does.
    (root / "pkg" / "mod" / "a.py").write_text("A = 2\n")
    changed = build.dockerfile_key(root, "Dockerfile", "base-1")
    assert changed != key
    assert build.dockerfile_key(root, "Dockerfile", "base-2") != changed
    (root / "Dockerfile").write_text((root / "Dockerfile").read_text() + "USER 1\n")
    assert build.dockerfile_key(root, "Dockerfile", "base-2") != changed


def test_image_names_are_the_ones_pods_and_dockerfiles_use():
    v = build.versions()
    names = build.image_names(v)
    assert names["python-base"] == "docker.io/library/python:3.11-slim"
    assert names["vllm-base"] == f"docker.io/vllm/vllm-openai:v{v['VLLM_VERSION']}"
    assert names["operator"] == f"ghcr.io/modelendpoint/modelendpoint-operator:{build.chart_app_version()}"
    assert names["runtime"].startswith("ghcr.io/modelendpoint/modelendpoint-runtime:")
    dockerfile = (build.REPO / "Dockerfile.runtime").read_text()
    assert "FROM vllm/vllm-openai:v${VLLM_VERSION}" in dockerfile
    assert f"ARG VLLM_VERSION={v['VLLM_VERSION']}" in dockerfile
    operator = (build.REPO / "Dockerfile.operator").read_text()
    assert "FROM python:${PYTHON_VERSION}-slim" in operator
    # The builder stage's base: the stand-in is made under the name its FROM resolves to.
    assert names["rust-base"] == f"docker.io/library/rust:{v['RUST_VERSION']}-slim-bookworm"
    assert "FROM rust:${RUST_VERSION}-slim-bookworm AS dataplane" in operator
    assert f"ARG RUST_VERSION={v['RUST_VERSION']}" in operator


def _operator_context(tmp_path: Path) -> Path:
    """A build context with the real Dockerfile.operator and .dockerignore, and a file
    for each of its COPY sources."""
    root = tmp_path / "op"
    root.mkdir()
    for name in ("Dockerfile.operator", ".dockerignore"):
        shutil.copy(build.REPO / name, root / name)
    for rel, text in {"requirements/operator.txt": "kopf==1\n", "operator/pyproject.toml": "[project]\n",
                      "gateway/pyproject.toml": "[project]\n", "gateway/modelendpoint_gateway/app.py": "",
                      "gateway/dataplane/Cargo.toml": "[package]\n", "gateway/dataplane/Cargo.lock": "version = 4\n",
                      "gateway/dataplane/src/main.rs": "fn main() {}\n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_operator_key_follows_the_data_plane_crate_and_not_its_build_output(tmp_path):
    root = _operator_context(tmp_path)
    sources = build.copy_sources((root / "Dockerfile.operator").read_text())
    assert {"gateway/dataplane/Cargo.toml", "gateway/dataplane/Cargo.lock", "gateway/dataplane/src"} <= set(sources)
    key = build.dockerfile_key(root, "Dockerfile.operator", "bases")
    # A target folder of a plain `cargo build` in the crate: ignored, no rebuild.
    (root / "gateway" / "dataplane" / "target" / "release").mkdir(parents=True)
    (root / "gateway" / "dataplane" / "target" / "release" / "modelendpoint-gateway-dataplane").write_bytes(b"\0")
    assert build.dockerfile_key(root, "Dockerfile.operator", "bases") == key
    # A changed source or lock file rebuilds the image (and so the binary in it).
    (root / "gateway" / "dataplane" / "src" / "main.rs").write_text("fn main() { println!(); }\n")
    changed = build.dockerfile_key(root, "Dockerfile.operator", "bases")
    assert changed != key
    (root / "gateway" / "dataplane" / "Cargo.lock").write_text("version = 4\n# changed\n")
    assert build.dockerfile_key(root, "Dockerfile.operator", "bases") != changed


RUSTC_VV = """rustc 1.95.0 (59807616e 2026-04-14)
binary: rustc
commit-hash: 59807616e1fa2540724bfbac14d7976d7e4a3860
host: x86_64-unknown-linux-gnu
release: 1.95.0
LLVM version: 22.1.2
"""


def test_rustc_vv_and_the_release_the_image_tag_names():
    info = build.parse_rustc_vv(RUSTC_VV)
    assert (info["release"], info["host"]) == ("1.95.0", "x86_64-unknown-linux-gnu")
    assert build.release_matches("1.95.0", "1.95") and build.release_matches("1.95.2", "1.95")
    assert build.release_matches("1.95.0", "1.95.0")
    assert not build.release_matches("1.95.0-nightly", "1.95")  # rustup's nightlies and betas
    assert not build.release_matches("1.96.0", "1.95") and not build.release_matches("1.9.0", "1.95")
    assert not build.release_matches("1.950.0", "1.95")


def _sysroot(tmp_path: Path, host: str = "x86_64-unknown-linux-gnu") -> Path:
    """A toolchain folder as rustup installs one: each component's files and its manifest."""
    root = tmp_path / "toolchains" / f"stable-{host}"
    files = {"rustc": ["bin/rustc", "bin/rustdoc", "lib/librustc_driver-1.so", "share/doc/rust/README.md"],
             "cargo": ["bin/cargo"], "rust-std": [f"lib/rustlib/{host}/lib/libstd-1.rlib"],
             "rust-docs": ["share/doc/rust/html/index.html"], "clippy-preview": ["bin/cargo-clippy"]}
    rustlib = root / "lib" / "rustlib"
    rustlib.mkdir(parents=True)
    for component, paths in files.items():
        for rel in paths:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(rel)
        (rustlib / f"manifest-{component}-{host}").write_text("".join(f"file:{p}\n" for p in paths))
    (rustlib / "components").write_text("".join(f"{c}-{host}\n" for c in files))
    (rustlib / "multirust-channel-manifest.toml").write_text('manifest-version = "2"\n')
    (rustlib / "rust-installer-version").write_text("3\n")
    (root / "bin" / "rustc").chmod(0o755)
    return root


def test_toolchain_files_are_rustups_minimal_profile(tmp_path):
    host = "x86_64-unknown-linux-gnu"
    files = build.toolchain_files(_sysroot(tmp_path), host)
    assert {"bin/rustc", "bin/rustdoc", "bin/cargo", "lib/librustc_driver-1.so",
            f"lib/rustlib/{host}/lib/libstd-1.rlib", f"lib/rustlib/manifest-rustc-{host}",
            "lib/rustlib/multirust-channel-manifest.toml"} <= set(files)
    # Not the docs (800 MB on the host) nor components the official image lacks.
    assert "share/doc/rust/html/index.html" not in files and "bin/cargo-clippy" not in files
    meta = build.rustup_metadata(host)
    assert meta["lib/rustlib/components"].split() == [f"{c}-{host}" for c in build.RUST_COMPONENTS]
    config_toml = tomllib.loads(meta["lib/rustlib/multirust-config.toml"])
    assert [c["pkg"] for c in config_toml["components"]] == list(build.RUST_COMPONENTS)
    settings = tomllib.loads(build.rustup_settings(f"1.95.0-{host}"))
    assert settings["default_toolchain"] == f"1.95.0-{host}" and settings["profile"] == "minimal"


def test_toolchain_is_laid_out_like_the_official_image(tmp_path):
    sysroot = _sysroot(tmp_path)
    home = tmp_path / "rustup-home"
    home.mkdir()
    (home / "settings.toml").write_text('version = "12"\n')
    rustup = tmp_path / "rustup"
    rustup.write_text(f"#!/bin/sh\necho {home}\n")  # `rustup show home`, all the layout asks of it
    rustup.chmod(0o755)
    tc = build.RustToolchain(sysroot, "1.95.0", "x86_64-unknown-linux-gnu", RUSTC_VV, rustup)
    root = tmp_path / "rootfs"
    build._install_toolchain(tc, root)
    toolchain = root / "usr/local/rustup/toolchains/1.95.0-x86_64-unknown-linux-gnu"
    assert (toolchain / "bin" / "rustc").read_text() == "bin/rustc" and os.access(toolchain / "bin" / "rustc", os.X_OK)
    assert not (toolchain / "share" / "doc" / "rust" / "html").exists()
    assert (toolchain / "lib" / "rustlib" / "components").read_text().split()[0] == "rustc-x86_64-unknown-linux-gnu"
    settings = tomllib.loads((root / "usr/local/rustup/settings.toml").read_text())
    assert settings == {"version": "12", "default_toolchain": tc.name, "profile": "minimal", "overrides": {}}
    # rustup's proxies: hard links to rustup in CARGO_HOME/bin (on the image's PATH).
    bin_dir = root / "usr/local/cargo/bin"
    for proxy in ("cargo", "rustc", "rustdoc"):
        assert (bin_dir / proxy).stat().st_ino == (bin_dir / "rustup").stat().st_ino
    env = dict(arg.split("=", 1) for arg in build.rust_config(tc) if "=" in arg)
    assert env["RUSTUP_HOME"] == "/usr/local/rustup" and env["CARGO_HOME"] == "/usr/local/cargo"
    assert env["PATH"].split(":")[0] == "/usr/local/cargo/bin" and env["RUST_VERSION"] == "1.95.0"


def test_rust_base_key_follows_the_toolchain_and_the_python_base(tmp_path):
    tc = build.RustToolchain(tmp_path, "1.95.0", "x86_64-unknown-linux-gnu", RUSTC_VV, None)
    key = build.rust_base_key("py", tc)
    assert build.rust_base_key("py", tc) == key
    assert build.rust_base_key("py2", tc) != key
    assert build.rust_base_key("py", build.RustToolchain(tmp_path, "1.95.1", tc.host, RUSTC_VV + "x", None)) != key


def test_vllm_base_key_follows_the_pins(monkeypatch):
    v = build.versions()
    key = build.vllm_base_key(v, "py")
    assert build.vllm_base_key({**v, "VLLM_VERSION": "9.9.9"}, "py") != key
    assert build.vllm_base_key({**v, "TORCH_VERSION": "0"}, "py") != key
    assert build.vllm_base_key(v, "py2") != key


def test_model_cache_is_a_self_contained_copy_the_runtime_user_can_extend(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    hf = tmp_path / "hf" / "hub" / "models--x--y" / "snapshots" / "abc"
    hf.mkdir(parents=True)
    (hf / "config.json").symlink_to(model / "config.json")
    (tmp_path / "hf" / "hub" / "models--x--y" / "refs").mkdir()
    (tmp_path / "hf" / "hub" / "models--x--y" / "refs" / "main").write_text("abc")
    dest = models.prepare(tmp_path / "hf", tmp_path / "dest", uid=os.getuid(), gid=os.getgid())
    copied = dest / "hub" / "models--x--y" / "snapshots" / "abc" / "config.json"
    assert not copied.is_symlink() and copied.read_text() == "{}"
    assert copied.stat().st_ino == (model / "config.json").stat().st_ino  # a hard link, no copy
    assert (dest / "hub" / "models--x--y" / "refs" / "main").read_text() == "abc"
    assert oct(dest.stat().st_mode & 0o777) == "0o775"
    # Idempotent.
    models.prepare(tmp_path / "hf", tmp_path / "dest", uid=os.getuid(), gid=os.getgid())
    assert copied.read_text() == "{}"


def test_model_cache_volume_is_a_pv_bound_to_the_claim_the_endpoint_names():
    pv, pvc = models.volume_manifests(Path("/cache/m"), "team-a")
    assert pv["spec"]["hostPath"] == {"path": "/cache/m", "type": "Directory"}
    assert pv["spec"]["claimRef"] == {"namespace": "team-a", "name": models.CLAIM_NAME}
    assert pvc["metadata"] == {"name": models.CLAIM_NAME, "namespace": "team-a"}
    assert pvc["spec"]["volumeName"] == pv["metadata"]["name"]
    assert pv["spec"]["storageClassName"] == pvc["spec"]["storageClassName"] == ""
    assert pv["spec"]["accessModes"] == pvc["spec"]["accessModes"] == ["ReadWriteMany"]
