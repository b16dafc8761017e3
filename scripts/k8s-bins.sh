#!/usr/bin/env bash
# Kubernetes binaries of one release, built from the Go module proxy and cached; prints the
# directory that holds them. K8S_BIN_DIR names a directory of prebuilt release binaries
# instead (nothing is built then). K8S_VERSION picks the release (default below).
#
# k8s.io/kubernetes requires its staging modules (k8s.io/api, apimachinery, ...) at v0.0.0 with
# replace directives to ./staging, which `go install pkg@version` refuses. So a small main
# module requires k8s.io/kubernetes and replaces each staging module by its published release
# (v0.Y.Z for v1.Y.Z), the list read from that release's own go.mod.
set -euo pipefail
VER=${K8S_VERSION:-v1.36.3}
BINS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl)
# Built too (a cluster with kubelets needs them): agnhost, Kubernetes' test server, for the
# image e2e.test runs its pods from; e2e.test, the upstream end-to-end tests.
TEST_BINS=(agnhost e2e.test)
if [ -n "${K8S_BIN_DIR:-}" ]; then
  for b in "${BINS[@]}"; do
    [ -x "$K8S_BIN_DIR/$b" ] || { echo "K8S_BIN_DIR=$K8S_BIN_DIR has no $b" >&2; exit 1; }
  done
  echo "$K8S_BIN_DIR"
  exit 0
fi
CACHE=${WEFT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/weft}/k8s/$VER
missing=()
for b in "${BINS[@]}" "${TEST_BINS[@]}"; do [ -x "$CACHE/$b" ] || missing+=("$b"); done
if [ ${#missing[@]} -eq 0 ]; then echo "$CACHE"; exit 0; fi
command -v go >/dev/null || { echo "no Go toolchain: Kubernetes $VER cannot be built (set K8S_BIN_DIR to prebuilt binaries)" >&2; exit 2; }
# Kubernetes 1.34 needs Go 1.24; each release since one more minor (1.36: Go 1.26).
minor=$(echo "$VER" | cut -d. -f2)
have=$(go env GOVERSION | sed -n 's/^go1\.\([0-9]*\).*/\1/p')
if [ "${have:-0}" -lt $((minor - 10)) ]; then
  echo "Go $(go env GOVERSION) is too old for Kubernetes $VER (it needs Go 1.$((minor - 10)); K8S_VERSION=v1.34.4 needs 1.24, or set K8S_BIN_DIR)" >&2
  exit 2
fi

STAGING=v0.${VER#v1.}
SRC=$CACHE/src
mkdir -p "$SRC"
cd "$SRC"
gomod=$(go mod download -json "k8s.io/kubernetes@$VER" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
need=$(sed -n 's/^go \([0-9.]*\)$/\1/p' "$gomod")
echo "building Kubernetes $VER (its go.mod asks Go $need; here: $(go env GOVERSION)) into $CACHE" >&2
{
  echo "module weft.local/k8s-bins"
  echo
  echo "go $need"
  echo
  echo "require k8s.io/kubernetes $VER"
  echo
  echo "replace ("
  sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/src/k8s.io/[a-z0-9-]*$#\t\1 => \1 '"$STAGING"'#p' "$gomod"
  echo ")"
} >go.mod
# One file importing nothing; the commands are built straight from the required module.
printf 'package main\n\nfunc main() {}\n' >main.go
pkg() {
  case $1 in
    agnhost) echo k8s.io/kubernetes/test/images/agnhost ;;
    e2e.test) echo k8s.io/kubernetes/test/e2e ;;
    *) echo "k8s.io/kubernetes/cmd/$1" ;;
  esac
}
for b in "${missing[@]}"; do
  go get "$(pkg "$b")@$VER" >&2
done
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$VER -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$(echo "$VER" | cut -d. -f2)"
# -mod=mod: the e2e tests import staging modules (sample-apiserver, ...) whose sums the
# commands' builds never needed.
for b in "${missing[@]}"; do
  if [ "$b" = e2e.test ]; then
    GOFLAGS=-mod=mod CGO_ENABLED=0 go test -c -trimpath -ldflags "$ldflags" -o "$CACHE/$b.tmp" "$(pkg "$b")" >&2
  else
    GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$CACHE/$b.tmp" "$(pkg "$b")" >&2
  fi
  mv "$CACHE/$b.tmp" "$CACHE/$b"
done
echo "$CACHE"
