#!/usr/bin/env bash
# Prepares this machine for the real node (hack/node): run as root, every time,
# on a fresh machine or a used one (idempotent; a second run changes nothing).
#
# - Debian packages the node and the image builds use, installed when missing:
#   the CNI plugins (bridge, host-local, loopback, portmap), buildah and
#   debootstrap (the images), iptables and conntrack (kube-proxy), socat,
#   ethtool, busybox-static (the node tests' small image), and libseccomp-dev
#   with pkg-config (runc's seccomp, built by
#   hack/build-testbed.sh). containerd and runc are built from their Go modules
#   there, not taken from Debian (see hack/versions.env).
# - What the kernel needs: IP forwarding and bridged traffic through iptables
#   (br_netfilter), overlayfs, and cgroups. Modules are loaded when they are
#   modules; on kernels that build them in (such as the CI VM, booted with
#   `nomodule`) there is nothing to load, and the check below says so.
# - The pod bridge with the node's address (NODE_IP), which the API server of a
#   cluster with a real node binds, so pods reach it (hack/node/config.py names both).
set -euo pipefail

[ "$(id -u)" = 0 ] || { echo "host-setup: run as root (the node needs namespaces, mounts and iptables)" >&2; exit 1; }
here="$(cd "$(dirname "$0")" && pwd)"
step() { echo "==> $*" >&2; }

packages=(containernetworking-plugins buildah debootstrap iptables conntrack socat ethtool
          libseccomp-dev pkg-config iproute2 util-linux busybox-static)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  step "installing Debian packages: ${missing[*]}"
  # apt-get update only when something is missing: a warm machine asks no mirror.
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# hack/build-testbed.sh needs the packages (runc's libseccomp) before any node runs.
[ "${1:-}" = "--packages-only" ] && exit 0

# Kernel features: a loadable module is loaded; a built-in one is just there.
have_fs() { grep -qw "$1" /proc/filesystems; }
if ! have_fs overlay; then modprobe overlay 2>/dev/null || true; fi
have_fs overlay || { echo "host-setup: the kernel has no overlayfs (containerd's snapshotter needs it)" >&2; exit 1; }
if [ ! -e /proc/sys/net/bridge/bridge-nf-call-iptables ]; then modprobe br_netfilter 2>/dev/null || true; fi
[ -e /proc/sys/net/bridge/bridge-nf-call-iptables ] || {
  echo "host-setup: no br_netfilter (bridged pod traffic must pass iptables for Services to work)" >&2; exit 1; }

# Forwarding for pod traffic, and bridged frames through iptables so that a pod
# reaching a Service whose endpoint is on the same bridge is NATed both ways.
sysctl -q -w net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1 net.bridge.bridge-nf-call-ip6tables=1
# inotify limits: the kubelet, containerd and every pod's runtime watch files.
sysctl -q -w fs.inotify.max_user_instances=8192 fs.inotify.max_user_watches=524288

# cgroups: v2 (unified) or v1. On v1 every hierarchy the kubelet and runc use must be mounted.
if [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ]; then
  :
else
  for c in cpu cpuacct cpuset memory pids devices freezer blkio; do
    grep -qE "^[^ ]+ /sys/fs/cgroup/[^ ]*\b$c\b" /proc/self/mounts || {
      echo "host-setup: cgroup v1 without the $c hierarchy mounted" >&2; exit 1; }
  done
fi

# The pod bridge, with the node's address: made here rather than by the CNI
# bridge plugin at the first pod, because the API server binds that address
# before any pod exists.
read -r bridge node_cidr service_cidr kwok_cidr < <(python3 "$here/config.py" network)
if ! ip link show "$bridge" >/dev/null 2>&1; then
  step "creating the pod bridge $bridge ($node_cidr)"
  ip link add "$bridge" type bridge
fi
ip addr replace "$node_cidr" dev "$bridge"
ip link set "$bridge" up
# Cluster IPs that kube-proxy has not (yet) rewritten stay on this machine: without
# this route they would follow the default route out of it. The same for kwok's
# simulated pod IPs, which no machine has.
ip route replace "$service_cidr" dev "$bridge"
ip route replace unreachable "$kwok_cidr"
step "host ready: bridge $bridge at $node_cidr, forwarding on, br_netfilter on"
