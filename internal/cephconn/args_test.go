package cephconn

import (
	"reflect"
	"strings"
	"testing"
)

// CEPH_ARGS as rbd reads it: the early settings here, the rest left to librados.
func TestParseArgs(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Args
		err  string
	}{
		{in: "--id admin", want: Args{ID: "admin"}},
		{in: "--id=admin --conf=/x/ceph.conf", want: Args{ID: "admin", Conf: "/x/ceph.conf"}},
		{in: "--user flattend -k /k -c /c", want: Args{ID: "flattend", Keyring: "/k", Conf: "/c"}},
		{in: "-n client.admin --mon_host 1.2.3.4 --debug_ms=1", want: Args{ID: "admin"}},
		{in: "--name=client.flattend", want: Args{ID: "flattend"}},
		{in: "--id client.admin", want: Args{ID: "admin"}},
		{in: "--name osd.0", err: `--name "osd.0": give a client's name`},
		{in: "--name admin", err: `--name "admin": give a client's name`},
		{in: "--keyring", err: "--keyring needs a value"},
	} {
		got, err := ParseArgs(strings.Fields(tc.in))
		switch {
		case tc.err != "":
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%q: error %v, want %q", tc.in, err, tc.err)
			}
		case err != nil:
			t.Errorf("%q: %v", tc.in, err)
		case !reflect.DeepEqual(got, tc.want):
			t.Errorf("%q: got %+v, want %+v", tc.in, got, tc.want)
		}
	}
}
