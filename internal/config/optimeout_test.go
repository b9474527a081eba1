package config

import (
	"testing"
	"time"
)

// ceph.op_timeout bounds every Ceph call (paused OSDs must not wedge a node): set by default,
// and kept within bounds that leave the watchdog and a stop room.
func TestOpTimeout(t *testing.T) {
	cfg, err := Parse("c.yaml", []byte(pools))
	if err != nil {
		t.Fatal(err)
	}
	if got := cfg.Ceph.OpTimeout.D(); got != 30*time.Second {
		t.Errorf("default ceph.op_timeout = %s, want 30s", got)
	}
	for _, tc := range []struct{ yaml, want string }{
		{"ceph:\n  op_timeout: 1s\n", `c.yaml:3: ceph.op_timeout: 1s is out of range 5s..2m`},
		{"ceph:\n  op_timeout: 3m\n", `c.yaml:3: ceph.op_timeout: 3m is out of range 5s..2m`},
		{"ceph:\n  op_timeout: 0s\n", `c.yaml:3: ceph.op_timeout: must be positive, got 0s`},
	} {
		mustReject(t, pools+tc.yaml, tc.want)
	}
	cfg, err = Parse("c.yaml", []byte(pools+"ceph: {op_timeout: 45s}\n"))
	if err != nil || cfg.Ceph.OpTimeout.D() != 45*time.Second {
		t.Errorf("op_timeout 45s: %v, %v", cfg, err)
	}
}
