#!/usr/bin/env bash
# Build (once) and cache the Kubernetes v1.20.2 control-plane and node binaries from Debian's
# `kubernetes` source package (GUIDE.md §3), and print the folder that holds them.
#
# The cache lives outside the clone, keyed by the sha256 of the upstream tarball plus the
# version of this recipe, so CI reruns and later sessions on the same machine skip the
# ~10-minute Go build:  ${PLANSMITH_CACHE:-/var/cache/plansmith}/kubernetes/<key>/bin
#
# usage: deploy/local/kubernetes-binaries.sh     (prints the bin folder on its last line)
set -euo pipefail
RECIPE_VERSION=2   # bump when the build steps below change what ends up in bin/
CACHE=${PLANSMITH_CACHE:-/var/cache/plansmith}
BINARIES="kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy"
SRC=$CACHE/kubernetes-src
mkdir -p "$SRC"
log() { echo "[kubernetes-binaries] $*" >&2; }

need=""
for p in etcd-server golang-go rsync jq golang-github-modern-go-reflect2-dev dpkg-dev make; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || need="$need $p"
done

if ! ls "$SRC"/kubernetes_*.orig.tar.* >/dev/null 2>&1; then
  # a deb-src twin of the deb entry, so that `apt-get source` can find the package
  if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ && ! grep -qs '^deb-src' /etc/apt/sources.list; then
    uris=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)
    printf 'Types: deb-src\nURIs: %s\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      "$uris" >/etc/apt/sources.list.d/plansmith-deb-src.sources
  fi
  log "apt-get update"
  apt-get update -qq
  log "downloading Debian's kubernetes source package"
  (cd "$SRC" && apt-get source --download-only -qq kubernetes >/dev/null)
fi
if [ -n "$need" ]; then
  [ -n "$(find /var/lib/apt/lists -name '*Packages*' -mmin -600 2>/dev/null | head -1)" ] || apt-get update -qq
  log "installing$need"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >/dev/null
fi

# kubectl 1.20 (matches the server) from Debian's kubernetes-client, unpacked without installing it
ensure_kubectl() {
  [ -x "$1/kubectl" ] && return 0
  local tmp; tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download -qq kubernetes-client 2>/dev/null) || { apt-get update -qq && (cd "$tmp" && apt-get download -qq kubernetes-client); }
  dpkg-deb --fsys-tarfile "$tmp"/kubernetes-client_*.deb | tar -xO ./usr/bin/kubectl >"$1/kubectl.tmp"
  chmod +x "$1/kubectl.tmp" && mv "$1/kubectl.tmp" "$1/kubectl"
  rm -rf "$tmp"
}

tarball=$(ls "$SRC"/kubernetes_*.orig.tar.* | head -1)
key=$( (sha256sum "$tarball" | cut -d' ' -f1; echo "recipe=$RECIPE_VERSION") | sha256sum | cut -c1-16)
OUT=$CACHE/kubernetes/$key
if [ -f "$OUT/.complete" ]; then ensure_kubectl "$OUT/bin"; echo "$OUT/bin"; exit 0; fi

log "building $BINARIES from $(basename "$tarball") (about 10 minutes on 2 cores; cached in $OUT)"
start=$(date +%s)
WORK=$CACHE/kubernetes-build.$$
rm -rf "$WORK"; mkdir -p "$WORK/home"
trap 'rm -rf "$WORK"' EXIT
tar -C "$WORK" -xf "$tarball"
TREE=$(find "$WORK" -mindepth 1 -maxdepth 1 -type d ! -name home | head -1)
# Go >= 1.18 breaks the vendored reflect2 (fatal error: fault at the first request): use Debian's 1.0.2.
R=$TREE/vendor/github.com/modern-go/reflect2
rm -f "$R"/*.go "$R"/*.s
for f in /usr/share/gocode/src/github.com/modern-go/reflect2/*.go /usr/share/gocode/src/github.com/modern-go/reflect2/*.s; do
  case "$f" in *_test.go) ;; *) [ -e "$f" ] && cp "$f" "$R/" ;; esac
done
mkdir -p "$TREE/.go/src/k8s.io" && ln -s ../../.. "$TREE/.go/src/k8s.io/kubernetes"
what=""; for b in $BINARIES; do what="$what cmd/$b"; done
(cd "$TREE/.go/src/k8s.io/kubernetes" && \
  env GOPATH="$TREE/.go" CGO_ENABLED=0 HOME="$WORK/home" GOFLAGS=-mod=vendor GO111MODULE=auto \
  make WHAT="${what# }" >"$WORK/build.log" 2>&1) || { tail -40 "$WORK/build.log" >&2; exit 1; }
mkdir -p "$OUT/bin.tmp"
for b in $BINARIES; do cp "$TREE/_output/bin/$b" "$OUT/bin.tmp/"; done
rm -rf "$OUT/bin"; mv "$OUT/bin.tmp" "$OUT/bin"
ensure_kubectl "$OUT/bin"
touch "$OUT/.complete"
log "built in $(( $(date +%s) - start )) s"
echo "$OUT/bin"
