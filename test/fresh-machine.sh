#!/usr/bin/env bash
# Proves the README's first step on a machine that has never seen this project: a Debian 12
# (bookworm) minbase chroot with only git, make and ca-certificates, plus Go at /usr/local/go (the
# host's, read-only, as the README asks a newcomer to install it). It clones this repository's
# HEAD (committed work only) and runs `make demo` once, as root, with empty package and module
# caches. Debian packages come from the mirror apt uses here. Go modules come from a Go module
# proxy: by default the host's module download cache, served read-only as a file:// proxy (the
# same files, in the proxy's layout), so the proof does not depend on this machine's TLS trust
# store; FLATTEND_FRESH_GOPROXY=https://proxy.golang.org fetches them from the network instead.
#
#   test/fresh-machine.sh [make-target...]     default: demo
#
# The bare bookworm is cached in /var/cache/flattend-test/fresh-bookworm (override:
# $FLATTEND_CHROOT_CACHE) and copied for each run, so every run starts from the same fresh machine;
# the copy is deleted at the end. Runs in a mount and PID namespace (test/chroot-lib.sh): nothing
# stays mounted or running. Needs root, debootstrap and unshare.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
log() { echo "fresh-machine.sh: $*" >&2; }
# shellcheck source=test/chroot-lib.sh
source "$here/chroot-lib.sh"
[[ $(id -u) == 0 ]] || { log "needs root"; exit 1; }
targets=("${@:-demo}")

cache=${FLATTEND_CHROOT_CACHE:-/var/cache/flattend-test}
base=$cache/fresh-bookworm
mkdir -p "$cache"
exec 9>"$base.lock"
flock -x 9
if [[ ! -e $base/.flattend-ready ]]; then
	m=$(mirror)
	[[ -n $m ]] || { log "no Debian mirror found; set FLATTEND_DEBIAN_MIRROR"; exit 1; }
	need_debootstrap
	rm -rf "$base"
	log "debootstrap bookworm (minbase, git, make, ca-certificates) from $m into $base"
	debootstrap --variant=minbase --include=git,make,ca-certificates bookworm "$base" "$m" \
		>"$base.debootstrap.log" 2>&1 || { tail -20 "$base.debootstrap.log" >&2; exit 1; }
	touch "$base/.flattend-ready"
fi
flock -s 9

goroot=$(go env GOROOT 2>/dev/null || echo /usr/local/go)
modcache=$(go env GOMODCACHE 2>/dev/null || echo /root/go/pkg/mod)
goproxy=${FLATTEND_FRESH_GOPROXY:-file:///srv/goproxy}
work=$(mktemp -d /var/tmp/flattend-fresh.XXXXXX)
trap 'rm -rf "$work"' EXIT
cp -a "$base" "$work/root"
git -C "$repo" bundle create "$work/root/root/flattend.bundle" HEAD 2>/dev/null
mkdir -p "$work/root/usr/local/go" "$work/root/srv/goproxy"
log "fresh bookworm in $work/root: git clone, then make ${targets[*]} ($(git -C "$repo" rev-parse --short HEAD), GOPROXY=$goproxy)"
start=$SECONDS
set +e
in_ns "$work/root" bash -c '
	set -e
	mount --bind -o ro "$2" "$1/usr/local/go"
	mount --bind -o ro "$3/cache/download" "$1/srv/goproxy"
	chroot "$1" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM="${TERM:-dumb}" GOPROXY="$4" \
		PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/go/bin \
		bash -c "git clone -q /root/flattend.bundle /root/flattend && cd /root/flattend && make ${*:5}"
' fresh "$work/root" "$goroot" "$modcache" "$goproxy" "${targets[@]}" </dev/null
rc=$?
set -e
log "make ${targets[*]} on a fresh Debian 12: exit $rc after $((SECONDS - start)) s"
exit $rc
