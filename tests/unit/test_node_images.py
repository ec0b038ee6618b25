"""Cache keys of the node's images: what a Dockerfile's COPY takes (after
.dockerignore) decides whether it is rebuilt; the embedded model's node-local
cache and its PersistentVolume."""

from __future__ import annotations

import os
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
    assert "FROM python:${PYTHON_VERSION}-slim" in (build.REPO / "Dockerfile.operator").read_text()


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
