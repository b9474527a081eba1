package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// writeConfig writes a valid config that names no reachable cluster: nothing below dials.
func writeConfig(t *testing.T, extra string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "config.yaml")
	y := "node: h1\nceph: {conf: /nonexistent/ceph.conf}\ndiscovery: {pools: [{pool: vms}]}\n" + extra
	if err := os.WriteFile(p, []byte(y), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// Usage errors, per command: exit code 2 and what the operator reads, before any Ceph access.
func TestUsage(t *testing.T) {
	good := writeConfig(t, "")
	bad := writeConfig(t, "lock: {slots: 0}\n")
	zoneOnly := writeConfig(t, "window: {schedule: \"CRON_TZ=Europe/Paris\"}\n") // robfig/cron panicked
	for _, tc := range []struct {
		name     string
		args     []string
		code     int
		out, err string // substrings of stdout and stderr; "": must be empty
	}{
		{"no command", nil, 2, "", "Usage:\n  flattend run"},
		{"help", []string{"help"}, 0, "Exit codes: 0 ok", ""},
		{"--help", []string{"--help"}, 0, "Usage:", ""},
		{"-h", []string{"-h"}, 0, "Usage:", ""},
		{"unknown command", []string{"bogus"}, 2, "", "flattend: unknown command \"bogus\"\n\nflattend flattens"},
		{"extra argument", []string{"run", "extra"}, 2, "", "flattend run: unexpected argument \"extra\"\n"},
		{"bad duration", []string{"once", "--timeout", "x"}, 2, "", "invalid value \"x\" for flag -timeout"},
		{"flag of another command", []string{"status", "--timeout", "1s"}, 2, "", "flag provided but not defined: -timeout"},
		{"image on run", []string{"run", "--image", "a/b"}, 2, "", "flag provided but not defined: -image"},
		{"bad slot", []string{"unlock", "--slot", "x"}, 2, "", "invalid value \"x\" for flag -slot"},
		{"missing config", []string{"check", "--config", "/nonexistent/c.yaml"}, 2, "",
			"/nonexistent/c.yaml: no such file (write one; see config.example.yaml)\n"},
		{"invalid config", []string{"status", "--config", bad}, 2, "", bad + ":4: lock.slots: 0 is out of range 1..64\n"},
		{"check schedule without fields", []string{"check", "--config", zoneOnly}, 2, "",
			zoneOnly + ":4: window.schedule: \"CRON_TZ=Europe/Paris\" is not a 5-field cron schedule: no schedule after CRON_TZ=Europe/Paris"},
		{"unlock without force", []string{"unlock", "--config", good}, 2, "",
			"flattend unlock: breaking a lock needs --force (see flattend unlock --help)\n"},
		{"unlock slot out of range", []string{"unlock", "--force", "--slot", "1", "--config", good}, 2, "",
			"flattend unlock: --slot 1: the configuration has slots 0..0\n"},
		{"unlock negative slot", []string{"unlock", "--force", "--slot=-1", "--config", good}, 2, "",
			"flattend unlock: --slot -1: the configuration has slots 0..0\n"},
		{"once negative timeout", []string{"once", "--timeout", "-5s", "--config", good}, 2, "",
			"flattend once: --timeout: must not be negative, got -5s (0: no limit)\n"},
		{"once bad image", []string{"once", "--image", "nope", "--config", good}, 2, "",
			"flattend once: --image: \"nope\" is not pool/image or pool/namespace/image\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := run(tc.args, &stdout, &stderr)
			if code != tc.code {
				t.Errorf("exit code %d, want %d (stderr %q)", code, tc.code, stderr.String())
			}
			check := func(what, got, want string) {
				if want == "" && got != "" || !strings.Contains(got, want) {
					t.Errorf("%s = %q, want it to contain %q", what, got, want)
				}
			}
			check("stdout", stdout.String(), tc.out)
			check("stderr", stderr.String(), tc.err)
		})
	}
}

// Each command's --help lists its own flags and no other's, and exits 0.
func TestCommandHelp(t *testing.T) {
	all := []string{"-config", "-json", "-timeout", "-image", "-ignore-gates", "-force", "-slot", "-yes"}
	for cmd, flags := range map[string][]string{
		"run":    {"-config"},
		"check":  {"-config"},
		"once":   {"-config", "-timeout", "-image", "-ignore-gates"},
		"status": {"-config", "-json"},
		"plan":   {"-config", "-json"},
		"unlock": {"-config", "-force", "-slot", "-yes"},
	} {
		var stdout, stderr bytes.Buffer
		if code := run([]string{cmd, "--help"}, &stdout, &stderr); code != 0 {
			t.Errorf("%s --help: exit code %d", cmd, code)
		}
		help := stderr.String()
		if !strings.HasPrefix(help, "Usage of flattend "+cmd+":\n") {
			t.Errorf("%s --help: %q", cmd, help)
		}
		for _, f := range all {
			want := strings.Contains(strings.Join(flags, " ")+" ", f+" ")
			if got := strings.Contains(help, "  "+f+" ") || strings.Contains(help, "  "+f+"\n"); got != want {
				t.Errorf("%s --help: lists %s: %v, want %v\n%s", cmd, f, got, want, help)
			}
		}
	}
	// The two --json flags document different formats.
	var status, plan bytes.Buffer
	run([]string{"status", "--help"}, &bytes.Buffer{}, &status)
	run([]string{"plan", "--help"}, &bytes.Buffer{}, &plan)
	if !strings.Contains(status.String(), "docs/operations.md") || !strings.Contains(plan.String(), "docs/discovery.md") {
		t.Errorf("--json help:\n%s\n%s", status.String(), plan.String())
	}
}

func TestCommandsMatchUsage(t *testing.T) {
	for name := range commands {
		if !strings.Contains(usage, "  flattend "+name+" ") {
			t.Errorf("command %q is not in the usage text", name)
		}
	}
}

// A cleanup pattern that matches Cinder's snapshot names is a warning, not an error: `check`
// prints it, and starting (`once` here, `run` alike) logs it before dialing Ceph.
func TestSnapshotPatternWarning(t *testing.T) {
	p := writeConfig(t, "cleanup: {parent_snapshots: true, snapshot_pattern: \"^snapshot-\"}\n")
	for _, cmd := range []string{"check", "once"} {
		var stdout, stderr bytes.Buffer
		code := run([]string{cmd, "--config", p}, &stdout, &stderr)
		for _, want := range []string{p + ":4: cleanup.snapshot_pattern: ", "matches Cinder's volume snapshots (snapshot-<uuid>)"} {
			if code == exitUsage || !strings.Contains(stderr.String(), want) {
				t.Errorf("%s: exit %d, stderr %q\nwant a warning with %q", cmd, code, stderr.String(), want)
			}
		}
	}
	var stdout, stderr bytes.Buffer
	run([]string{"check", "--config", writeConfig(t, "cleanup: {parent_snapshots: true, snapshot_pattern: \"^flattend-gc-\"}\n")}, &stdout, &stderr)
	if strings.Contains(stderr.String(), "warning") {
		t.Errorf("check with a flattend-only pattern: %q", stderr.String())
	}
}
