#!/bin/sh
# Prints flattend(8) in roff, made from what the binary ($1) says: `flattend --help` and each
# command's `--help`, so the page cannot drift from the command line. $2: the version, $3: the date.
set -eu
bin=$1 version=$2 date=$3
# Text as roff: backslashes escaped, lines starting with . or ' protected, - as a minus sign.
roff() { sed -e 's/\\/\\e/g' -e "s/^\([.']\)/\\\\\&\1/" -e 's/-/\\-/g'; }
cat <<EOF2
.TH FLATTEND 8 "$date" "flattend $version" "System Administration"
.SH NAME
flattend \- flatten this node's RBD clones, one at a time cluster\-wide, in a nightly window
.SH SYNOPSIS
.nf
EOF2
# The usage lines without their descriptions (from two spaces before a word, no option after it).
"$bin" --help | sed -n 's/^  \(flattend [a-z].*\)/\1/p' | sed -E 's/ {2,}[a-z][^[]*$//; s/ +/ /g' | roff
cat <<'EOF2'
.fi
.SH DESCRIPTION
.B flattend run
is the daemon (started by
.BR flattend.service ):
inside each window it finds this node's RBD clones, takes a slot of the cluster\-wide lock (an
RBD managed exclusive lock) and flattens one clone at a time, pausing while Ceph is unhealthy,
recovering or short of space. The other commands check the configuration and the connection,
show who holds the lock and what this node would flatten, run one pass, or break a stuck lock.
.PP
The full usage text:
.PP
.nf
EOF2
"$bin" --help | roff
echo .fi
echo .SH COMMANDS
for cmd in $("$bin" --help | sed -n 's/^  flattend \([a-z]*\).*/\1/p' | sort -u); do
	# version has no options: `version --help` prints the version.
	[ "$cmd" = version ] && continue
	help=$("$bin" "$cmd" --help 2>&1) || true
	echo ".SS flattend $cmd"
	echo .nf
	# Go's flag package heads its text "Usage of flattend CMD:", which .SS already says.
	printf '%s\n' "$help" | sed '1{/^Usage of /d}' | roff
	echo .fi
done
cat <<'EOF2'
.SH FILES
.TP
.I /etc/flattend/config.yaml
the configuration (every key is described in
.IR /usr/share/doc/flattend/examples/config.example.yaml );
.B systemctl reload flattend
applies a change without dropping a held lock.
.TP
.I /lib/systemd/system/flattend.service
the unit; not enabled on install:
.B systemctl enable \-\-now flattend
once
.B flattend check
passes.
.TP
.I /etc/ceph/ceph.client.flattend.keyring
the cephx key of client.flattend, readable by the flattend user.
.SH SEE ALSO
.BR rbd (8),
.BR ceph (8),
.BR systemctl (1),
.BR journalctl (1),
.IR /usr/share/doc/flattend/README.md.gz ,
.I /usr/share/doc/flattend/docs/
(configuration, discovery, operations).
EOF2
