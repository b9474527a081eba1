#!/usr/bin/env bash
# systemd-analyze verify on deploy/systemd/flattend.service, with ExecStart pointing at the
# freshly built binary (the installed path does not exist on a build machine). Fails where
# systemd-analyze is missing: `make deps` installs it (package systemd), and a check that skips
# silently proves nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
if ! command -v systemd-analyze >/dev/null; then
	echo "verify-unit: systemd-analyze not found: install the systemd package (make deps does)" >&2
	exit 1
fi
bin=${FLATTEND_BIN:-$here/bin/flattend}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
sed "s#/usr/bin/flattend#$bin#" "$here/deploy/systemd/flattend.service" >"$dir/flattend.service"
# --man=no: the unit names man:flattend(8), which the package installs (test/deb-test.sh checks it).
out=$(systemd-analyze verify --man=no "$dir/flattend.service" 2>&1 || true)
if [[ -n $out ]]; then
	echo "verify-unit: systemd-analyze verify deploy/systemd/flattend.service:" >&2
	echo "$out" >&2
	exit 1
fi
# What flattend's exit codes and stop bound need from the unit: no restart loop on a config
# error (exit 2), and room for the 30 s stop grace (cmd/flattend/stop.go).
unit=$here/deploy/systemd/flattend.service
if ! grep -Eq '^RestartPreventExitStatus=(.* )?2( |$)' "$unit"; then
	echo "verify-unit: $unit: RestartPreventExitStatus must list 2 (config errors must not restart in a loop)" >&2
	exit 1
fi
# Log priorities reach the journal through the <N> prefix of each line on stderr (internal/journald):
# stderr must stay the journal stream, with SyslogLevelPrefix= at its default (yes).
if grep -Eq '^(SyslogLevelPrefix=(no|false|off|0)|StandardError=(null|tty|file:|append:|truncate:|socket))' "$unit"; then
	echo "verify-unit: $unit: stderr must go to the journal with SyslogLevelPrefix=yes (log priorities)" >&2
	exit 1
fi
stop=$(sed -n 's/^TimeoutStopSec=//p' "$unit")
secs=$(systemd-analyze timespan "${stop:-90s}" | sed -n 's/^ *μs: *//p')
if [[ -z $secs ]] || ((secs < 35000000)); then
	echo "verify-unit: $unit: TimeoutStopSec=${stop:-90s (default)} must leave room for the 30 s stop grace (35 s or more)" >&2
	exit 1
fi
echo "verify-unit: deploy/systemd/flattend.service ok"
