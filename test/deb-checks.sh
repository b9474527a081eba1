#!/usr/bin/env bash
# Runs inside test/deb-test.sh's fresh chroot, as root: installs THIS.deb with apt, checks it,
# upgrades to NEXT.deb, purges. Prints ok/FAIL per check; exits 1 if any failed.
#   deb-checks.sh THIS.deb NEXT.deb VERSION (THIS.deb's)
set -uo pipefail
this=$1 next=$2 version=$3
fails=0
ok() { echo "deb-test: ok: $*"; }
bad() { echo "deb-test: FAIL: $*"; fails=$((fails + 1)); }
# check WHAT CMD...: CMD's output is shown only when it fails.
check() {
	local what=$1 out
	shift
	if out=$("$@" 2>&1); then ok "$what"; else bad "$what"; [[ -z $out ]] || sed 's/^/    /' <<<"$out"; fi
}
# DPkg::Path: apt's PATH for the maintainer scripts, with deb-test.sh's systemctl first.
apt() { DEBIAN_FRONTEND=noninteractive apt-get -q -y -o Dpkg::Use-Pty=0 -o DPkg::Path=/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin "$@"; }
# must_apt WHAT ARGS...: a failed apt run stops the test (nothing after it would mean anything).
must_apt() {
	local what=$1 out
	shift
	if out=$(apt "$@" 2>&1); then ok "$what"; else
		bad "$what"
		tail -25 <<<"$out" | sed 's/^/    /'
		exit 1
	fi
}
# A doc file, compressed or not (dh_compress decides by size).
doc() { [[ -s $1 || -s $1.gz ]] || { echo "neither $1 nor $1.gz"; return 1; }; }

# What the maintainer scripts asked of systemd (deb-test.sh's systemctl records it) since the
# last `asked`; `asked VERB` lists the requests VERB for flattend.service.
mkdir -p /run/systemd/system
log=/run/deb-test-systemctl.log
asked() {
	if (($#)); then grep -E "^$1: .*flattend\.service" $log; else cat $log; fi
}

must_apt "apt-get update" update
: >$log
must_apt "apt install ./$(basename "$this") ($version) into the fresh chroot" install "$this"
cp $log /tmp/install.log

# What the package installed, for the purge check.
mapfile -t installed < <(dpkg -L flattend)
unit=$(dpkg -L flattend | grep '/systemd/system/flattend\.service$' || true)

check "/usr/bin/flattend is an executable" test -x /usr/bin/flattend
check "the unit ($unit) is in a directory systemd loads system units from" \
	bash -c '[[ -n $1 && -s $1 ]] && systemd-analyze unit-paths | grep -qx "$(dirname "$1")"' unit "$unit"
check "/etc/flattend/config.yaml is a conffile" bash -c \
	'test -s /etc/flattend/config.yaml && dpkg-query -W -f="\${Conffiles}\n" flattend | grep -q "^ /etc/flattend/config.yaml "'
check "/usr/lib/sysusers.d/flattend.conf declares the user" grep -q '^u flattend ' /usr/lib/sysusers.d/flattend.conf
check "flattend(8) is /usr/share/man/man8/flattend.8.gz" bash -c 'zcat /usr/share/man/man8/flattend.8.gz | grep -q "^\.TH FLATTEND 8 "'
check "docs in /usr/share/doc/flattend (README, docs/, the example config, copyright)" bash -c "
	$(declare -f doc)
	for f in README.md docs/configuration.md docs/discovery.md docs/operations.md examples/config.example.yaml copyright; do
		doc /usr/share/doc/flattend/\$f || exit 1
	done"

check "the flattend system user and group exist (uid < 1000, no login shell)" bash -c '
	IFS=: read -r _ _ uid gid _ home shell < <(getent passwd flattend) || { echo "no user flattend"; exit 1; }
	getent group flattend >/dev/null || { echo "no group flattend"; exit 1; }
	echo "uid $uid gid $gid home $home shell $shell"
	((uid < 1000)) && [[ $shell == */nologin ]]'
librbd=$(dpkg-query -W -f='${Version}' librbd1 2>/dev/null | sed 's/+.*//')
check "flattend version runs as the flattend user, with the librbd1 apt installed ($librbd)" bash -c '
	out=$(runuser -u flattend -- flattend version) || exit 1
	echo "$out"
	grep -q "^flattend [^ ]* (commit [^ ]*, go" <<<"$out" && grep -q "^librbd: Ceph ${1:-?} " <<<"$out"' _ "$librbd"

check "the unit is not enabled" bash -c '[[ $(systemctl is-enabled flattend.service 2>&1) == disabled ]] || { systemctl is-enabled flattend.service; exit 1; }'
check "the install took its systemd branch (daemon-reload) but started nothing of flattend" bash -c '
	grep "flattend\|daemon-reload" /tmp/install.log
	grep -q "^daemon-reload:" /tmp/install.log && ! grep -E "^(start|restart|try-restart|reload-or-restart): .*flattend" /tmp/install.log'
# man-db lets systemd-analyze resolve the unit's Documentation=man:flattend(8) too.
must_apt "apt install man-db (for man:flattend(8))" install --no-install-recommends man-db
check "man 8 flattend finds the page" man -w 8 flattend
check "systemd-analyze verify accepts $unit" bash -c 'out=$(systemd-analyze verify "$1" 2>&1); rc=$?; echo "$out"; [[ $rc == 0 && -z $out ]]' _ "$unit"

check "flattend check on the shipped config exits 2 and names the file, line and what to configure" bash -c '
	out=$(runuser -u flattend -- flattend check 2>&1); rc=$?
	echo "exit $rc: $out"
	[[ $rc == 2 ]] && grep -Eq "^/etc/flattend/config.yaml:[0-9]+: discovery.pools: .*discovery.libvirt" <<<"$out"'

# The upgrade, as an operator runs it on a fleet: non-interactive, keeping edited conffiles.
sed -i 's/^# node: h1$/node: edited-by-deb-test/' /etc/flattend/config.yaml
check "the config is edited (node: edited-by-deb-test)" grep -qx 'node: edited-by-deb-test' /etc/flattend/config.yaml
# The operator enables the unit, then upgrades.
check "systemctl enable flattend (the operator, after editing the config)" systemctl enable flattend.service
: >$log
must_apt "apt install ./$(basename "$next") (upgrade to $version+upgrade1, --force-confold)" \
	-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold install "$next"
check "the upgrade restarted the enabled flattend once its files were in place (and did not stop it first)" bash -c "
	$(declare -f asked); log=$log
	asked | grep flattend; asked restart >/dev/null && ! asked stop >/dev/null"
check "the upgrade installed $version+upgrade1" bash -c '[[ $(dpkg-query -W -f="\${Version}" flattend) == "$1" ]]' _ "$version+upgrade1"
check "the upgrade kept the edited config" grep -qx 'node: edited-by-deb-test' /etc/flattend/config.yaml
check "the upgrade set the new config aside (config.yaml.dpkg-dist)" grep -qx '# a line the next version added' /etc/flattend/config.yaml.dpkg-dist
check "after the upgrade: the user exists, the unit is still enabled, flattend runs" bash -c '
	getent passwd flattend >/dev/null && [[ $(systemctl is-enabled flattend.service 2>&1) == enabled ]] && flattend version >/dev/null'

: >$log
must_apt "apt purge flattend" purge flattend
check "removing the package stopped flattend" bash -c "$(declare -f asked); log=$log; asked | grep flattend; asked stop >/dev/null"
check "flattend is purged (dpkg knows it no more)" bash -c '! dpkg-query -W -f="\${Status}\n" flattend 2>/dev/null | grep -q installed'
# Every path the package installed is gone, unless another package owns it too (/usr/bin, …).
check "purge removed every file and directory the package installed" bash -c '
	left=0
	for p in "$@"; do
		[[ $p != /. && -e $p ]] && ! dpkg -S "$p" >/dev/null 2>&1 && { echo "left: $p"; left=1; }
	done
	exit $left' _ "${installed[@]}"
check "purge removed /etc/flattend (config, config.yaml.dpkg-dist)" bash -c '! ls -d /etc/flattend 2>/dev/null'
check "purge removed the systemd state of the unit" bash -c '! grep -rls flattend /var/lib/systemd/deb-systemd-helper-enabled /etc/systemd/system 2>/dev/null'
# What the maintainer scripts might leave where dpkg does not look (state, logs, runtime dirs).
# Not in /var/cache: man-db keeps the cat page that systemd-analyze verify made there.
check "no path named *flattend* is left anywhere" bash -c '! find / -xdev \( -path /proc -o -path /sys -o -path /dev -o -path /root \
	-o -path /var/lib/dpkg -o -path /var/cache -o -path /var/log/apt \) -prune -o -name "*flattend*" -print | grep .'
check "the flattend user stays after purge (files may still be its; see README)" getent passwd flattend

# Again, with the dependencies in place: whatever install, the maintainer scripts and purge
# leave behind, by any name, shows as a new path (beside dpkg's and apt's own state, caches, logs
# and the backups of /etc/passwd and friends that user tools write).
snapshot() {
	find / -xdev \( -path /proc -o -path /sys -o -path /dev -o -path /run -o -path /tmp -o -path /root \
		-o -path /var/cache -o -path /var/log -o -path /var/lib/dpkg -o -path /var/lib/apt \) -prune -o -print |
		grep -Ev '^/etc/(passwd|group|shadow|gshadow|subuid|subgid)-$' | sort
}
snapshot >/tmp/before
must_apt "apt install ./$(basename "$this") again" install "$this"
check "the reinstall found the user and config in place" bash -c 'getent passwd flattend >/dev/null && test -s /etc/flattend/config.yaml'
must_apt "apt purge flattend again" purge flattend
snapshot >/tmp/after
check "install then purge leaves no new file or directory" bash -c '! comm -13 /tmp/before /tmp/after | grep .'

if ((fails)); then
	echo "deb-test: $fails check(s) FAILED"
	exit 1
fi
echo "deb-test: all checks passed"
