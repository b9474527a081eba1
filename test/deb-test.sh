#!/usr/bin/env bash
# Installs a flattend package with apt into a fresh Debian chroot of this machine's release
# (debootstrap --variant=minbase, nothing else), then checks what an operator relies on:
#   - the files: /usr/bin/flattend, the unit in a directory systemd loads units from,
#     /etc/flattend/config.yaml as a conffile, the sysusers.d entry, flattend(8), the docs;
#   - the flattend system user; `flattend version` (as that user, with the librbd apt installed);
#   - `systemd-analyze verify` accepts the installed unit; the maintainer scripts, run as on a host
#     booted with systemd, neither enable nor start it on install, restart it on upgrade once the
#     operator enabled it, and stop it on remove;
#   - `flattend check` on the shipped config fails with exit 2 and a file:line: field: message
#     that says what to configure;
#   - an upgrade (the same package as version +upgrade1 with a changed conffile, as the next
#     release would ship it) keeps the operator's edited config and sets the new one aside as
#     config.yaml.dpkg-dist;
#   - a purge removes every file and directory the package installed, /etc/flattend and the
#     systemd state; the flattend user stays (documented: files may still belong to it).
#   - lintian, on the host, reports no error or warning.
# Each check prints ok or FAIL; the script exits 1 if any failed.
#
#   test/deb-test.sh flattend_VERSION_ARCH.deb     (make deb-test builds it first)
#
# The bare chroot is cached in /var/cache/flattend-test/deb-RELEASE (override:
# $FLATTEND_CHROOT_CACHE) and copied for each run; downloaded .debs are kept in
# deb-RELEASE.archives beside it. Runs in a mount and PID namespace (test/chroot-lib.sh): nothing
# stays mounted or running, also on failure. Debian packages come from the mirror apt uses here
# (or $FLATTEND_DEBIAN_MIRROR). Needs root, debootstrap, lintian and unshare.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
log() { echo "deb-test: $*" >&2; }
# shellcheck source=test/chroot-lib.sh
source "$here/chroot-lib.sh"
[[ $(id -u) == 0 ]] || { log "needs root (debootstrap, chroot, mounts)"; exit 1; }
[[ $# == 1 && -f $1 ]] || { log "usage: $0 flattend_VERSION_ARCH.deb"; exit 2; }
deb=$(realpath "$1")
start=$SECONDS
release=$(. /etc/os-release && echo "${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}")
m=$(mirror)
[[ -n $m ]] || { log "no Debian mirror found in /etc/apt/sources.list*; set FLATTEND_DEBIAN_MIRROR"; exit 1; }

cache=${FLATTEND_CHROOT_CACHE:-/var/cache/flattend-test}
base=$cache/deb-$release
mkdir -p "$cache" "$base.archives/partial"
exec 9>"$base.lock"
flock -x 9
if [[ ! -e $base/.flattend-ready ]]; then
	need_debootstrap
	rm -rf "$base" "$base.new"
	log "debootstrap $release (minbase) from $m into $base"
	debootstrap --variant=minbase "$release" "$base.new" "$m" >"$base.debootstrap.log" 2>&1 ||
		{ tail -20 "$base.debootstrap.log" >&2; exit 1; }
	touch "$base.new/.flattend-ready"
	mv "$base.new" "$base"
fi
flock -s 9

work=$(mktemp -d /var/tmp/flattend-deb-test.XXXXXX)
trap 'rm -rf "$work"' EXIT
cp -a "$base" "$work/root"
root=$work/root
rm "$root/.flattend-ready"
# As on a freshly installed machine: the release, its updates and (if this host uses it) its
# security archive; DNS as here.
{
	echo "deb $m $release main"
	echo "deb $m $release-updates main"
	sec=$({ cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null || true; } |
		grep -oE 'https?://[^ ]+/debian-security' | head -1 || true)
	[[ -z $sec ]] || echo "deb $sec $release-security main"
} >"$root/etc/apt/sources.list"
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
# The chroot looks booted with systemd to the maintainer scripts (deb-checks.sh makes
# /run/systemd/system), so they take their systemd branch; systemctl, first in PATH, records what
# they ask and starts nothing. Queries and unit-file operations go to the real one (offline).
cat >"$root/usr/local/sbin/systemctl" <<'SHIM'
#!/bin/sh
verb=
for a in "$@"; do case $a in -*) ;; *) verb=$a; break ;; esac; done
echo "$verb: $*" >>/run/deb-test-systemctl.log
case $verb in
start | stop | restart | try-restart | reload | reload-or-restart | try-reload-or-restart | \
	daemon-reload | daemon-reexec | reset-failed | kill | isolate) exit 0 ;;
esac
exec /usr/bin/systemctl "$@"
SHIM
chmod +x "$root/usr/local/sbin/systemctl"

# The upgrade: this package as the next version, with one more line in its conffile.
version=$(dpkg-deb -f "$deb" Version)
dpkg-deb -R "$deb" "$work/next"
sed -i "s/^Version: .*/Version: $version+upgrade1/" "$work/next/DEBIAN/control"
echo "# a line the next version added" >>"$work/next/etc/flattend/config.yaml"
dpkg-deb --root-owner-group -b "$work/next" "$root/root/next.deb" >/dev/null
cp "$deb" "$root/root/this.deb"
cp "$here/deb-checks.sh" "$root/root/deb-checks.sh"

# Debian's own checks of a package (policy, files, maintainer scripts, hardening): no error, no
# warning. (It warns that it runs as root: it reads the package only.)
command -v lintian >/dev/null || { log "lintian not found: install it (make deps does)"; exit 1; }
lint=0
if out=$(lintian --fail-on error,warning "$deb" 2>&1 | grep -v 'running with root privileges'; exit "${PIPESTATUS[0]}"); then
	log "ok: lintian reports no error or warning"
else
	lint=1
	log "FAIL: lintian:"
	sed 's/^/    /' <<<"$out" >&2
fi

log "$(basename "$deb") in a fresh $release chroot ($work/root): install, checks, upgrade to $version+upgrade1, purge"
set +e
in_ns "$root" bash -c '
	set -e
	mount --bind "$2" "$1/var/cache/apt/archives"
	chroot "$1" /usr/bin/env -i HOME=/root LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
		bash /root/deb-checks.sh /root/this.deb /root/next.deb "$3"
' deb-test "$root" "$base.archives" "$version" </dev/null
rc=$?
set -e
((rc != 0 || lint == 0)) || rc=1
log "exit $rc after $((SECONDS - start)) s"
exit $rc
