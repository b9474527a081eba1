package cephconn

import (
	"fmt"
	"strings"
)

// Args are what Ceph's tools read from CEPH_ARGS before they create their cluster handle
// (ceph_argparse_early_args: which ceph.conf, which cephx user), and the keyring, whose place
// among the settings flattend decides. librados reads CEPH_ARGS itself when the handle is created
// (md_config_t::parse_env) and applies every other option in it (--mon_host, --debug_ms …) over
// ceph.conf; it cannot apply these.
type Args struct {
	Conf    string // --conf, -c
	ID      string // --id, --user, or --name/-n without "client."
	Keyring string // --keyring, -k
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
			continue // librados' own
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
