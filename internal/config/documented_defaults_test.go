package config

import (
	"slices"
	"testing"
	"time"
)

// The defaults an operator reads in docs/configuration.md (and, for metrics.listen, in
// docs/operations.md), written here as literals: a change of Defaults() that the docs do not
// follow fails this test, which comparing with Defaults() itself could never do.
func TestDocumentedDefaults(t *testing.T) {
	cfg, err := Parse("c.yaml", []byte("discovery:\n  pools:\n    - pool: vms\n  libvirt: {}\n"))
	if err != nil {
		t.Fatal(err)
	}
	p := cfg.Discovery.Pools[0]
	for _, c := range []struct {
		key       string
		got, want any
	}{
		{"ceph.conf", cfg.Ceph.Conf, "/etc/ceph/ceph.conf"},
		{"ceph.user", cfg.Ceph.User, "flattend"},
		{"ceph.keyring", cfg.Ceph.Keyring, ""},
		{"ceph.connect_timeout", cfg.Ceph.ConnectTimeout.D(), 30 * time.Second},
		{"ceph.op_timeout", cfg.Ceph.OpTimeout.D(), 30 * time.Second},
		{"lock.pool", cfg.Lock.Pool, "rbd"},
		{"lock.image", cfg.Lock.Image, "flattend-lock"},
		{"lock.slots", cfg.Lock.Slots, 1},
		{"lock.check_interval", cfg.Lock.CheckInterval.D(), 2 * time.Second},
		{"window.schedule", cfg.Window.Schedule, "0 1 * * *"},
		{"window.duration", cfg.Window.Duration.D(), 5 * time.Hour},
		{"backoff.min", cfg.Backoff.Min.D(), 2 * time.Second},
		{"backoff.max", cfg.Backoff.Max.D(), 2 * time.Minute},
		{"flatten.concurrent_ops", cfg.Flatten.ConcurrentOps, 10},
		{"flatten.min_time_left", cfg.Flatten.MinTimeLeft.D(), 5 * time.Minute},
		{"flatten.in_use", cfg.Flatten.InUse, "skip"},
		{"flatten.order", slices.Equal(cfg.Flatten.Order, []string{"depth", "age", "size"}), true},
		{"flatten.max_per_window", cfg.Flatten.MaxPerWindow, 0},
		{"flatten.max_bytes_per_window", uint64(cfg.Flatten.MaxBytesPerWindow), uint64(0)},
		{"flatten.max_bytes_per_second", uint64(cfg.Flatten.MaxBytesPerSecond), uint64(0)},
		{"flatten.retry_after", cfg.Flatten.RetryAfter.D(), 30 * time.Minute},
		{"flatten.verify_copyups", cfg.Flatten.VerifyCopyups, "auto"},
		{"cleanup.parent_snapshots", cfg.Cleanup.ParentSnapshots, false},
		{"cleanup.snapshot_pattern", cfg.Cleanup.SnapshotPattern, ""},
		{"gates.health", cfg.Gates.Health, true},
		{"gates.recovery", cfg.Gates.Recovery, true},
		{"gates.space_factor", cfg.Gates.SpaceFactor, 2.0},
		{"gates.check_interval", cfg.Gates.CheckInterval.D(), 15 * time.Second},
		{"discovery.pools[].namespace", p.Namespace, ""},
		{"discovery.pools[].owner_key", p.OwnerKey, "flattend.owner"},
		{"discovery.pools[].shared", p.Shared, false},
		{"discovery.pools[].match", p.Match, ""},
		{"discovery.libvirt.uri", cfg.Discovery.Libvirt.URI, "qemu:///system"},
		{"discovery.libvirt.include_vm_disks", cfg.Discovery.Libvirt.IncludeVMDisks, false},
		{"discovery.interval", cfg.Discovery.Interval.D(), 15 * time.Minute},
		{"log.level", cfg.Log.Level, "info"},
		{"log.format", cfg.Log.Format, "console"},
		{"metrics.listen", cfg.Metrics.Listen, "127.0.0.1:9478"},
	} {
		if c.got != c.want {
			t.Errorf("%s: default %v, docs/configuration.md says %v", c.key, c.got, c.want)
		}
	}
}
