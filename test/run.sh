#!/usr/bin/env bash
# Runs a command with a throwaway local Ceph cluster: starts it, exports its env (CEPH_CONF,
# FLATTEND_TEST_*), runs "$@", and stops the cluster whatever happened. Exits with the command's code.
# FLATTEND_TEST_AUTH=cephx starts a cephx cluster, and the code under test uses client.flattend.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=$(mktemp -d /tmp/flattend-cluster.XXXXXX)
cleanup() { bash "$here/cluster.sh" stop "$dir" >/dev/null 2>&1 || true; }
trap cleanup EXIT
trap 'exit 130' INT TERM
start=$SECONDS
eval "$(bash "$here/cluster.sh" start "$dir" --memstore-gib "${FLATTEND_TEST_MEMSTORE_GIB:-8}" --auth "${FLATTEND_TEST_AUTH:-none}")"
echo "run.sh: test cluster ready in $((SECONDS - start)) s ($CEPH_CONF, auth ${FLATTEND_TEST_AUTH:-none})" >&2
set +e
"$@"
rc=$?
set -e
if ((rc != 0)); then
	echo "run.sh: '$*' failed with $rc; cluster health:" >&2
	ceph health detail >&2 || true
fi
exit $rc
