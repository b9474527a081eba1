package scheduler

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/flattend/flattend/internal/discovery"
	"github.com/flattend/flattend/internal/lock"
	"github.com/flattend/flattend/internal/metrics"
	"github.com/flattend/flattend/internal/rbdimage"
	"github.com/flattend/flattend/internal/window"
)

// /status and the metrics the alerts use, over passes on fakes: backlog, failing clones, the
// last pass, the running flatten and the window.

// discoveringSession is a fakeSession whose discovery finds the test's clones and whose flatten
// of one clone reports a quarter done, then waits for the test.
type discoveringSession struct {
	*fakeSession
	clones  []discovery.Clone
	fail    map[string]bool // image → its flatten fails
	slow    string          // this image's flatten stops at 1 of 4 objects until release
	midway  chan struct{}
	release chan struct{}
}

func (d *discoveringSession) Discover(context.Context, []discovery.Source) ([]discovery.Clone, error) {
	return slices.Clone(d.clones), nil
}

func (d *discoveringSession) Flatten(ctx context.Context, s rbdimage.Spec, _ uint64, progress func(done, total uint64)) error {
	if d.fail[s.Image] {
		return errors.New("EIO")
	}
	if s.Image == d.slow {
		progress(1, 4)
		d.midway <- struct{}{}
		<-d.release
		progress(4, 4)
	}
	return nil
}

// statusV1 is /status's documented schema (docs/operations.md), owned by this test: a field the
// product renames, removes or adds without documenting fails it.
type statusV1 struct {
	Node   string `json:"node"`
	State  string `json:"state"`
	Detail string `json:"detail"`
	Window struct {
		Open     bool       `json:"open"`
		OpensAt  *time.Time `json:"opens_at"`
		ClosesAt *time.Time `json:"closes_at"`
	} `json:"window"`
	Flatten *struct {
		Image        string    `json:"image"`
		Lock         string    `json:"lock"`
		StartedAt    time.Time `json:"started_at"`
		Bytes        uint64    `json:"bytes"`
		ObjectsDone  uint64    `json:"objects_done"`
		ObjectsTotal uint64    `json:"objects_total"`
		Progress     float64   `json:"progress_ratio"`
	} `json:"flatten"`
	Backlog *struct {
		Clones       int       `json:"clones"`
		Bytes        uint64    `json:"bytes"`
		DiscoveredAt time.Time `json:"discovered_at"`
	} `json:"backlog"`
	LastPass *struct {
		EndedAt       time.Time  `json:"ended_at"`
		Result        string     `json:"result"`
		Error         string     `json:"error"`
		Flattened     int        `json:"flattened"`
		Failed        int        `json:"failed"`
		Skipped       int        `json:"skipped"`
		Left          int        `json:"left"`
		LastSuccessAt *time.Time `json:"last_success_at"`
	} `json:"last_pass"`
	FailingClones []struct {
		Image    string    `json:"image"`
		Failures int       `json:"consecutive_failures"`
		NextTry  time.Time `json:"next_try"`
	} `json:"failing_clones"`
}

// statusKeys are the keys /status has over the test (last_pass.error is omitted when empty).
var statusKeys = []string{"backlog", "backlog.bytes", "backlog.clones", "backlog.discovered_at", "detail",
	"failing_clones", "failing_clones[].consecutive_failures", "failing_clones[].image", "failing_clones[].next_try",
	"flatten", "flatten.bytes", "flatten.image", "flatten.lock", "flatten.objects_done", "flatten.objects_total",
	"flatten.progress_ratio", "flatten.started_at", "last_pass", "last_pass.ended_at", "last_pass.error", "last_pass.failed",
	"last_pass.flattened", "last_pass.last_success_at", "last_pass.left", "last_pass.result", "last_pass.skipped",
	"node", "state", "window", "window.closes_at", "window.open", "window.opens_at"}

type fixture struct {
	t    *testing.T
	srv  *httptest.Server
	sess *discoveringSession
}

func (f fixture) get(path string) string {
	f.t.Helper()
	resp, err := http.Get(f.srv.URL + path)
	if err != nil {
		f.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		f.t.Fatal(err)
	}
	return string(b)
}

// status decodes /status strictly into the test's schema, and collects its keys into seen.
func (f fixture) status(seen map[string]bool) statusV1 {
	f.t.Helper()
	body := f.get("/status")
	dec := json.NewDecoder(strings.NewReader(body))
	dec.DisallowUnknownFields()
	var st statusV1
	if err := dec.Decode(&st); err != nil {
		f.t.Fatalf("/status does not match the documented schema: %v\n%s", err, body)
	}
	var raw any
	if err := json.Unmarshal([]byte(body), &raw); err != nil {
		f.t.Fatal(err)
	}
	keys("", raw, seen)
	return st
}

func keys(prefix string, v any, seen map[string]bool) {
	switch v := v.(type) {
	case map[string]any:
		for k, e := range v {
			p := strings.TrimPrefix(prefix+"."+k, ".")
			seen[p] = true
			keys(p, e, seen)
		}
	case []any:
		for _, e := range v {
			keys(prefix+"[]", e, seen)
		}
	}
}

// metric is the value of the series named exactly line's start in /metrics.
func (f fixture) metric(series string) string {
	f.t.Helper()
	for _, l := range strings.Split(f.get("/metrics"), "\n") {
		if v, ok := strings.CutPrefix(l, series+" "); ok {
			return v
		}
	}
	f.t.Fatalf("/metrics lacks %s", series)
	return ""
}

func TestStatusAndMetricsOverPasses(t *testing.T) {
	c := &cluster{}
	d := &discoveringSession{clones: clones("a", "b", "c"), fail: map[string]bool{"a": true}, slow: "b",
		midway: make(chan struct{}), release: make(chan struct{})}
	connect := func(o lock.Options) (Locker, Flattener, error) {
		l, _, err := c.connect(o)
		d.fakeSession = l.(*fakeSession)
		return d, d, err
	}
	m := metrics.New("h1")
	s := New(Config{Node: "h1", RetryAfter: time.Nanosecond, Metrics: m, GateInterval: time.Minute,
		BackoffMin: time.Millisecond, BackoffMax: time.Millisecond}, connect, nil, zap.NewNop())
	srv := httptest.NewServer(m.Mux(metrics.Endpoints{Status: func() any { return s.Report() }}))
	defer srv.Close()
	f := fixture{t: t, srv: srv, sess: d}
	seen := map[string]bool{}

	if st := f.status(seen); st.State != "starting" || st.Backlog != nil || st.LastPass != nil || st.Flatten != nil {
		t.Errorf("before any pass: %+v", st)
	}

	// Pass 1: a fails, b is watched mid-flatten, c flattens.
	type result struct {
		sum Summary
		err error
	}
	done := make(chan result)
	go func() { sum, err := s.Pass(context.Background()); done <- result{sum, err} }()
	<-d.midway
	st := f.status(seen)
	if st.State != "flattening" || st.Flatten == nil || st.Flatten.Image != "p/b" || st.Flatten.Lock != "p/lock" ||
		st.Flatten.ObjectsDone != 1 || st.Flatten.ObjectsTotal != 4 || st.Flatten.Progress != 0.25 || st.Flatten.Bytes != 4<<20 {
		t.Errorf("mid-flatten: state %q, flatten %+v", st.State, st.Flatten)
	}
	if st.Backlog == nil || st.Backlog.Clones != 3 || st.Backlog.Bytes != 12<<20 {
		t.Errorf("mid-flatten backlog %+v, want 3 clones, 12 MiB", st.Backlog)
	}
	if len(st.FailingClones) != 1 || st.FailingClones[0].Image != "p/a" || st.FailingClones[0].Failures != 1 {
		t.Errorf("failing clones %+v, want p/a once", st.FailingClones)
	}
	if v := f.metric("flattend_flatten_progress_ratio"); v != "0.25" {
		t.Errorf("flattend_flatten_progress_ratio %s mid-flatten", v)
	}
	if v := f.metric("flattend_clone_consecutive_failures_max"); v != "1" {
		t.Errorf("flattend_clone_consecutive_failures_max %s after one failure", v)
	}
	d.release <- struct{}{}
	r := <-done
	if r.err != nil || r.sum.Flattened != 2 || len(r.sum.Failed) != 1 {
		t.Fatalf("pass 1: %+v, %v", r.sum, r.err)
	}
	st = f.status(seen)
	if st.LastPass == nil || st.LastPass.Result != "failed" || st.LastPass.Error != "p/a: EIO" || st.LastPass.Flattened != 2 || st.LastPass.Failed != 1 ||
		st.LastPass.LastSuccessAt != nil || st.Flatten != nil {
		t.Errorf("after pass 1: last pass %+v, flatten %+v", st.LastPass, st.Flatten)
	}
	if st.Backlog == nil || st.Backlog.Clones != 1 || st.Backlog.Bytes != 4<<20 {
		t.Errorf("after pass 1 backlog %+v, want 1 clone, 4 MiB", st.Backlog)
	}
	for series, want := range map[string]string{"flattend_backlog_clones": "1", "flattend_backlog_bytes": "4.194304e+06",
		"flattend_last_pass_success_timestamp_seconds": "0", "flattend_failing_clones": "1"} {
		if v := f.metric(series); v != want {
			t.Errorf("after pass 1: %s %s, want %s", series, v, want)
		}
	}
	if v := f.metric("flattend_last_pass_end_timestamp_seconds"); v == "0" {
		t.Error("after pass 1: flattend_last_pass_end_timestamp_seconds 0")
	}

	// Pass 2: discovery finds a again (b and c are flat); it fails a second time in a row.
	d.clones = clones("a")
	go func() { sum, err := s.Pass(context.Background()); done <- result{sum, err} }()
	if r = <-done; len(r.sum.Failed) != 1 {
		t.Fatalf("pass 2: %+v, %v", r.sum, r.err)
	}
	if v := f.metric("flattend_clone_consecutive_failures_max"); v != "2" {
		t.Errorf("flattend_clone_consecutive_failures_max %s after two failures in a row", v)
	}

	// Pass 3: a flattens: nothing left, nothing failing, a successful pass.
	d.fail = nil
	go func() { sum, err := s.Pass(context.Background()); done <- result{sum, err} }()
	if r = <-done; r.sum.Flattened != 1 {
		t.Fatalf("pass 3: %+v, %v", r.sum, r.err)
	}
	st = f.status(seen)
	if st.LastPass == nil || st.LastPass.Result != "ok" || st.LastPass.LastSuccessAt == nil ||
		st.Backlog == nil || st.Backlog.Clones != 0 || len(st.FailingClones) != 0 {
		t.Errorf("after pass 3: last pass %+v, backlog %+v, failing %+v", st.LastPass, st.Backlog, st.FailingClones)
	}
	for series, want := range map[string]string{"flattend_backlog_clones": "0", "flattend_backlog_bytes": "0",
		"flattend_failing_clones": "0", "flattend_clone_consecutive_failures_max": "0"} {
		if v := f.metric(series); v != want {
			t.Errorf("after pass 3: %s %s, want %s", series, v, want)
		}
	}
	if v := f.metric("flattend_last_pass_success_timestamp_seconds"); v == "0" {
		t.Error("after pass 3: flattend_last_pass_success_timestamp_seconds 0")
	}

	// The main loop waiting for a window that opens in two hours.
	opens := time.Now().UTC().Add(2 * time.Hour).Truncate(time.Minute)
	w, err := window.New(fmt.Sprintf("CRON_TZ=UTC %d %d * * *", opens.Minute(), opens.Hour()), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	s.cfg.Window = w
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error)
	go func() { ran <- s.Run(ctx) }()
	for st = f.status(seen); st.State != "waiting_for_window"; st = f.status(seen) {
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	if err := <-ran; err != nil {
		t.Fatal(err)
	}
	if st.Window.Open || st.Window.OpensAt == nil || !st.Window.OpensAt.Equal(opens) ||
		st.Window.ClosesAt == nil || !st.Window.ClosesAt.Equal(opens.Add(time.Hour)) {
		t.Errorf("window %+v, want closed, opening %s for an hour", st.Window, opens)
	}
	if v, err := strconv.ParseFloat(f.metric("flattend_next_window_open_timestamp_seconds"), 64); err != nil || v != float64(opens.Unix()) {
		t.Errorf("flattend_next_window_open_timestamp_seconds %v (%v), want %d", v, err, opens.Unix())
	}

	var got []string
	for k := range seen {
		got = append(got, k)
	}
	slices.Sort(got)
	if !slices.Equal(got, statusKeys) {
		t.Errorf("/status keys changed (update docs/operations.md and statusKeys):\n got %q\nwant %q", got, statusKeys)
	}
}
