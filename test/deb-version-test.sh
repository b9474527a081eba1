#!/usr/bin/env bash
# debian/version.sh: each `git describe` form gives the Debian version the README promises, and
# the versions sort as the commits do (dpkg --compare-versions), so every later build upgrades.
set -euo pipefail
cd "$(dirname "$0")/.."
fails=0
while read -r describe want; do
	got=$(sh debian/version.sh "$describe" 2>/dev/null) || got="(error)"
	[[ $got == "$want" ]] || { echo "deb-version-test: $describe gave $got, want $want" >&2; fails=1; }
done <<'TABLE'
v1.2.3 1.2.3
1.2.3 1.2.3
v1.2.3-4-gabcdef0 1.2.3+4.gabcdef0
v1.2.3-4-gabcdef0-dirty 1.2.3+4.gabcdef0+dirty
v1.2.3-rc1 1.2.3~rc1
v1.2.3-rc1-2-gabcdef0 1.2.3~rc1+2.gabcdef0
release-1 (error)
dev 0~0.dev
TABLE
# No tag yet: the commit count of HEAD's history (this checkout's).
n=$(git rev-list --count HEAD)
[[ $(sh debian/version.sh abcdef0) == "0~$n.gabcdef0" ]] ||
	{ echo "deb-version-test: abcdef0 gave $(sh debian/version.sh abcdef0), want 0~$n.gabcdef0" >&2; fails=1; }
# Each is older than the next.
order=(0~0.dev 0~5.gaaaaaaa 0~12.gbbbbbbb 0~12.gbbbbbbb+dirty 0.1.0~rc1 0.1.0~rc1+3.geeeeeee 0.1.0 0.1.0+1.gccccccc 0.1.0+10.gddddddd 0.1.1 1.0.0)
for ((i = 1; i < ${#order[@]}; i++)); do
	dpkg --compare-versions "${order[i-1]}" lt "${order[i]}" ||
		{ echo "deb-version-test: ${order[i-1]} does not sort before ${order[i]}" >&2; fails=1; }
done
((fails == 0)) && echo "deb-version-test: ok"
exit $fails
