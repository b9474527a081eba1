package config

import (
	"os"
	"strings"
	"testing"
	"time"
)

// The typed results of validation: callers use these instead of parsing again.
func TestParsedResults(t *testing.T) {
	cfg, err := Parse("c.yaml", []byte(`window: {schedule: "0 2 * * *", duration: 3h}
cleanup: {parent_snapshots: true, snapshot_pattern: "^snap-"}
discovery:
  pools:
    - {pool: vms, match: "^volume-"}
    - {pool: other}
`))
	if err != nil {
		t.Fatal(err)
	}
	at := time.Date(2030, 1, 1, 3, 0, 0, 0, time.Local)
	if open, end := cfg.ParsedWindow().At(at); !open || !end.Equal(at.Add(2*time.Hour)) {
		t.Errorf("window at 03:00: open %v until %v, want open until 05:00", open, end)
	}
	if open, _ := cfg.ParsedWindow().At(at.Add(3 * time.Hour)); open {
		t.Error("window open at 06:00")
	}
	if re := cfg.SnapshotRegexp(); re == nil || re.String() != "^snap-" {
		t.Errorf("snapshot regexp = %v", re)
	}
	if re := cfg.PoolMatch(0); re == nil || !re.MatchString("volume-1") || re.MatchString("vm-1") {
		t.Errorf("pools[0] match = %v", re)
	}
	if re := cfg.PoolMatch(1); re != nil {
		t.Errorf("pools[1] match = %v, want nil (no match: every image)", re)
	}
	if re := cfg.PoolMatch(2); re != nil {
		t.Errorf("PoolMatch out of range = %v", re)
	}
}

func TestParsedDefaults(t *testing.T) {
	cfg, err := Parse("c.yaml", []byte("discovery: {pools: [{pool: vms}]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	// Defaults: 01:00 for 5h.
	at := time.Date(2030, 1, 1, 1, 30, 0, 0, time.Local)
	if open, end := cfg.ParsedWindow().At(at); !open || !end.Equal(at.Add(4*time.Hour+30*time.Minute)) {
		t.Errorf("default window at 01:30: open %v until %v", open, end)
	}
	if cfg.SnapshotRegexp() != nil {
		t.Error("snapshot regexp without a pattern")
	}
	// A pattern without parent_snapshots is still compiled; using it is the caller's call.
	cfg, err = Parse("c.yaml", []byte("discovery: {pools: [{pool: vms}]}\ncleanup: {snapshot_pattern: x}\n"))
	if err != nil || cfg.SnapshotRegexp() == nil {
		t.Errorf("pattern without parent_snapshots: %v %v", err, cfg)
	}
}

// Reload reads the file again: the typed results follow it.
func TestParsedReload(t *testing.T) {
	p := t.TempDir() + "/c.yaml"
	write := func(s string) {
		if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("discovery: {pools: [{pool: vms, match: a}]}\n")
	a, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	write("discovery: {pools: [{pool: vms, match: b}]}\n")
	b, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	if a.PoolMatch(0).String() != "a" || b.PoolMatch(0).String() != "b" {
		t.Errorf("matches %v, %v", a.PoolMatch(0), b.PoolMatch(0))
	}
}

// The whole error text, order included, is what operators (and scripts) see.
func TestErrorTextExact(t *testing.T) {
	_, err := Parse("c.yaml", []byte(`discovery: {pools: [{pool: vms}]}
backoff: {min: 0s}
cleanup: {parent_snapshots: true}
gates: {space_factor: 0, check_interval: 0s}
window: {schedule: "0 25 * * *", duration: 0s}
`))
	want := strings.Join([]string{
		`c.yaml:5: window.schedule: "0 25 * * *" is not a 5-field cron schedule: end of range (25) above maximum (23): 25`,
		`c.yaml:5: window.duration: must be positive, got 0s`,
		`c.yaml:2: backoff.min: must be positive, got 0s`,
		`c.yaml:4: gates.space_factor: 0 is out of range 1..100 (the space gate cannot be turned off)`,
		`c.yaml:3: cleanup.snapshot_pattern: required with cleanup.parent_snapshots: true (a regular expression on snapshot names, e.g. ^flattend-gc-)`,
		`c.yaml:4: gates.check_interval: must be positive, got 0s`,
	}, "\n")
	if err == nil || err.Error() != want {
		t.Errorf("got\n%v\nwant\n%s", err, want)
	}
	// A bad schedule is reported whatever the duration.
	_, err = Parse("c.yaml", []byte("discovery: {pools: [{pool: vms}]}\nwindow: {schedule: \"x\"}\n"))
	if want := `c.yaml:2: window.schedule: "x" is not a 5-field cron schedule: expected exactly 5 fields, found 1: [x]`; err == nil || err.Error() != want {
		t.Errorf("got  %v\nwant %s", err, want)
	}
}
