#!/usr/bin/env bash
# Proves the README's first step on a machine that has never seen this project: a Debian 12
# (bookworm) minbase chroot with only git, make and ca-certificates, plus Go at /usr/local/go (the
# host's, read-only, as the README asks a newcomer to install it). It clones this repository's
# HEAD (committed work only) and runs `make demo` once, as root; the Debian packages come from
# the mirror apt uses here and Go modules from the Go module proxy, into empty caches.
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
work=$(mktemp -d /var/tmp/flattend-fresh.XXXXXX)
trap 'rm -rf "$work"' EXIT
cp -a "$base" "$work/root"
git -C "$repo" bundle create "$work/root/root/flattend.bundle" HEAD 2>/dev/null
mkdir -p "$work/root/usr/local/go"
log "fresh bookworm in $work/root: git clone, then make ${targets[*]} ($(git -C "$repo" rev-parse --short HEAD))"
start=$SECONDS
set +e
in_ns "$work/root" bash -c '
	set -e
	mount --bind -o ro "$2" "$1/usr/local/go"
	chroot "$1" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM="${TERM:-dumb}" \
		PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/go/bin \
		bash -c "git clone -q /root/flattend.bundle /root/flattend && cd /root/flattend && make ${*:3}"
' fresh "$work/root" "$goroot" "${targets[@]}" </dev/null
rc=$?
set -e
log "make ${targets[*]} on a fresh Debian 12: exit $rc after $((SECONDS - start)) s"
exit $rc
