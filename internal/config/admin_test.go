package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// ceph.user takes the cephx name as Ceph's tools print it (client.flattend) as well as the id.
func TestUserClientPrefix(t *testing.T) {
	for _, user := range []string{"flattend", "client.flattend"} {
		cfg, err := Parse("c.yaml", []byte("discovery: {pools: [{pool: vms}]}\nceph: {user: "+user+"}\n"))
		if err != nil {
			t.Fatalf("ceph.user %s: %v", user, err)
		}
		if cfg.Ceph.User != "flattend" {
			t.Errorf("ceph.user %s: got %q, want flattend", user, cfg.Ceph.User)
		}
	}
}

// Without a file the admin commands run on the defaults (client.admin, as Ceph's tools), with
// the command line over them; with a file, the file's settings under the command line's.
func TestLoadAdmin(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "config.yaml")
	cfg, found, err := LoadAdmin(Admin{Path: missing})
	if err != nil || found {
		t.Fatalf("no file: found %v, %v", found, err)
	}
	if cfg.Ceph.User != "admin" || cfg.Lock.Pool != "rbd" || cfg.Lock.Image != "flattend-lock" || cfg.Ceph.Conf != "/etc/ceph/ceph.conf" {
		t.Errorf("no file: not the defaults: %+v %+v", cfg.Ceph, cfg.Lock)
	}

	if _, _, err := LoadAdmin(Admin{Path: missing, Required: true}); err == nil || !strings.Contains(err.Error(), "no such file") {
		t.Errorf("a named file that is missing: %v", err)
	}
	if _, _, err := LoadAdmin(Admin{Path: missing, Discovery: true}); err == nil || !strings.Contains(err.Error(), "discovery.pools: list at least one pool") {
		t.Errorf("discovery without a source: %v", err)
	}
	cfg, _, err = LoadAdmin(Admin{Path: missing, Discovery: true, Edit: func(c *Config) {
		c.Discovery.Pools = []PoolSource{{Pool: "vms"}}
		c.Ceph.User = "client.flattend"
	}})
	if err != nil || cfg.Discovery.Pools[0].OwnerKey != DefaultOwnerKey || cfg.Ceph.User != "flattend" {
		t.Errorf("edited: %v, %+v", err, cfg)
	}
	if _, _, err := LoadAdmin(Admin{Path: missing, Edit: func(c *Config) { c.Lock.Pool = "a/b" }}); err == nil || !strings.Contains(err.Error(), `lock.pool: "a/b" is not a pool name`) {
		t.Errorf("a bad edit: %v", err)
	}

	file := filepath.Join(t.TempDir(), "c.yaml")
	if err := os.WriteFile(file, []byte("ceph: {user: flattend}\nlock: {pool: locks, image: l}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, found, err = LoadAdmin(Admin{Path: file, Edit: func(c *Config) { c.Lock.Image = "other" }})
	if err != nil || !found || cfg.Ceph.User != "flattend" || cfg.Lock.Pool != "locks" || cfg.Lock.Image != "other" {
		t.Errorf("file and flags: found %v, %v, %+v %+v", found, err, cfg.Ceph, cfg.Lock)
	}
}
