#!/usr/bin/env bash
# Starts and stops a throwaway single-node Ceph cluster (mon + mgr + one memstore OSD) on loopback.
#
#   test/cluster.sh start DIR [--auth none|cephx] [--memstore-gib N] [--watch-timeout S] [--addr IP]
#       prints `export NAME=value` lines for CEPH_CONF, CEPH_KEYRING (cephx) and FLATTEND_TEST_*;
#       with cephx also a least-privilege client.flattend key (FLATTEND_TEST_CEPH_USER/_KEYRING)
#   test/cluster.sh stop DIR
#   test/cluster.sh deps       install Debian's packages when missing
#   test/cluster.sh pkgs       print their names (test/release.sh installs them in its chroots)
#
# The cluster lives entirely under DIR (config, data, logs, pid files, sockets) and listens on a
# free loopback port chosen at start, so several can run side by side without disturbing each other
# or a real cluster. Only the PIDs recorded under DIR are ever killed.
set -euo pipefail

PKGS=(gcc libc6-dev ceph-mon ceph-osd ceph-mgr ceph-common librbd-dev librados-dev uuid-runtime python3 iproute2 libvirt-daemon libvirt-daemon-driver-qemu libvirt-daemon-driver-storage-rbd libvirt-clients qemu-system-x86 systemd prometheus)
PKGS+=(build-essential debhelper debootstrap lintian) # make deb (dpkg-buildpackage wants build-essential), make deb-test

log() { echo "cluster.sh: $*" >&2; }

deps() {
	local missing=()
	for p in "${PKGS[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
	done
	if ((${#missing[@]})); then
		log "installing ${missing[*]}"
		[[ $(id -u) == 0 ]] || { log "need root to install packages"; exit 1; }
		export DEBIAN_FRONTEND=noninteractive
		apt-get update -qq >&2
		no_service_starts apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
		# Installed here for promtool only: its postinst enabled the server for the next boot
		# (systemd unit and SysV links; systemctl disables both, without systemd running too).
		if [[ " ${missing[*]} " == *" prometheus "* ]]; then
			systemctl disable --quiet prometheus.service >&2 || true
		fi
	fi
}

# no_service_starts runs an install with a policy-rc.d that forbids starting services: we want
# prometheus only for its promtool (deploy/deploy_test.go), and its postinst would start the server (through
# its init script where systemd is not PID 1, or its unit where it is).
no_service_starts() {
	local policy=/usr/sbin/policy-rc.d had=
	[[ -e $policy ]] && had=1
	if [[ -z $had ]]; then
		printf '#!/bin/sh\nexit 101\n' >"$policy"
		chmod +x "$policy"
	fi
	local rc=0
	"$@" || rc=$?
	[[ -n $had ]] || rm -f "$policy"
	return $rc
}

free_port() {
	python3 - <<'PY'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
PY
}

wait_for() { # wait_for SECONDS DESCRIPTION CMD...
	local deadline=$((SECONDS + $1)) what=$2
	shift 2
	until "$@" >/dev/null 2>&1; do
		if ((SECONDS >= deadline)); then
			log "timed out waiting for $what"
			return 1
		fi
		sleep 0.5
	done
}

start() {
	local dir=$1
	shift
	local auth=none gib=6 watch=10 addr=127.0.0.1
	while (($#)); do
		case $1 in
		--auth) auth=$2; shift 2 ;;
		--memstore-gib) gib=$2; shift 2 ;;
		--watch-timeout) watch=$2; shift 2 ;;
		--addr) addr=$2; shift 2 ;; # e.g. inside a network namespace: ip netns exec NS cluster.sh …
		*) log "unknown option $1"; exit 2 ;;
		esac
	done
	case $auth in none | cephx) ;; *) log "--auth must be none or cephx"; exit 2 ;; esac
	deps
	if [[ -e $dir/ceph.conf ]]; then
		log "$dir already holds a cluster; stop it first"
		exit 1
	fi
	mkdir -p "$dir"
	dir=$(cd "$dir" && pwd)
	local port fsid
	port=$(free_port)
	fsid=$(uuidgen)
	mkdir -p "$dir"/{mon,osd,mgr,run,log}
	# Reef and later default to a relative class dir: an OSD started outside / cannot load cls_rbd.
	local classdir
	classdir=$(dirname "$(ls /usr/lib/*/rados-classes/libcls_rbd.so /usr/lib/rados-classes/libcls_rbd.so 2>/dev/null | head -1)")
	local authline="auth_cluster_required = none
auth_service_required = none
auth_client_required = none"
	if [[ $auth == cephx ]]; then
		authline="auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
keyring = $dir/keyring"
	fi
	cat >"$dir/ceph.conf" <<CONF
[global]
fsid = $fsid
mon host = $addr:$port
$authline
osd pool default size = 1
osd pool default min size = 1
osd crush chooseleaf type = 0
mon allow pool delete = true
mon data avail crit = 0
mon data avail warn = 0
mon warn on pool no redundancy = false
mon_osd_full_ratio = 0.95
osd_client_watch_timeout = $watch
run dir = $dir/run
log file = $dir/log/\$name.log
pid file = $dir/run/\$name.pid
admin socket = $dir/run/\$name.\$pid.asok
[mon]
mon data = $dir/mon/ceph-\$id
admin socket = $dir/run/\$name.asok
[osd]
public addr = $addr
osd data = $dir/osd/ceph-\$id
keyring = $dir/osd/ceph-\$id/keyring
osd objectstore = memstore
memstore device bytes = $((gib * 1024 * 1024 * 1024))
osd class dir = $classdir
osd class load list = *
osd class default list = *
admin socket = $dir/run/\$name.asok
[mgr]
public addr = $addr
mgr data = $dir/mgr/ceph-\$id
keyring = $dir/mgr/ceph-\$id/keyring
admin socket = $dir/run/\$name.asok
CONF
	export CEPH_CONF=$dir/ceph.conf
	local monkeyring=/dev/null
	if [[ $auth == cephx ]]; then
		ceph-authtool --create-keyring "$dir/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
		ceph-authtool "$dir/keyring" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' \
			--cap mgr 'allow *' --cap mds 'allow *' >/dev/null
		monkeyring=$dir/keyring
	fi
	ceph-mon --id a --mkfs --keyring "$monkeyring" >"$dir/log/mkfs.log" 2>&1
	touch "$dir/mon/ceph-a/keyring"
	ceph-mon --id a 2>>"$dir/log/daemons.err"
	wait_for 30 "the monitor" timeout 5 ceph -s

	local uuid
	uuid=$(uuidgen)
	ceph osd create "$uuid" 0 >/dev/null
	ceph osd crush add osd.0 1 root=default >/dev/null 2>&1
	mkdir -p "$dir/osd/ceph-0"
	if [[ $auth == cephx ]]; then
		ceph-osd --id 0 --mkfs --mkkey --no-mon-config --osd-uuid "$uuid" >>"$dir/log/mkfs.log" 2>&1
		ceph auth add osd.0 osd 'allow *' mon 'allow profile osd' mgr 'allow profile osd' \
			-i "$dir/osd/ceph-0/keyring" >/dev/null
	else
		ceph-osd --id 0 --mkfs --osd-uuid "$uuid" >>"$dir/log/mkfs.log" 2>&1
	fi
	ceph-osd --id 0 2>>"$dir/log/daemons.err"

	mkdir -p "$dir/mgr/ceph-x"
	if [[ $auth == cephx ]]; then
		ceph auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
			>"$dir/mgr/ceph-x/keyring"
	fi
	ceph-mgr --id x 2>>"$dir/log/daemons.err"

	wait_for 60 "the OSD to come up" sh -c "ceph osd dump -f json | grep -q '\"up\":1'"
	ceph osd pool create rbd 16 >/dev/null 2>&1
	rbd pool init rbd
	ceph config set mon auth_allow_insecure_global_id_reclaim false >/dev/null 2>&1 || true
	ceph config set global osd_client_watch_timeout "$watch" >/dev/null 2>&1 || true
	# Debian's Reef and later mgr cannot load its Python modules without their recommended packages
	# (trixie: "PyO3 modules do not yet support subinterpreters"), a HEALTH_WARN for ever. The core
	# (PG stats, mon commands) works: wait for it, mute that one check, then wait for HEALTH_OK so
	# that any other warning still fails the start.
	wait_for 90 "an active mgr and all PGs active" sh -c \
		"ceph -s -f json | python3 -c 'import json,sys; s=json.load(sys.stdin); p=s[\"pgmap\"]; assert s[\"mgrmap\"][\"available\"] and p[\"num_pgs\"] > 0 and sum(x[\"count\"] for x in p[\"pgs_by_state\"] if x[\"state_name\"].startswith(\"active\")) == p[\"num_pgs\"]'"
	if ceph health detail 2>/dev/null | grep -q MGR_MODULE_DEPENDENCY; then
		log "muting MGR_MODULE_DEPENDENCY: $(ceph health detail | grep -m1 'has failed dependency' | sed 's/^ *//')"
		ceph health mute MGR_MODULE_DEPENDENCY --sticky >/dev/null
	fi
	wait_for 90 "HEALTH_OK" sh -c "ceph health | grep -q HEALTH_OK" || { ceph health detail >&2; exit 1; }
	if [[ $auth == cephx ]]; then
		# flattend's least-privilege key, as docs/operations.md documents it (all pools here: the
		# tests create pools of their own; in production name them: profile rbd pool=vms, ...).
		ceph auth get-or-create client.flattend mon 'profile rbd' osd 'profile rbd' \
			>"$dir/flattend.keyring"
	fi

	{
		echo "export CEPH_CONF=$dir/ceph.conf"
		if [[ $auth == cephx ]]; then
			echo "export CEPH_KEYRING=$dir/keyring"
			echo "export FLATTEND_TEST_CEPH_USER=flattend"
			echo "export FLATTEND_TEST_CEPH_KEYRING=$dir/flattend.keyring"
		fi
		echo "export FLATTEND_TEST_CEPH_CONF=$dir/ceph.conf"
		echo "export FLATTEND_TEST_CEPH_AUTH=$auth"
		echo "export FLATTEND_TEST_WATCH_TIMEOUT=$watch"
	} | tee "$dir/env"
	log "cluster up on $addr:$port ($auth) in $dir"
}

stop() {
	local dir=$1
	[[ -d $dir/run ]] || { log "no cluster in $dir"; return 0; }
	local pidfile pid killed=()
	for pidfile in "$dir"/run/*.pid; do
		[[ -e $pidfile ]] || continue
		pid=$(cat "$pidfile")
		# Kill only a process that is still one of ours: its pid file's daemon.
		if [[ -n $pid ]] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q '^ceph-'; then
			kill -9 "$pid" 2>/dev/null || true
			killed+=("$pid")
		fi
	done
	# A killed memstore OSD takes seconds to give its memory back: wait until it is gone (or a
	# zombie), so that whoever runs next finds the machine as it was.
	local i
	for ((i = 0; i < 300; i++)); do
		local alive=0
		for pid in "${killed[@]}"; do
			[[ -e /proc/$pid ]] && [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]] && alive=1
		done
		((alive)) || break
		sleep 0.1
	done
	rm -rf "$dir"
	log "cluster in $dir stopped"
}

case ${1:-} in
start) shift; [[ $# -ge 1 ]] || { log "usage: $0 start DIR [options]"; exit 2; }; start "$@" ;;
stop) shift; [[ $# -ge 1 ]] || { log "usage: $0 stop DIR"; exit 2; }; stop "$1" ;;
deps) deps ;;
pkgs) echo "${PKGS[*]}" ;;
*) log "usage: $0 start DIR [--auth none|cephx] [--memstore-gib N] [--watch-timeout S] [--addr IP] | stop DIR | deps | pkgs"; exit 2 ;;
esac
