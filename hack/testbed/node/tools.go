//go:build tools

// Package tools pins the commands of the real node that this module builds:
// containerd (with its runc shim and ctr), runc and crictl, at the versions in
// hack/versions.env. One module, so that `go mod tidy` records every
// dependency's checksum in go.sum.
package tools

import (
	_ "github.com/containerd/containerd/v2/cmd/containerd"
	_ "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"
	_ "github.com/containerd/containerd/v2/cmd/ctr"
	_ "github.com/opencontainers/runc"
	_ "sigs.k8s.io/cri-tools/cmd/crictl"
)
