#!/usr/bin/env bash
# The recipe of the known issue in docs/operations.md ("Known issues"): a flatten resumed by a
# new `flattend once` process after the previous one was killed with -9 mid-flatten ended with
# one 64 KiB object written as zeros. On the development cluster this recipe reproduced it on
# every run (pool "vms" there; the same object index each time for a given setup: 322 or 530),
# while the resume done by `rbd flatten`, or by the same scheduler code run inside a Go test
# binary, never did. In a fresh pool, as this script sets up, it has NOT reproduced so far: the
# trigger is not identified. Kept as the starting point for the investigation.
#
#   bash test/run.sh bash test/known-issues/resume-after-kill.sh     # own throwaway cluster
#
# Needs CEPH_CONF (test/run.sh sets it) and bin/flattend (make build). Exits 1 when it reproduces.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
bin=${FLATTEND_BIN:-$here/bin/flattend}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
ceph osd pool create ki 8 >/dev/null 2>&1 || true
rbd pool init ki
rbd rm ki/clone >/dev/null 2>&1 || true
head -c 64M /dev/urandom >"$work/parent.raw"
rbd import --object-size 64K "$work/parent.raw" ki/parent >/dev/null 2>&1
rbd snap create ki/parent@s >/dev/null 2>&1
rbd snap protect ki/parent@s
# The pool it was seen in held many other clones of the same parent (other nodes', some flat).
for i in $(seq 1 ${EXTRA_CLONES:-30}); do
	rbd clone ki/parent@s "ki/other-$i"
	rbd image-meta set "ki/other-$i" flattend.owner "other-$((i % 5))"
	if ((i % 6 == 0)); then rbd flatten --no-progress "ki/other-$i"; fi
done
rbd clone ki/parent@s ki/clone
rbd image-meta set ki/clone flattend.owner ki
cat >"$work/c.yaml" <<CONF
node: ki
ceph: {conf: $CEPH_CONF, user: admin}
lock: {pool: rbd, image: ki-lock}
flatten: {concurrent_ops: 1}
discovery: {pools: [{pool: ki}]}
log: {level: info, format: json}
CONF
"$bin" once --config "$work/c.yaml" >"$work/first.log" 2>&1 &
sleep 1.5
kill -9 $! || true
wait 2>/dev/null || true
echo "first run killed after: $(grep -c 'flatten progress' "$work/first.log") progress lines"
"$bin" once --config "$work/c.yaml" >"$work/second.log" 2>&1
rbd export ki/clone "$work/clone.raw" >/dev/null 2>&1
bad=$(cmp -l "$work/parent.raw" "$work/clone.raw" | awk '{print int(($1-1)/65536)}' | uniq | head -5 | tr '\n' ' ')
if [[ -n $bad ]]; then
	echo "REPRODUCED: objects reading differently from the parent: $bad"
	exit 1
fi
echo "not reproduced: the resumed clone equals its parent"
