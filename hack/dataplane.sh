#!/usr/bin/env bash
# Builds the gateway's compiled data plane, the Rust crate gateway/dataplane
# (binary modelendpoint-gateway-dataplane), and installs it into .venv/bin/, where
# the Python gateway finds it (beside sys.executable, on the venv's PATH).
#
#   hack/dataplane.sh          cargo build --release --locked, then install the binary
#   hack/dataplane.sh test     cargo test --release --locked (the unit tier runs this)
#
# Cargo's target folder is kept outside the repository, in the cache root
# (${MEP_CACHE:-~/.cache/modelendpoint}/cargo-target), shared by both modes, so
# that a stray target/ never reaches a build context and a warm run only checks
# cargo's fingerprints (well under a second). Crates are downloaded once, into
# cargo's own cache ($CARGO_HOME, ~/.cargo). Needs Rust >= RUST_VERSION
# (hack/versions.env) with cargo, and a C linker (cc).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
source "$repo/hack/versions.env"

mode="${1:-build}"
case "$mode" in build | test) ;; *) echo "usage: $0 [build|test]" >&2; exit 2 ;; esac

crate="$repo/gateway/dataplane"
bin_name=modelendpoint-gateway-dataplane
export CARGO_TARGET_DIR="${MEP_CACHE:-$HOME/.cache/modelendpoint}/cargo-target"

# rustup installs into ~/.cargo/bin, which a non-login shell (make, CI) may not
# have on PATH; cargo also needs rustc on PATH, hence PATH rather than a full path.
if ! command -v cargo >/dev/null && [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]; then
  export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi
if ! command -v cargo >/dev/null || ! command -v rustc >/dev/null; then
  echo "dataplane: cargo and rustc (Rust >= $RUST_VERSION) are needed to build gateway/dataplane;" \
       "install them with rustup (https://rustup.rs), then rerun \`make setup\`" >&2
  exit 1
fi
have="$(rustc --version | cut -d' ' -f2)"
if [ "$(printf '%s\n%s\n' "$RUST_VERSION" "$have" | sort -V | head -n1)" != "$RUST_VERSION" ]; then
  echo "dataplane: Rust $have is older than $RUST_VERSION (hack/versions.env); \`rustup update\`" >&2
  exit 1
fi

# From the crate's folder, so that a .cargo/config.toml of the crate applies
# (cargo finds its configuration from the working directory, not the manifest).
cd "$crate"
if [ "$mode" = test ]; then
  exec cargo test --release --locked
fi
cargo build --release --locked

built="$CARGO_TARGET_DIR/release/$bin_name"
dest="$repo/.venv/bin/$bin_name"
[ -d "$repo/.venv/bin" ] || { echo "dataplane: $repo/.venv is missing; run \`make setup\`" >&2; exit 1; }
if ! cmp -s "$built" "$dest"; then
  # A new file renamed over the old one: a gateway running the old binary keeps
  # its inode (copying in place would fail with "text file busy").
  cp "$built" "$dest.partial"
  chmod 0755 "$dest.partial"
  mv -f "$dest.partial" "$dest"
  echo "==> installed $dest (rustc $have)" >&2
fi
