package metrics_test

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/flattend/flattend/internal/metrics"
)

// scrape reads /metrics as Prometheus would and returns each flattend_* sample, keyed by its
// name and labels as printed ("flattend_gate_closed_total{gate=\"health\"}").
func scrape(t *testing.T, m *metrics.Metrics) map[string]string {
	t.Helper()
	rec := httptest.NewRecorder()
	m.Mux(metrics.Endpoints{}).ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if rec.Code != http.StatusOK {
		t.Fatalf("/metrics: %d", rec.Code)
	}
	return samples(t, rec.Body)
}

func samples(t *testing.T, r io.Reader) map[string]string {
	t.Helper()
	out := map[string]string{}
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		l := sc.Text()
		if !strings.HasPrefix(l, "flattend_") {
			continue
		}
		i := strings.LastIndexByte(l, ' ')
		out[l[:i]] = l[i+1:]
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

func expect(t *testing.T, got map[string]string, want map[string]string) {
	t.Helper()
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %q, want %q", k, got[k], v)
		}
	}
}

// Before anything happens: counters and gauges exist at 0 (rate() and absent() alerts need the
// series), the gates' counters exist per gate, and the node is a label of flattend_node_info only.
func TestInitialSeries(t *testing.T) {
	got := scrape(t, metrics.New("hv1"))
	expect(t, got, map[string]string{
		`flattend_node_info{node="hv1"}`:               `1`,
		`flattend_flattens_started_total`:              `0`,
		`flattend_lock_lost_total`:                     `0`,
		`flattend_lock_held`:                           `0`,
		`flattend_gate_closed_total{gate="health"}`:    `0`,
		`flattend_gate_closed_total{gate="recovery"}`:  `0`,
		`flattend_gate_closed_total{gate="space"}`:     `0`,
		`flattend_last_pass_success_timestamp_seconds`: `0`,
	})
	for k := range got {
		if strings.Contains(k, "node=") && !strings.HasPrefix(k, "flattend_node_info{") {
			t.Errorf("%s carries the node as a label: only flattend_node_info may", k)
		}
	}
}

// The values a sequence of events leaves, beyond the happy path: a lost lock, closed gates,
// flattens ended by the window, a failed discovery, a failed pass.
func TestValues(t *testing.T) {
	m := metrics.New("hv1")
	m.LockAcquired(2 * time.Second)
	lockHeld := scrape(t, m)[`flattend_lock_held`]
	m.FlattenStarted()
	m.Progress(0.5, 100)
	m.Progress(0.75, 50)
	during := scrape(t, m)[`flattend_flatten_progress_ratio`]
	m.FlattenEnded("cancelled", "window", 5*time.Second)
	m.FlattenStarted()
	m.FlattenEnded("flat", "done", 3*time.Second)
	m.FlattenStarted()
	m.FlattenEnded("cancelled", "lock_lost", time.Second)
	m.LockReleased(true)
	m.LockAcquired(500 * time.Millisecond)
	m.LockReleased(false)
	m.GateClosed("health")
	m.GateClosed("health")
	m.GateClosed("space")
	m.Discovered(5, time.Second, nil)
	m.Discovered(9, time.Second, errors.New("pool gone"))
	m.Pass(1, 2, 3, 4)
	m.WindowOpen(true)
	open := scrape(t, m)[`flattend_window_open`]
	m.WindowOpen(false)
	m.CopyupsVerified(10, 2)
	m.CopyupsVerified(6, 1)
	m.Backlog(7, 1<<30)
	ok, failed := time.Unix(1700000000, 0), time.Unix(1700000600, 500_000_000)
	m.PassEnded(ok, true)
	m.PassEnded(failed, false)
	m.NextWindowOpen(time.Time{})
	m.CloneFailures(2, 5)
	m.BuildInfo("1.2.3", "abc", "16.2.15")

	if lockHeld != "1" || during != "0.75" || open != "1" {
		t.Errorf("while held/running/open: lock_held %s, progress %s, window_open %s; want 1, 0.75, 1", lockHeld, during, open)
	}
	expect(t, scrape(t, m), map[string]string{
		`flattend_flattens_started_total`:                                      `3`,
		`flattend_flattens_ended_total{reason="window",result="cancelled"}`:    `1`,
		`flattend_flattens_ended_total{reason="done",result="flat"}`:           `1`,
		`flattend_flattens_ended_total{reason="lock_lost",result="cancelled"}`: `1`,
		`flattend_flatten_duration_seconds_count`:                              `1`, // flat ones only
		`flattend_flatten_duration_seconds_sum`:                                `3`,
		`flattend_flatten_progress_ratio`:                                      `0`,
		`flattend_copied_bytes_total`:                                          `150`,
		`flattend_lock_held`:                                                   `0`,
		`flattend_lock_lost_total`:                                             `1`,
		`flattend_lock_wait_seconds_count`:                                     `2`,
		`flattend_lock_wait_seconds_sum`:                                       `2.5`,
		`flattend_gate_closed_total{gate="health"}`:                            `2`,
		`flattend_gate_closed_total{gate="space"}`:                             `1`,
		`flattend_gate_closed_total{gate="recovery"}`:                          `0`,
		`flattend_discovered_clones`:                                           `5`, // the failed pass leaves the last good count
		`flattend_discovery_failures_total`:                                    `1`,
		`flattend_discovery_duration_seconds_count`:                            `2`,
		`flattend_pass_clones{outcome="flattened"}`:                            `1`,
		`flattend_pass_clones{outcome="failed"}`:                               `2`,
		`flattend_pass_clones{outcome="skipped"}`:                              `3`,
		`flattend_pass_clones{outcome="left"}`:                                 `4`,
		`flattend_window_open`:                                                 `0`,
		`flattend_copyup_objects_verified_total`:                               `16`,
		`flattend_lost_copyups_repaired_total`:                                 `3`,
		`flattend_backlog_clones`:                                              `7`,
		`flattend_backlog_bytes`:                                               `1.073741824e+09`,
		`flattend_last_pass_end_timestamp_seconds`:                             `1.7000006005e+09`,
		`flattend_last_pass_success_timestamp_seconds`:                         `1.7e+09`,
		`flattend_next_window_open_timestamp_seconds`:                          `0`,
		`flattend_failing_clones`:                                              `2`,
		`flattend_clone_consecutive_failures_max`:                              `5`,
		`flattend_build_info{librbd="16.2.15",revision="abc",version="1.2.3"}`: `1`,
	})
}

// A nil *Metrics (metrics disabled) takes every call.
func TestNilMetrics(t *testing.T) {
	var m *metrics.Metrics
	m.FlattenStarted()
	m.FlattenEnded("flat", "done", time.Second)
	m.Progress(1, 1)
	m.LockAcquired(time.Second)
	m.LockReleased(true)
	m.GateClosed("health")
	m.Discovered(1, time.Second, nil)
	m.Pass(1, 1, 1, 1)
	m.WindowOpen(true)
	m.CopyupsVerified(1, 1)
	m.BuildInfo("v", "r", "l")
	m.Backlog(1, 1)
	m.PassEnded(time.Now(), true)
	m.NextWindowOpen(time.Now())
	m.CloneFailures(1, 1)
}

// Serve answers /metrics and /status on a real socket and stops when its context ends; a busy
// address is an error at once.
func TestServe(t *testing.T) {
	m := metrics.New("hv1")
	m.Backlog(3, 0)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr, done, err := m.Serve(ctx, "127.0.0.1:0", metrics.Endpoints{Status: func() any { return map[string]int{"clones": 3} }})
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.Get("http://" + addr.String() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	got := samples(t, resp.Body)
	resp.Body.Close()
	if got["flattend_backlog_clones"] != "3" {
		t.Errorf("served flattend_backlog_clones = %q, want 3", got["flattend_backlog_clones"])
	}
	resp, err = http.Get("http://" + addr.String() + "/status")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" || string(body) != "{\n  \"clones\": 3\n}\n" {
		t.Errorf("/status: %s %q", ct, body)
	}
	if _, _, err := m.Serve(ctx, addr.String(), metrics.Endpoints{}); err == nil {
		t.Errorf("a second Serve on %s: no error", addr)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Serve ended with %v, want nil after its context ended", err)
	}
	if c, err := net.Dial("tcp", addr.String()); err == nil {
		c.Close()
		t.Errorf("%s still accepts connections after the context ended", addr)
	}
}
