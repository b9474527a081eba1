package main

import (
	"testing"
	"time"

	"github.com/flattend/flattend/internal/config"
	"github.com/flattend/flattend/internal/discovery"
	"github.com/flattend/flattend/internal/gate"
	"github.com/flattend/flattend/internal/metrics"
)

func parse(t *testing.T, y string) *config.Config {
	t.Helper()
	cfg, err := config.Parse("c.yaml", []byte(y))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func TestSchedulerConfig(t *testing.T) {
	cfg := parse(t, `node: h1
window: {schedule: "0 2 * * *", duration: 1h}
backoff: {min: 1s, max: 9s}
flatten: {in_use: allow, order: [size], max_per_window: 3, max_bytes_per_window: 1GiB, max_bytes_per_second: 2MiB, retry_after: 1h, min_time_left: 1m}
gates: {space_factor: 3, recovery: false, check_interval: 7s}
cleanup: {parent_snapshots: true, snapshot_pattern: "^snap-"}
discovery: {pools: [{pool: vms}], interval: 4m}
`)
	sc := schedulerConfig(cfg, schedulerExtras{})
	at := time.Date(2030, 1, 1, 2, 30, 0, 0, time.Local)
	if open, end := sc.Window.At(at); !open || !end.Equal(at.Add(30*time.Minute)) {
		t.Errorf("window at 02:30: %v until %v", open, end)
	}
	if sc.Node != "h1" || sc.BackoffMin != time.Second || sc.BackoffMax != 9*time.Second || sc.RescanInterval != 4*time.Minute ||
		sc.GateInterval != 7*time.Second || sc.MinTimeLeft != time.Minute || !sc.AllowInUse || len(sc.Order) != 1 ||
		sc.MaxPerWindow != 3 || sc.MaxBytesPerWindow != 1<<30 || sc.MaxBytesPerSecond != 2<<20 || sc.RetryAfter != time.Hour {
		t.Errorf("scheduler config: %+v", sc)
	}
	if sc.Gates != (gate.Config{Health: true, SpaceFactor: 3}) {
		t.Errorf("gates: %+v", sc.Gates)
	}
	if sc.Lock != lockOptions(cfg) || sc.Lock.Node != "h1" || sc.Lock.CheckInterval != 2*time.Second {
		t.Errorf("lock: %+v", sc.Lock)
	}
	if sc.CleanupSnapshots == nil || sc.CleanupSnapshots != cfg.SnapshotRegexp() {
		t.Errorf("cleanup: %v", sc.CleanupSnapshots)
	}
	if sc.Reconnect || sc.Metrics != nil || sc.OnProgress != nil {
		t.Errorf("extras without asking: %+v", sc)
	}

	m := metrics.New("h1")
	sc = schedulerConfig(cfg, schedulerExtras{metrics: m, ignoreGates: true, reconnect: true,
		onProgress: func(string, uint64, uint64) {}})
	if sc.Metrics != m || !sc.Reconnect || sc.OnProgress == nil || sc.Gates != (gate.Config{}) {
		t.Errorf("extras: %+v", sc)
	}

	// A pattern alone does not turn cleanup on.
	cfg = parse(t, "discovery: {pools: [{pool: vms}]}\ncleanup: {snapshot_pattern: x}\n")
	if sc := schedulerConfig(cfg, schedulerExtras{}); sc.CleanupSnapshots != nil {
		t.Errorf("cleanup without parent_snapshots: %v", sc.CleanupSnapshots)
	}
}

func TestSources(t *testing.T) {
	cfg := parse(t, `node: h1
discovery:
  libvirt: {include_vm_disks: true}
  pools:
    - {pool: vms, match: "^volume-", namespace: ns}
    - {pool: backlog, shared: true}
`)
	ss := sources(cfg, nil)
	if len(ss) != 3 {
		t.Fatalf("sources: %+v", ss)
	}
	p0, p1 := ss[0].(discovery.Pool), ss[1].(discovery.Pool)
	if p0.Pool != "vms" || p0.Namespace != "ns" || p0.OwnerKey != config.DefaultOwnerKey || p0.Node != "h1" ||
		p0.Match == nil || p0.Match != cfg.PoolMatch(0) {
		t.Errorf("pools[0]: %+v", p0)
	}
	if p1.Pool != "backlog" || !p1.Shared || p1.OwnerKey != "" || p1.Match != nil {
		t.Errorf("pools[1]: %+v", p1)
	}
	if l := ss[2].(discovery.Libvirt); l.URI != config.DefaultLibvirtURI || !l.IncludeVMDisks || l.Node != "h1" {
		t.Errorf("libvirt: %+v", l)
	}
}

func TestCephOptions(t *testing.T) {
	cfg := parse(t, "discovery: {pools: [{pool: vms}]}\nceph: {conf: /c, user: u, keyring: /k, connect_timeout: 3s, op_timeout: 7s}\nflatten: {concurrent_ops: 4}\n")
	o := cephOptions(cfg)
	if o.ConfPath != "/c" || o.User != "u" || o.Keyring != "/k" || o.ConnectTimeout != 3*time.Second ||
		o.OpTimeout != 7*time.Second || o.ConcurrentOps != 4 {
		t.Errorf("ceph options: %+v", o)
	}
}
