#!/usr/bin/env bash
# Builds the test bed's binaries from the Go module proxy into a versioned
# cache folder outside the repository, once per machine:
#   etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl
#   (from k8s.io/kubernetes through the wrapper module in hack/testbed/kubernetes),
#   kwok, kwokctl and helm (go install at pinned versions);
#   the node's kubelet and kube-proxy (same module, same version) and, into a
#   folder of their own keyed by their versions, containerd, runc and crictl
#   (go install at pinned versions; runc needs cgo and libseccomp-dev, which
#   hack/node/host-setup.sh installs).
# Prints the bin folder as its last line. A second run builds nothing.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache="${MEP_CACHE:-$HOME/.cache/modelendpoint}"
bin="$cache/testbed-k8s-${KUBERNETES_VERSION}-etcd-${ETCD_VERSION}-kwok-${KWOK_VERSION}-helm-${HELM_VERSION}/bin"
mkdir -p "$bin"

# One build at a time per cache: make test's fixtures and a `make testbed` in
# another shell would otherwise race on the same .partial folders.
exec 9>"$cache/.testbed.lock"
flock 9

export GOFLAGS="-trimpath"
ldflags="-s -w"

step() { echo "==> $*" >&2; }

# How often a long build reports progress (seconds); tests make it short.
progress_every="${MEP_BUILD_PROGRESS_SECONDS:-30}"

elapsed() { printf '%dm%02ds' $(( (SECONDS - $1) / 60 )) $(( (SECONDS - $1) % 60 )); }

# Summarizes `go build -v` output (one import path per package compiled) read on
# stdin: a line every $progress_every seconds with the count, the elapsed time
# and the latest package, also while go is silent (downloading modules, linking),
# so a 10-25 minute cold build is visibly moving. Anything else go prints
# (compile errors) passes through unchanged.
go_build_progress() {
  local total="$1" start=$SECONDS n=0 last="(downloading modules)" line rc
  local next=$((SECONDS + progress_every))
  while :; do
    if IFS= read -r -t "$progress_every" line; then
      case "$line" in
        *" "* | *:* | "") echo "$line" >&2 ;;
        *) n=$((n + 1)); last="$line" ;;
      esac
    else
      rc=$?
      [ "$rc" -gt 128 ] || break  # > 128: a timeout, go is still working; else end of output
    fi
    if [ "$SECONDS" -ge "$next" ]; then
      step "go build: $n of at most $total packages compiled, $(elapsed "$start") elapsed (latest: $last)"
      next=$((SECONDS + progress_every))
    fi
  done
  step "go build: $n packages compiled in $(elapsed "$start")"
}

k8s_cmds=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy)
missing=()
for c in "${k8s_cmds[@]}"; do [ -x "$bin/$c" ] || missing+=("k8s.io/kubernetes/cmd/$c"); done
[ -x "$bin/etcd" ] || missing+=("./cmd/etcd")
if [ ${#missing[@]} -gt 0 ]; then
  step "building ${missing[*]} (Kubernetes ${KUBERNETES_VERSION}, etcd ${ETCD_VERSION}); a cold build takes 10-25 minutes on 2 cores"
  tmp="$bin/.partial"
  rm -rf "$tmp" && mkdir -p "$tmp"
  # Kubernetes stamps its version through ldflags; without it kubectl and the
  # API server report v0.0.0, which breaks version skew checks (helm, kubectl).
  vpkg=k8s.io/component-base/version
  kv="-X $vpkg.gitVersion=${KUBERNETES_VERSION} -X $vpkg.gitMajor=$(echo "$KUBERNETES_VERSION" | sed -E 's/^v([0-9]+).*/\1/') -X $vpkg.gitMinor=$(echo "$KUBERNETES_VERSION" | sed -E 's/^v[0-9]+\.([0-9]+).*/\1/') -X $vpkg.gitTreeState=clean"
  step "resolving the packages to build (downloads the Go modules on a cold cache)"
  start=$SECONDS
  total="$(cd "$here/testbed/kubernetes" && go list -deps "${missing[@]}" | wc -l)"
  step "$total packages to compile at most (cached ones are skipped); resolved in $(elapsed "$start")"
  (cd "$here/testbed/kubernetes" && go build -v -ldflags "$ldflags $kv -X k8s.io/client-go/pkg/version.gitVersion=${KUBERNETES_VERSION}" -o "$tmp/" "${missing[@]}" 2>&1) \
    | go_build_progress "$total"
  mv "$tmp"/* "$bin/" && rmdir "$tmp"
fi

for c in kwok kwokctl; do  # kwokctl runs the control plane from these binaries (hack/localcluster.py)
  if [ ! -x "$bin/$c" ]; then
    step "building $c ${KWOK_VERSION}"
    GOBIN="$bin" go install -ldflags "$ldflags" "sigs.k8s.io/kwok/cmd/$c@${KWOK_VERSION}"
  fi
done
stages="$bin/../kwok-stages.yaml"
if [ ! -s "$stages" ]; then
  # kwok ships its stage definitions (what it does to simulated nodes and pods)
  # as YAML in its module, not in the binary: take the "fast" set plus node
  # heartbeats with leases from the module at the same pinned version.
  kwok_dir="$(go mod download -json "sigs.k8s.io/kwok@${KWOK_VERSION}" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')"
  s="$kwok_dir/kustomize/stage"
  for f in "$s"/node/fast/*.yaml "$s"/node/heartbeat-with-lease/node-*.yaml "$s"/pod/fast/pod-*.yaml; do
    echo "---"; cat "$f"
  done > "$stages.partial"
  mv "$stages.partial" "$stages"
fi
if [ ! -x "$bin/helm" ]; then
  step "building helm ${HELM_VERSION}"
  GOBIN="$bin" go install -ldflags "$ldflags -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}" "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}"
fi

# containerd, runc and crictl for the node, through the wrapper module in
# hack/testbed/node, into a folder keyed by their versions so that a new pin
# rebuilds only them (hack/node/config.py computes the same folder).
node_bin="$cache/node-containerd-${CONTAINERD_VERSION}-runc-${RUNC_VERSION}-crictl-${CRICTL_VERSION}/bin"
mkdir -p "$node_bin"
node_mod="$here/testbed/node"
for pin in "github.com/containerd/containerd/v2 $CONTAINERD_VERSION" "github.com/opencontainers/runc $RUNC_VERSION" \
           "sigs.k8s.io/cri-tools $CRICTL_VERSION"; do
  grep -q "^	$pin\$" "$node_mod/go.mod" || {
    echo "build-testbed: hack/versions.env pins $pin, hack/testbed/node/go.mod does not (edit both)" >&2; exit 1; }
done
node_build() {  # name, then go build arguments
  local name="$1"; shift
  [ -x "$node_bin/$name" ] && return 0
  step "building $name"
  rm -rf "$node_bin/.partial" && mkdir -p "$node_bin/.partial"
  (cd "$node_mod" && go build -o "$node_bin/.partial/" "$@")
  mv "$node_bin/.partial/$name" "$node_bin/$name" && rm -rf "$node_bin/.partial"
}
ctrd=github.com/containerd/containerd/v2
# Static, without the btrfs snapshotter (it needs cgo and btrfs headers; overlayfs is used).
CGO_ENABLED=0 node_build containerd -tags "no_btrfs urfave_cli_no_docs" \
  -ldflags "$ldflags -X $ctrd/version.Version=${CONTAINERD_VERSION}" "$ctrd/cmd/containerd"
CGO_ENABLED=0 node_build containerd-shim-runc-v2 -tags "no_btrfs urfave_cli_no_docs no_grpc" \
  -ldflags "$ldflags -X $ctrd/version.Version=${CONTAINERD_VERSION}" "$ctrd/cmd/containerd-shim-runc-v2"
CGO_ENABLED=0 node_build ctr -tags "no_btrfs urfave_cli_no_docs" \
  -ldflags "$ldflags -X $ctrd/version.Version=${CONTAINERD_VERSION}" "$ctrd/cmd/ctr"
# seccomp needs cgo and libseccomp; without the libpathrs tag runc uses its Go path resolution.
# On a fresh machine the Debian packages come first (the node's host setup installs them).
if [ ! -x "$node_bin/runc" ] && ! pkg-config --exists libseccomp 2>/dev/null; then
  bash "$here/node/host-setup.sh" --packages-only
fi
CGO_ENABLED=1 node_build runc -tags "seccomp urfave_cli_no_docs" \
  -ldflags "-X main.version=${RUNC_VERSION#v}" github.com/opencontainers/runc
CGO_ENABLED=0 node_build crictl \
  -ldflags "$ldflags -X sigs.k8s.io/cri-tools/pkg/version.Version=${CRICTL_VERSION}" sigs.k8s.io/cri-tools/cmd/crictl
echo "$bin"
