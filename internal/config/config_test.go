package config

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestExampleConfigLoads(t *testing.T) {
	cfg, err := Load("../../config.example.yaml")
	if err != nil {
		t.Fatalf("config.example.yaml: %v", err)
	}
	if cfg.Node != "h1" || cfg.Window.Duration.D() != 5*time.Hour || cfg.Discovery.Pools[0].Pool != "vms" ||
		cfg.Discovery.Pools[0].OwnerKey != "flattend.owner" || cfg.Flatten.ConcurrentOps != 10 {
		t.Errorf("unexpected values: %+v", cfg)
	}
}

func TestDefaults(t *testing.T) {
	cfg, err := Parse("c.yaml", []byte("discovery:\n  pools:\n    - pool: vms\n"))
	if err != nil {
		t.Fatal(err)
	}
	host, _ := os.Hostname()
	if host == "" || !strings.HasPrefix(host, cfg.Node) {
		t.Errorf("node = %q, want the host name %q", cfg.Node, host)
	}
	want := Defaults()
	if cfg.Ceph != want.Ceph || cfg.Lock != want.Lock || cfg.Window != want.Window || cfg.Backoff != want.Backoff ||
		cfg.Discovery.Pools[0].OwnerKey != DefaultOwnerKey || cfg.Log != want.Log {
		t.Errorf("defaults not applied: %+v", cfg)
	}
}

// Each malformed config yields an error naming file, line and field, and nothing else.
func TestMalformed(t *testing.T) {
	for _, tc := range []struct {
		name, yaml, want string
	}{
		{"bad yaml", "node: a\n\tlock: x\n", "c.yaml:2: found a tab character"},
		{"unclosed yaml", "node: a\nb: 'x\n", "c.yaml:2: found unexpected end of stream"},
		{"unknown key", "node: a\nlok:\n  pool: rbd\n", `c.yaml:2: lok: unknown key "lok"`},
		{"unknown nested key", "lock:\n  pool: rbd\n  imge: x\n", `c.yaml:3: lock.imge: unknown key "imge"`},
		{"bad duration", "discovery: {pools: [{pool: vms}]}\nwindow:\n  duration: 5x\n", `c.yaml:3: window.duration: "5x" is not a duration`},
		{"bad cron", "discovery: {pools: [{pool: vms}]}\nwindow:\n  schedule: \"0 25 * * *\"\n", `c.yaml:3: window.schedule: "0 25 * * *" is not a 5-field cron schedule`},
		{"empty pool", "discovery:\n  pools:\n    - pool: \"\"\n", `c.yaml:3: discovery.pools[0].pool: "" is not a pool name`},
		{"no pools", "node: a\n", `c.yaml: discovery.pools: list at least one pool`},
		{"bad namespace", "discovery: {pools: [{pool: vms, namespace: a/b}]}\n", `c.yaml:1: discovery.pools[0].namespace: "a/b" is not a namespace name`},
		{"pace too slow", "discovery: {pools: [{pool: vms}]}\nflatten:\n  max_bytes_per_second: 64KiB\n", `c.yaml:3: flatten.max_bytes_per_second: 65536 is below the minimum of 1MiB (0: no cap)`},
		{"negative ops", "discovery: {pools: [{pool: vms}]}\nflatten:\n  concurrent_ops: -3\n", `c.yaml:3: flatten.concurrent_ops: -3 is out of range 1..1024`},
		{"negative duration", "discovery: {pools: [{pool: vms}]}\nbackoff:\n  min: -2s\n", `c.yaml:3: backoff.min: must be positive, got -2s`},
		{"max below min", "discovery: {pools: [{pool: vms}]}\nbackoff:\n  min: 10s\n  max: 1s\n", `c.yaml:4: backoff.max: 1s is less than backoff.min (10s)`},
		{"wrong type int", "discovery: {pools: [{pool: vms}]}\nflatten:\n  concurrent_ops: ten\n", `c.yaml:3: flatten.concurrent_ops: "ten" is a string, expected a whole number`},
		{"wrong type list", "discovery:\n  pools: vms\n", `c.yaml:2: discovery.pools: "vms" is a string, expected a list`},
		{"wrong type map", "discovery: {pools: [{pool: vms}]}\nlock: rbd\n", `c.yaml:2: lock: "rbd" is a string, expected a mapping of keys`},
		{"bad level", "discovery: {pools: [{pool: vms}]}\nlog: {level: loud}\n", `c.yaml:2: log.level: "loud": use debug, info, warn or error`},
		{"empty client name", "discovery: {pools: [{pool: vms}]}\nceph: {user: client.}\n", `c.yaml:2: ceph.user: must name the cephx user`},
		{"not a mapping", "- a\n- b\n", `c.yaml:1: the configuration must be a mapping`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("c.yaml", []byte(tc.yaml))
			if err == nil {
				t.Fatal("accepted")
			}
			var es Errors
			if !errors.As(err, &es) {
				t.Fatalf("error of type %T: %v", err, err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got  %q\nwant %q", err.Error(), tc.want)
			}
		})
	}
}

func TestMissingFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "nope.yaml")
	_, err := Load(p)
	if err == nil || !strings.Contains(err.Error(), p+": no such file") {
		t.Fatalf("Load = %v", err)
	}
}

func TestEveryErrorReported(t *testing.T) {
	_, err := Parse("c.yaml", []byte("discovery: {pools: [{pool: vms}]}\nbackoff: {min: 0s}\nflatten: {concurrent_ops: 0}\n"))
	var es Errors
	if !errors.As(err, &es) || len(es) != 2 {
		t.Fatalf("want 2 errors, got %v", err)
	}
}

func TestFlattenAndGates(t *testing.T) {
	cfg, err := Parse("c.yaml", []byte("discovery: {pools: [{pool: vms}]}\nflatten:\n  order: [size]\n  max_bytes_per_window: 500GiB\n  in_use: allow\ngates: {space_factor: 1.5, recovery: false}\n"))
	if err != nil {
		t.Fatal(err)
	}
	f, g := cfg.Flatten, cfg.Gates
	if len(f.Order) != 1 || f.Order[0] != "size" || f.MaxBytesPerWindow != 500<<30 || f.InUse != InUseAllow ||
		f.MinTimeLeft.D() != 5*time.Minute || g.SpaceFactor != 1.5 || g.Recovery || !g.Health {
		t.Errorf("unexpected values: %+v %+v", f, g)
	}
	for _, tc := range []struct{ yaml, want string }{
		{"flatten:\n  order: [depth, colour]\n", `c.yaml:2: flatten.order[1]: "colour": use depth, age or size`},
		{"flatten:\n  order: [age, age]\n", `flatten.order[1]: "age" is listed twice`},
		{"flatten:\n  in_use: sometimes\n", `c.yaml:2: flatten.in_use: "sometimes": use skip or allow`},
		{"flatten:\n  max_bytes_per_window: 5 gigs\n", `c.yaml:2: flatten.max_bytes_per_window: "5 gigs" is not a size`},
		{"gates:\n  space_factor: 0\n", `c.yaml:2: gates.space_factor: 0 is out of range 1..100 (the space gate cannot be turned off)`},
	} {
		_, err := Parse("c.yaml", []byte("discovery: {pools: [{pool: vms}]}\n"+tc.yaml))
		// the discovery line shifts every line by one
		want := strings.Replace(tc.want, "c.yaml:2:", "c.yaml:3:", 1)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: got %v, want %q", tc.yaml, err, want)
		}
	}
}

func TestDiscoverySources(t *testing.T) {
	cfg, err := Parse("c.yaml", []byte(`discovery:
  libvirt: {include_vm_disks: true}
  pools:
    - {pool: vms, match: "^volume-"}
    - {pool: backlog, shared: true}
    - {pool: other, owner_key: site.owner}
`))
	if err != nil {
		t.Fatal(err)
	}
	d := cfg.Discovery
	if d.Libvirt == nil || d.Libvirt.URI != DefaultLibvirtURI || !d.Libvirt.IncludeVMDisks {
		t.Errorf("libvirt: %+v", d.Libvirt)
	}
	if p := d.Pools[0]; p.OwnerKey != DefaultOwnerKey || p.Shared || p.Match != "^volume-" {
		t.Errorf("pools[0]: %+v", p)
	}
	if p := d.Pools[1]; p.OwnerKey != "" || !p.Shared {
		t.Errorf("pools[1] (shared): %+v", p)
	}
	if p := d.Pools[2]; p.OwnerKey != "site.owner" || p.Shared {
		t.Errorf("pools[2]: %+v", p)
	}
	// An empty libvirt section turns the source on, and suffices without pools.
	for _, y := range []string{"discovery:\n  libvirt:\n", "discovery: {libvirt: {}}\n", "discovery: {libvirt: {uri: \"qemu:///session?socket=/tmp/s\"}}\n"} {
		cfg, err := Parse("c.yaml", []byte(y))
		if err != nil || cfg.Discovery.Libvirt == nil || cfg.Discovery.Libvirt.URI == "" {
			t.Errorf("%q: %v %+v", y, err, cfg)
		}
	}
	if cfg, _ := Parse("c.yaml", []byte("discovery: {pools: [{pool: vms}]}\n")); cfg.Discovery.Libvirt != nil {
		t.Error("libvirt on without a section")
	}
	for _, tc := range []struct{ yaml, want string }{
		{"discovery:\n  pools:\n    - pool: vms\n      shared: true\n      owner_key: flattend.owner\n",
			`c.yaml:5: discovery.pools[0].owner_key: a shared pool (shared: true) has no owner`},
		{"discovery:\n  pools:\n    - pool: vms\n      match: \"(\"\n", `c.yaml:4: discovery.pools[0].match: "(" is not a regular expression`},
		{"discovery:\n  libvirt:\n    uri: qemu+ssh://h/system\n", `c.yaml:3: discovery.libvirt.uri: "qemu+ssh://h/system": use a local qemu URI`},
		{"discovery:\n  libvirt:\n    uri: qemu:///embed\n", `c.yaml:3: discovery.libvirt.uri: "qemu:///embed": use qemu:///system or qemu:///session`},
		{"discovery:\n  libvirt:\n    uri: qemu:///system?socket=rel\n", `discovery.libvirt.uri: "qemu:///system?socket=rel": the only parameter supported is socket=/absolute/path`},
		{"discovery:\n  libvirt: {include_vm_disk: true}\n", `c.yaml:2: discovery.libvirt.include_vm_disk: unknown key "include_vm_disk"`},
		{"discovery: {}\n", `discovery.pools: list at least one pool to look for this node's clones in, or add a discovery.libvirt section`},
	} {
		_, err := Parse("c.yaml", []byte(tc.yaml))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: got %v\nwant %q", tc.yaml, err, tc.want)
		}
	}
}
