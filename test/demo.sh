#!/usr/bin/env bash
# make demo: a throwaway local Ceph cluster, three simulated hypervisors (h1, h2, h3) with two
# VM snapshot clones each, and three flattend processes started at once. Watch them take turns
# on the cluster-wide lock. Everything is removed at the end, also on Ctrl-C.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${FLATTEND_BIN:-$here/../bin/flattend}
dir=$(mktemp -d /tmp/flattend-demo.XXXXXX)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	bash "$here/cluster.sh" stop "$dir/cluster" >/dev/null 2>&1 || true
	rm -rf "$dir"
}
trap cleanup EXIT
trap 'echo; echo "demo: interrupted, cleaning up"; exit 130' INT TERM

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "starting a throwaway Ceph cluster (mon, mgr, one in-memory OSD) in $dir"
eval "$(bash "$here/cluster.sh" start "$dir/cluster" --memstore-gib 4)"

say "a golden image and two snapshot clones per hypervisor, tagged flattend.owner=<node>"
ceph osd pool create vms 8 >/dev/null 2>&1
rbd pool init vms
rbd create --size 128M --object-size 1M vms/golden
rbd bench --io-type write --io-size 4M --io-total 128M --io-pattern seq vms/golden >/dev/null
rbd snap create vms/golden@base >/dev/null 2>&1
rbd snap protect vms/golden@base
for n in h1 h2 h3; do
	for i in 1 2; do
		rbd clone vms/golden@base "vms/vm-$n-$i"
		rbd image-meta set "vms/vm-$n-$i" flattend.owner "$n"
	done
done
rbd ls -l vms

say "three nodes run 'flattend once' at the same moment; one flatten at a time cluster-wide"
for n in h1 h2 h3; do
	cat >"$dir/$n.yaml" <<CONF
node: $n
ceph: {conf: $CEPH_CONF, user: admin}
lock: {pool: rbd, image: flattend-lock}
backoff: {min: 200ms, max: 2s}
flatten: {concurrent_ops: 2}
discovery: {pools: [{pool: vms}]}
log: {level: debug, format: json}
CONF
done
# The JSON log of each node is kept for the timeline; the screen shows a readable digest of it.
show() {
	python3 -u -c '
import json, sys
node = sys.argv[1]
keep = {"flatten started", "flatten finished", "pass done", "lock acquired", "lock released"}
for line in sys.stdin:
    try:
        e = json.loads(line)
    except ValueError:
        continue
    msg = e.get("msg", "")
    if msg not in keep and not (msg == "flatten progress" and e.get("percent") == 50):
        continue
    extra = " ".join("%s=%s" % (k, e[k]) for k in ("image", "percent", "result", "duration", "lock", "flattened") if k in e)
    print("[%s] %s %-16s %s" % (node, e.get("ts", "")[11:23], msg, extra), flush=True)
' "$1"
}
for n in h1 h2 h3; do
	("$bin" once --config "$dir/$n.yaml" 2>&1 >/dev/null | tee "$dir/$n.log" | show "$n") &
	pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
pids=()

say "summary"
for n in h1 h2 h3; do
	for i in 1 2; do
		if rbd info "vms/vm-$n-$i" | grep -q parent:; then
			echo "vms/vm-$n-$i  still a clone"
			status=1
		else
			echo "vms/vm-$n-$i  flat (owned by $n)"
		fi
	done
done

say "timeline"
svg=$here/../bench/results/demo-timeline.svg
if ! command -v "${GO:-go}" >/dev/null 2>&1; then
	echo "no timeline: Go not found"
elif mkdir -p "$(dirname "$svg")" &&
	(cd "$here/.." && "${GO:-go}" run ./bench/cmd/timeline -title "make demo: three nodes taking turns on the lock" -o "$svg" "$dir"/h1.log "$dir"/h2.log "$dir"/h3.log >/dev/null); then
	echo "who flattened what, when: $(cd "$(dirname "$svg")" && pwd)/$(basename "$svg") (open it in a browser)"
else
	echo "no timeline: drawing it failed (see above)"
fi
[[ $status == 0 ]] && echo "demo: all six clones flattened, one at a time" || echo "demo: something was left, see above"
exit $status
