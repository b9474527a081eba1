package cephconn

import (
	"fmt"
	"strings"
)

// Args are Ceph command line arguments (CEPH_ARGS) split as Ceph's own tools split them: the
// settings needed before a cluster handle exists (ceph_argparse_early_args: which ceph.conf, which
// cephx user) and the keyring are read here; Rest is left to librados (rados_conf_parse_argv),
// which applies every other option (--mon_host, --keyfile, --debug_ms …) over ceph.conf.
type Args struct {
	Conf    string   // --conf, -c
	ID      string   // --id, --user, or --name/-n without "client."
	Keyring string   // --keyring, -k
	Rest    []string // the others, for Options.Args
}

// ParseArgs reads args ("--id admin", "--id=admin", "-n client.admin" …). A name that is not a
// client's (osd.0) is an error: flattend connects as a client.
func ParseArgs(args []string) (Args, error) {
	var a Args
	for i := 0; i < len(args); i++ {
		key, val, inline := strings.Cut(args[i], "=")
		var dst *string
		isName := false
		switch key {
		case "--conf", "-c":
			dst = &a.Conf
		case "--id", "--user":
			dst = &a.ID
		case "--name", "-n":
			dst, isName = &a.ID, true
		case "--keyring", "-k":
			dst = &a.Keyring
		default:
			a.Rest = append(a.Rest, args[i])
			continue
		}
		if !inline {
			if i+1 == len(args) {
				return Args{}, fmt.Errorf("%s needs a value", key)
			}
			i++
			val = args[i]
		}
		if isName {
			id, err := NameToID(val)
			if err != nil {
				return Args{}, err
			}
			val = id
		}
		if dst == &a.ID {
			val = strings.TrimPrefix(val, "client.") // --id client.admin: taken for what it means
		}
		*dst = val
	}
	return a, nil
}

// NameToID is the cephx id of a client's name: client.admin → admin.
func NameToID(name string) (string, error) {
	id, ok := strings.CutPrefix(name, "client.")
	if !ok || id == "" {
		return "", fmt.Errorf("--name %q: give a client's name, client.ID (e.g. client.admin)", name)
	}
	return id, nil
}
