package config

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// pools is the line every hostile config starts with, so that only the key under test is wrong.
const pools = "discovery: {pools: [{pool: vms}]}\n"

// mustReject parses y and wants exactly want (every line of the error text).
func mustReject(t *testing.T, y, want string) {
	t.Helper()
	_, err := Parse("c.yaml", []byte(y))
	var es Errors
	if !errors.As(err, &es) {
		t.Errorf("%q: err = %v (%T), want config.Errors", y, err, err)
		return
	}
	if err.Error() != want {
		t.Errorf("%q:\ngot  %s\nwant %s", y, err, want)
	}
}

// A time zone with no fields after it panicked inside robfig/cron: `check` crashed and a
// reload killed the daemon. It is a config error now, from Load as from Parse.
func TestScheduleZoneWithoutFields(t *testing.T) {
	for _, spec := range []string{"CRON_TZ=Europe/Paris", "TZ=Europe/Paris", "CRON_TZ=Europe/Paris "} {
		y := pools + "window:\n  schedule: \"" + spec + "\"\n"
		p := filepath.Join(t.TempDir(), "c.yaml")
		if err := os.WriteFile(p, []byte(y), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := Load(p)
		want := p + `:3: window.schedule: "` + spec + `" is not a 5-field cron schedule: no schedule after `
		if err == nil || !strings.HasPrefix(err.Error(), want) {
			t.Errorf("%q: got %v\nwant %s…", spec, err, want)
		}
	}
	mustReject(t, pools+"window: {schedule: \"TZ=UTC\\t0 1 * * *\"}\n",
		`c.yaml:2: window.schedule: "TZ=UTC\t0 1 * * *" contains a control character (U+0009): use printable text`)
}

func TestScheduleNeverOpens(t *testing.T) {
	mustReject(t, pools+"window:\n  schedule: \"0 0 30 2 *\"\n",
		`c.yaml:3: window.schedule: "0 0 30 2 *" never opens: it has no activation in the next 5 years`)
	if _, err := Parse("c.yaml", []byte(pools+"window: {schedule: \"0 1 29 2 *\"}\n")); err != nil {
		t.Errorf("29 February: %v", err)
	}
}

// Intervals have sane bounds: no busy loop against the cluster, no lock check so rare that
// other nodes break the lock before the holder notices it lost its watch.
func TestIntervalBounds(t *testing.T) {
	for _, tc := range []struct{ yaml, want string }{
		{"lock:\n  check_interval: 1ns\n", `c.yaml:3: lock.check_interval: 1ns is out of range 100ms..10s`},
		{"lock:\n  check_interval: 11s\n", `c.yaml:3: lock.check_interval: 11s is out of range 100ms..10s`},
		{"lock:\n  check_interval: 0s\n", `c.yaml:3: lock.check_interval: must be positive, got 0s`},
		{"gates:\n  check_interval: 10ms\n", `c.yaml:3: gates.check_interval: 10ms is below the minimum of 1s`},
		{"backoff:\n  min: 1ms\n", `c.yaml:3: backoff.min: 1ms is below the minimum of 100ms`},
		{"backoff:\n  max: 1ms\n", `c.yaml:3: backoff.max: 1ms is less than backoff.min (2s)`},
		{"discovery:\n  interval: 500ms\n", `c.yaml:3: discovery.interval: 500ms is below the minimum of 1s`},
		{"flatten:\n  retry_after: 48h\n", `c.yaml:3: flatten.retry_after: 48h is above the maximum of 24h`},
		{"flatten:\n  retry_after: 1000000h\n", `c.yaml:3: flatten.retry_after: 1000000h is above the maximum of 24h`},
	} {
		y := pools + tc.yaml
		if strings.HasPrefix(tc.yaml, "discovery:") {
			y = "node: h1\ndiscovery:\n  pools: [{pool: vms}]\n" + strings.TrimPrefix(tc.yaml, "discovery:\n")
			tc.want = strings.Replace(tc.want, "c.yaml:3:", "c.yaml:4:", 1)
		}
		mustReject(t, y, tc.want)
	}
	// The bounds themselves are allowed.
	ok := pools + "lock: {check_interval: 100ms}\ngates: {check_interval: 1s}\nbackoff: {min: 100ms}\nflatten: {retry_after: 24h}\n"
	for _, y := range []string{ok, pools + "lock: {check_interval: 10s}\n", "discovery: {pools: [{pool: vms}], interval: 1s}\n"} {
		if _, err := Parse("c.yaml", []byte(y)); err != nil {
			t.Errorf("%q: %v", y, err)
		}
	}
}

// A string with a control character is refused wherever it is, once (not also as a bad name).
func TestControlCharacters(t *testing.T) {
	for _, tc := range []struct{ yaml, want string }{
		{"node: \"h1\\nfake log line\"\n", `c.yaml:2: node: "h1\nfake log line" contains a control character (U+000A): use printable text`},
		{"lock: {pool: \"rb\\x1bd\"}\n", `c.yaml:2: lock.pool: "rb\x1bd" contains a control character (U+001B): use printable text`},
		{"lock: {image: \"l\\0\"}\n", `c.yaml:2: lock.image: "l\x00" contains a control character (U+0000): use printable text`},
		{"ceph: {user: \"flattend\\r\"}\n", `c.yaml:2: ceph.user: "flattend\r" contains a control character (U+000D): use printable text`},
		{"ceph: {keyring: \"/k\\x7f\"}\n", `c.yaml:2: ceph.keyring: "/k\x7f" contains a control character (U+007F): use printable text`},
		{"metrics: {listen: \"127.0.0.1:1\\u0085\"}\n", `c.yaml:2: metrics.listen: "127.0.0.1:1\u0085" contains a control character (U+0085): use printable text`},
		{"flatten: {order: [depth, \"age\\a\"]}\n", `c.yaml:2: flatten.order[1]: "age\a" contains a control character (U+0007): use printable text`},
	} {
		mustReject(t, pools+tc.yaml, tc.want)
	}
	mustReject(t, "discovery:\n  pools:\n    - {pool: \"v\\tms\", namespace: \"n\\b\", owner_key: \"o\\f\", match: \"\\v\"}\n", strings.Join([]string{
		`c.yaml:3: discovery.pools[0].pool: "v\tms" contains a control character (U+0009): use printable text`,
		`c.yaml:3: discovery.pools[0].namespace: "n\b" contains a control character (U+0008): use printable text`,
		`c.yaml:3: discovery.pools[0].owner_key: "o\f" contains a control character (U+000C): use printable text`,
		`c.yaml:3: discovery.pools[0].match: "\v" contains a control character (U+000B): use printable text`,
	}, "\n"))
	mustReject(t, "discovery: {libvirt: {uri: \"qemu:///system\\x01\"}}\n",
		`c.yaml:1: discovery.libvirt.uri: "qemu:///system\x01" contains a control character (U+0001): use printable text`)
	// Printable Unicode is not a control character (the checks of each field decide).
	if _, err := Parse("c.yaml", []byte(pools+"ceph: {keyring: \"/etc/ceph/clé\"}\n")); err != nil {
		t.Errorf("non-ASCII keyring: %v", err)
	}
}

// YAML itself refuses invalid UTF-8, but a Config is checked the same way whatever its source.
func TestInvalidUTF8(t *testing.T) {
	c := Defaults()
	c.Node, c.Path = "h\xff", "c.yaml"
	c.Discovery.Pools = []PoolSource{{Pool: "vms", OwnerKey: DefaultOwnerKey}}
	es := c.validate(map[string]int{})
	if want := `c.yaml: node: "h\xff" is not valid UTF-8`; es.Error() != want {
		t.Errorf("got  %v\nwant %s", es, want)
	}
}

// A panic anywhere under Parse is an Error, not a crash (a reload keeps the running config).
func TestGuardPanic(t *testing.T) {
	_, err := guard("c.yaml", func() (*Config, error) { panic("boom") })
	var es Errors
	if !errors.As(err, &es) || err.Error() != "c.yaml: cannot read this configuration (internal error: boom)" {
		t.Errorf("err = %v", err)
	}
}
