#!/usr/bin/env bash
# Runs `make test` RUNS times in a row (default 3) beside a CPU hog: one busy loop per core, so
# that every test runs on a machine with no idle CPU at all. It stops at the first failure. This
# is how the suite is checked for tests that pass only when the machine is fast enough (see
# docs/testing.md, "No timing luck"). The hog is stopped whatever happens.
#
#   test/under-load.sh [RUNS [MAKE ARGS...]]   e.g. test/under-load.sh 3 CEPH=reef
#
# Logs: under-load-N.log in $FLATTEND_UNDER_LOAD_LOGS (default: a new directory in /tmp).
#
# A test binary that crashes leaves a core in /var/tmp (core_pattern is set for the run and put
# back after), with GOTRACEBACK=crash so that Go adds its goroutines.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
runs=${1:-3}
shift || true
logs=${FLATTEND_UNDER_LOAD_LOGS:-$(mktemp -d /tmp/flattend-under-load.XXXXXX)}
mkdir -p "$logs"
hogs=()
old_pattern=$(cat /proc/sys/kernel/core_pattern)
stop() {
	((${#hogs[@]})) && kill "${hogs[@]}" 2>/dev/null
	[[ -w /proc/sys/kernel/core_pattern ]] && echo "$old_pattern" >/proc/sys/kernel/core_pattern
	return 0
}
trap stop EXIT
trap 'exit 130' INT TERM
for ((i = 0; i < $(nproc); i++)); do
	(while :; do :; done) &
	hogs+=($!)
done
ulimit -c unlimited
[[ -w /proc/sys/kernel/core_pattern ]] && echo /var/tmp/core.%e.%p >/proc/sys/kernel/core_pattern
export GOTRACEBACK=crash
cd "$here/.."
for ((run = 1; run <= runs; run++)); do
	start=$SECONDS
	echo "under-load.sh: run $run of $runs beside ${#hogs[@]} busy loops, log $logs/under-load-$run.log" >&2
	if ! make --no-print-directory test "$@" >"$logs/under-load-$run.log" 2>&1; then
		echo "under-load.sh: run $run FAILED after $((SECONDS - start)) s:" >&2
		grep -E -- '^(--- FAIL|FAIL|panic:|terminate called)' "$logs/under-load-$run.log" >&2 || tail -30 "$logs/under-load-$run.log" >&2
		exit 1
	fi
	echo "under-load.sh: run $run passed in $((SECONDS - start)) s" >&2
done
echo "under-load.sh: all $runs runs passed" >&2
