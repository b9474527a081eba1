package config

import (
	"os"
	"regexp"
	"strings"
	"testing"
)

// A cleanup pattern that matches the snapshots Cinder, Nova or Glance name (and still track)
// is accepted, with a warning that names the tool and the line; a flattend-specific one is not.
func TestSnapshotPatternWarnings(t *testing.T) {
	for _, c := range []struct {
		pattern string
		want    []string // tools named in the warnings, in order; none for no warning
	}{
		{"^snapshot-", []string{"Cinder's volume snapshots"}},
		{"snapshot", []string{"Cinder's volume snapshots"}},
		{`\.clone_snap$`, []string{"Cinder's clone snapshots"}},
		{"^backup\\.", []string{"Cinder's backup snapshots"}},
		{"^[0-9a-f]{32}$", []string{"Nova's instance snapshots"}},
		{"^nova-", []string{"Nova's resize snapshot"}},
		{"^snap$", []string{"Glance's image snapshots"}},
		{"snap", []string{"Cinder's volume snapshots", "Cinder's clone snapshots", "Cinder's backup snapshots", "Glance's image snapshots"}},
		{"", nil},
		{"^flattend-gc-", nil},
		{"^golden-[0-9]+$", nil},
	} {
		cfg, err := Parse("c.yaml", []byte("discovery: {pools: [{pool: vms}]}\ncleanup:\n  parent_snapshots: true\n  snapshot_pattern: \""+
			strings.ReplaceAll(c.pattern, `\`, `\\`)+"\"\n"))
		if c.pattern == "" {
			cfg, err = Parse("c.yaml", []byte("discovery: {pools: [{pool: vms}]}\n"))
		}
		if err != nil {
			t.Fatalf("%q: %v", c.pattern, err)
		}
		ws := cfg.Warnings()
		if len(ws) != len(c.want) {
			t.Errorf("%q: warnings %q, want %d naming %q", c.pattern, ws, len(c.want), c.want)
			continue
		}
		for i, w := range ws {
			if !strings.HasPrefix(w.Error(), "c.yaml:4: cleanup.snapshot_pattern: ") || !strings.Contains(w.Error(), c.want[i]) {
				t.Errorf("%q: warning %q, want c.yaml:4: cleanup.snapshot_pattern: … %s", c.pattern, w, c.want[i])
			}
		}
	}
}

// The pattern config.example.yaml suggests draws no warning.
func TestExampleSnapshotPatternSafe(t *testing.T) {
	b, err := os.ReadFile("../../config.example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`snapshot_pattern: .*e\.g\. "([^"]+)"`).FindSubmatch(b)
	if m == nil {
		t.Fatal("config.example.yaml suggests no snapshot_pattern")
	}
	cfg, err := Parse("c.yaml", []byte("discovery: {pools: [{pool: vms}]}\ncleanup: {parent_snapshots: true, snapshot_pattern: \""+string(m[1])+"\"}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if ws := cfg.Warnings(); len(ws) != 0 {
		t.Errorf("suggested pattern %q: %v", m[1], ws)
	}
}
