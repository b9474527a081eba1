#!/bin/sh
# Prints the Debian package version for a `git describe --tags --always --dirty` output ($1, or
# this checkout's): upstream versions only (a native package: no Debian revision), ordered as the
# commits are, so that a later build upgrades an earlier one.
#   v1.2.3                      1.2.3
#   v1.2.3-rc1                  1.2.3~rc1              (before 1.2.3)
#   v1.2.3-4-gabcdef0           1.2.3+4.gabcdef0       (4 commits after the tag)
#   abcdef0 (no tag yet)        0~N.gabcdef0           (N commits in HEAD's history; below any tag)
#   …-dirty                     …+dirty                (uncommitted changes)
#   dev (no git)                0~0.dev
set -eu
d=${1:-$(git describe --tags --always --dirty 2>/dev/null || echo dev)}
dirty=
case $d in *-dirty) dirty=+dirty d=${d%-dirty} ;; esac
if [ "$d" = dev ]; then
	v=0~0.dev
elif echo "$d" | grep -Eq '^[0-9a-f]{4,}$'; then
	v=0~$(git rev-list --count HEAD).g$d
else
	# The tag's own hyphens (v1.2.3-rc1) sort before the release: ~.
	v=$(echo "$d" | sed -E 's/^v//; s/-([0-9]+)-(g[0-9a-f]+)$/+\1.\2/; s/-/~/g')
fi
v=$v$dirty
# Debian's upstream version: starts with a digit; then alphanumerics and . + ~ only.
if ! echo "$v" | grep -Eq '^[0-9][A-Za-z0-9.+~]*$'; then
	echo "debian/version.sh: '$d' makes no Debian version ('$v'): tag releases like v1.2.3" >&2
	exit 1
fi
echo "$v"
