#!/bin/sh
# Prints /etc/flattend/config.yaml as the package installs it: config.example.yaml ($1) with its
# example `node` and its discovery sources (pools, libvirt) commented out, so that a fresh install
# selects no clone (flattend check and run exit 2: "discovery.pools: list at least one pool …")
# until the operator says where this node's clones are. Every other key stays as in the example.
set -eu
cat <<'HEAD'
# /etc/flattend/config.yaml, as the flattend package installs it: the commented example
# (/usr/share/doc/flattend/examples/config.example.yaml) with `node` and the discovery sources
# commented out, so that flattend selects no clone until you say which are this node's.
# Edit discovery (docs/discovery.md), run `flattend check`, then `systemctl enable --now flattend`.
# Your edits survive upgrades (this is a dpkg conffile).

HEAD
awk '
	/^[^ #]/ { discovery = ($0 ~ /^discovery:/); source = 0 }
	/^node: / { print "# " $0; next }
	discovery && /^  (# )?[a-z_]+:/ { source = ($0 ~ /^  (pools|libvirt):/) }
	source && /^  / { sub(/^  /, "  # ") }
	{ print }
' "$1"
