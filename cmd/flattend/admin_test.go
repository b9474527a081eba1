package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The admin commands' Ceph settings come, as rbd's do, from the flags, then CEPH_ARGS, then
// CEPH_CONF, then the config file.
func TestAdminSettingsPrecedence(t *testing.T) {
	file := filepath.Join(t.TempDir(), "config.yaml")
	y := "node: h1\nceph: {conf: /file/ceph.conf, user: client.fromfile, keyring: /file/keyring}\ndiscovery: {pools: [{pool: vms}]}\n"
	if err := os.WriteFile(file, []byte(y), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, cephArgs, cephConf string
		flags                    []string
		conf, user, keyring      string
	}{
		{"file", "", "", nil, "/file/ceph.conf", "fromfile", "/file/keyring"},
		{"CEPH_CONF", "", "/env/ceph.conf", nil, "/env/ceph.conf", "fromfile", "/file/keyring"},
		{"CEPH_ARGS", "--conf /args/ceph.conf --id fromargs -k /args/keyring", "/env/ceph.conf", nil, "/args/ceph.conf", "fromargs", "/args/keyring"},
		{"flags", "--conf /args/ceph.conf --name client.fromargs", "/env/ceph.conf",
			[]string{"-c", "/flag/ceph.conf", "--name", "client.fromflag", "--keyring", "/flag/keyring"}, "/flag/ceph.conf", "fromflag", "/flag/keyring"},
		{"--id", "", "", []string{"--id", "admin"}, "/file/ceph.conf", "admin", "/file/keyring"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("CEPH_ARGS", tc.cephArgs)
			t.Setenv("CEPH_CONF", tc.cephConf)
			o, code, ok := parseFlags("status", commands["status"], append([]string{"--config", file}, tc.flags...), new(bytes.Buffer))
			if !ok {
				t.Fatalf("flags: exit %d", code)
			}
			cfg, found, err := loadConfig(o, commands["status"])
			if err != nil || !found {
				t.Fatalf("found %v, %v", found, err)
			}
			if c := cfg.Ceph; c.Conf != tc.conf || c.User != tc.user || c.Keyring != tc.keyring {
				t.Errorf("got conf %s, user %s, keyring %s; want %s, %s, %s", c.Conf, c.User, c.Keyring, tc.conf, tc.user, tc.keyring)
			}
		})
	}
}

// Usage errors of the admin flags: exit 2 before any Ceph access. run, once and check keep
// needing their config, and take no Ceph flags.
func TestAdminUsage(t *testing.T) {
	good := writeConfig(t, "")
	for _, tc := range []struct {
		name, cephArgs string
		args           []string
		err            string
	}{
		{"a daemon's name", "", []string{"status", "--config", good, "--name", "osd.1"}, "--name \"osd.1\": give a client's name, client.ID"},
		{"a daemon's name in CEPH_ARGS", "--name osd.0", []string{"unlock", "--force", "--config", good}, "CEPH_ARGS: --name \"osd.0\": give a client's name"},
		{"bad lock pool", "", []string{"status", "--config", good, "--lock-pool", "a/b"}, `lock.pool: "a/b" is not a pool name`},
		{"missing named config", "", []string{"plan", "--config", "/nonexistent/c.yaml", "--pool", "vms"}, "/nonexistent/c.yaml: no such file"},
		{"check takes no Ceph flags", "", []string{"check", "--config", good, "--conf", "/etc/ceph/ceph.conf"}, "flag provided but not defined: -conf"},
		{"run takes no Ceph flags", "", []string{"run", "--config", good, "--id", "admin"}, "flag provided but not defined: -id"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("CEPH_ARGS", tc.cephArgs)
			var stdout, stderr bytes.Buffer
			if code := run(tc.args, &stdout, &stderr); code != exitUsage {
				t.Errorf("exit %d, want 2; stderr:\n%s", code, stderr.String())
			}
			if !strings.Contains(stderr.String(), tc.err) {
				t.Errorf("stderr %q, want %q", stderr.String(), tc.err)
			}
		})
	}
}
