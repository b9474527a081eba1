# Helpers for test/release.sh and test/fresh-machine.sh (sourced).

# mirror: the Debian archive apt already uses here, or $FLATTEND_DEBIAN_MIRROR.
mirror() {
	[[ -n ${FLATTEND_DEBIAN_MIRROR:-} ]] && { echo "$FLATTEND_DEBIAN_MIRROR"; return; }
	# The first Debian archive apt already uses (deb822 URIs: or one-line deb entries).
	{ cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null || true; } |
		grep -oE '(https?://[^ ]+/debian)/?( |$)' | grep -v security | head -1 | tr -d ' ' | sed 's#/$##' || true
}

# in_ns DIR CMD...: runs CMD (a host command that may chroot DIR) in a private mount and PID
# namespace with DIR's /proc, /dev, /sys, /tmp and /run mounted. When CMD ends, or unshare is
# killed, every process of the namespace is killed and its mounts vanish with it.
# in_ns_exec: the same, replacing this shell (so killing the script kills the namespace).
in_ns() { unshare --mount --pid --fork --kill-child --propagation private -- bash -c "$ns_setup" in_ns "$@"; }
in_ns_exec() { exec unshare --mount --pid --fork --kill-child --propagation private -- bash -c "$ns_setup" in_ns "$@"; }
# shellcheck disable=SC2016 # expanded by the inner bash
ns_setup='
	set -e
	d=$1; shift
	mount --bind "$d" "$d" # the chroot'"'"'s / a mount point of its own (ip netns remounts it)
	mount -t proc proc "$d/proc"
	mount --rbind /dev "$d/dev"
	mount --rbind /sys "$d/sys"
	mount -t tmpfs -o mode=1777 tmp "$d/tmp"
	mount -t tmpfs -o mode=755 run "$d/run"
	mkdir -p "$d/run/lock"
	# Not exec: this shell stays the namespace'"'"'s PID 1 and reaps the daemons the tests orphan, and
	# CMD is no init (an init ignores SIGINT/SIGTERM it has no handler for, so Ctrl-C would not stop it).
	set +e
	"$@"
	exit $?
'

need_debootstrap() {
	command -v debootstrap >/dev/null && return 0
	echo "installing debootstrap" >&2
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >&2
}
