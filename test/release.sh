#!/usr/bin/env bash
# Runs a command in this repository inside a Debian chroot whose Ceph is another release than the
# host's, so the whole suite (build, cluster, tests) runs against that release's librbd.
#
#   test/release.sh RELEASE CMD...     e.g. test/release.sh reef make test
#   test/release.sh RELEASE --prepare  only make (or update) the chroot
#
#   RELEASE   Debian suite   Ceph
#   reef      trixie         18.2.7
#   tentacle  forky          20.2.4
#
# The chroot is a debootstrap --variant=minbase of that suite from the Debian mirror the host's apt
# already uses (or $FLATTEND_DEBIAN_MIRROR), with test/cluster.sh's packages installed. It is kept
# in /var/cache/flattend-test/RELEASE (override: $FLATTEND_CHROOT_CACHE) and reused; it is brought
# up to date when cluster.sh's package list changes. Delete the directory to start afresh.
#
# CMD runs as root in a mount and PID namespace of its own (unshare): /proc, /dev, /sys, a fresh
# /tmp and /run, this repository (at the same path, with its git directory read-only), the host's Go
# (read-only at /usr/local/go) and Go module cache (read-only, GOPROXY=off) are mounted there only.
# When CMD ends, or this script is killed, the namespace's processes are killed and its mounts
# vanish with it: nothing is left mounted or running on the host. bin/ is a directory per release
# and repository inside the chroot, so the host's bin/flattend is left alone.
#
# Needs root, debootstrap and unshare (util-linux). The environment inside is clean apart from
# FLATTEND_TEST_* variables and VERSION, which are passed through, and
# FLATTEND_TEST_CEPH_RELEASE=RELEASE, which tells the tests what they run on.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
log() { echo "release.sh: $*" >&2; }
# shellcheck source=test/chroot-lib.sh
source "$here/chroot-lib.sh"

[[ $# -ge 2 ]] || { log "usage: $0 reef|tentacle CMD... | --prepare"; exit 2; }
release=$1
shift
case $release in
reef) suite=trixie ;;
tentacle) suite=forky ;;
*) log "unknown release '$release' (reef or tentacle; plain make targets use the host's Ceph)"; exit 2 ;;
esac
[[ $(id -u) == 0 ]] || { log "needs root (debootstrap, chroot, mounts)"; exit 1; }

cache=${FLATTEND_CHROOT_CACHE:-/var/cache/flattend-test}
root=$cache/$release
mkdir -p "$cache"

# Packages: what test/cluster.sh deps installs on the host, plus what the Makefile and the
# independent test clients need.
packages() { echo "$(bash "$here/cluster.sh" pkgs) make git procps python3-rbd python3-rados ca-certificates"; }

# bootstrap: a fresh chroot of the suite, made beside the cache and renamed into place when whole.
bootstrap() {
	local m new=$root.new script=/usr/share/debootstrap/scripts/$suite
	m=$(mirror)
	[[ -n $m ]] || { log "no Debian mirror found in /etc/apt/sources.list*; set FLATTEND_DEBIAN_MIRROR"; exit 1; }
	need_debootstrap
	# An older debootstrap has no script for a newer suite: trixie's works for them.
	[[ -e $script ]] || script=/usr/share/debootstrap/scripts/trixie
	rm -rf "$new"
	log "debootstrap $suite from $m into $new"
	debootstrap --variant=minbase "$suite" "$new" "$m" "$script" >"$cache/$release.debootstrap.log" 2>&1 ||
		{ tail -20 "$cache/$release.debootstrap.log" >&2; exit 1; }
	# Daemons are never started by package scripts here (no init system): the tests start their own.
	printf '#!/bin/sh\nexit 101\n' >"$new/usr/sbin/policy-rc.d"
	chmod +x "$new/usr/sbin/policy-rc.d"
	# A testing suite's Release file can be past its Valid-Until on an archive snapshot.
	echo 'Acquire::Check-Valid-Until "false";' >"$new/etc/apt/apt.conf.d/99flattend-test"
	rm -f "$new/.flattend-packages"
	mv "$new" "$root"
}

# prepare: makes the chroot if missing and installs what the package list asks for when it changed.
prepare() {
	local want
	want=$(packages)
	[[ -d $root ]] || bootstrap
	[[ $(cat "$root/.flattend-packages" 2>/dev/null) == "$want" ]] && return 0
	log "installing into the $release chroot: $want"
	# shellcheck disable=SC2086 # the list is words
	in_ns "$root" bash -c '
		apt_in() { chroot "$1" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 apt-get -o Dpkg::Use-Pty=0 "${@:2}"; }
		apt_in "$1" update -qq && apt_in "$1" install -y -qq --no-install-recommends ${@:2}
	' prep "$root" $want >"$cache/$release.apt.log" 2>&1 || {
		tail -30 "$cache/$release.apt.log" >&2
		log "installing packages failed (whole log: $cache/$release.apt.log)"
		exit 1
	}
	echo "$want" >"$root/.flattend-packages"
	log "$release chroot ready: $(chroot "$root" ceph --version 2>/dev/null)"
}

# Preparing takes the cache's lock exclusively; a run holds it shared, so the chroot is not
# changed under a run (several runs share it: each has its own namespace, /tmp and bin/).
exec 9>"$cache/$release.lock"
flock -x 9
prepare
flock -s 9
[[ $1 == --prepare ]] && exit 0

goroot=$(go env GOROOT 2>/dev/null || echo /usr/local/go)
modcache=$(go env GOMODCACHE 2>/dev/null || echo /root/go/pkg/mod)
gitdir=$(git -C "$repo" rev-parse --path-format=absolute --git-common-dir 2>/dev/null || true)
bindir=$root/var/lib/flattend-bin/$(echo "$repo" | sha1sum | cut -c1-12)
mkdir -p "$root$repo" "$root/usr/local/go" "$root/root/go/pkg/mod" "$bindir" "$repo/bin" "$root$repo/bin"
[[ -z $gitdir ]] || mkdir -p "$root$gitdir"

envs=(PATH=/usr/local/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
	LANG=C.UTF-8 TERM="${TERM:-dumb}" GOFLAGS=-mod=mod GOPROXY=off GOTOOLCHAIN=local GOMODCACHE=/root/go/pkg/mod
	FLATTEND_TEST_CEPH_RELEASE="$release")
while IFS='=' read -r name _; do
	[[ $name == FLATTEND_TEST_* && $name != FLATTEND_TEST_CEPH_RELEASE ]] && envs+=("$name=${!name}")
done < <(env)
[[ -z ${VERSION:-} ]] || envs+=("VERSION=$VERSION")

log "running in the $release chroot ($(cat "$root/.flattend-packages" | wc -w) packages, $root): $*"
in_ns_exec "$root" bash -c '
	set -e
	root=$1 repo=$2 goroot=$3 modcache=$4 gitdir=$5 bindir=$6; shift 6
	mount --bind "$repo" "$root$repo"
	mount --bind "$bindir" "$root$repo/bin"
	mount --bind -o ro "$goroot" "$root/usr/local/go"
	mount --bind -o ro "$modcache" "$root/root/go/pkg/mod"
	[[ -z $gitdir || $gitdir == "$repo"/* ]] || mount --bind -o ro "$gitdir" "$root$gitdir"
	cd "$root$repo"
	chroot "$root" /usr/bin/env -i "$@"
' run "$root" "$repo" "$goroot" "$modcache" "$gitdir" "$bindir" "${envs[@]}" bash -c 'cd "$1" && shift && exec "$@"' cmd "$repo" "$@"
