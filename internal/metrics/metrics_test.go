package metrics

import (
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"
)

// /healthz follows the main loop's liveness: 200 while it moves, 503 once it stalls as long as
// the limit.
func TestHealthz(t *testing.T) {
	var stall time.Duration
	mux := New("h1").Mux(Endpoints{Stalled: func() time.Duration { return stall }, StallLimit: time.Minute})
	for _, c := range []struct {
		stall time.Duration
		code  int
	}{{0, 200}, {59 * time.Second, 200}, {time.Minute, 503}, {time.Hour, 503}} {
		stall = c.stall
		rec := httptest.NewRecorder()
		mux.ServeHTTP(rec, httptest.NewRequest("GET", "/healthz", nil))
		if rec.Code != c.code {
			t.Errorf("stalled %s: /healthz %d %q, want %d", c.stall, rec.Code, rec.Body.String(), c.code)
		}
	}
}

// Names lists exactly the flattend_* families the registry exposes once every series is set.
func TestNamesAreTheRegisteredFamilies(t *testing.T) {
	m := New("h1")
	m.FlattenStarted()
	m.FlattenEnded("flat", "done", time.Second)
	m.Progress(0.5, 1)
	m.LockAcquired(time.Second)
	m.LockReleased(true)
	m.GateClosed("health")
	m.Discovered(1, time.Second, nil)
	m.Discovered(1, time.Second, errTest{})
	m.Pass(1, 0, 0, 0)
	m.WindowOpen(true)
	m.CopyupsVerified(1, 1)
	m.BuildInfo("v", "r", "l")
	m.Backlog(1, 1)
	m.PassEnded(time.Now(), true)
	m.NextWindowOpen(time.Now())
	m.CloneFailures(1, 1)
	fams, err := m.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, f := range fams {
		if strings.HasPrefix(f.GetName(), "flattend_") {
			got = append(got, f.GetName())
		}
	}
	want := m.Names()
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("gathered %q\nNames() %q", got, want)
	}
	rec := httptest.NewRecorder()
	m.Mux(Endpoints{}).ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	for _, w := range []string{"flattend_node_info{node=\"h1\"} 1", "flattend_backlog_clones 1"} {
		if !strings.Contains(rec.Body.String(), w) {
			t.Errorf("/metrics lacks %s", w)
		}
	}
	for _, path := range []string{"/healthz", "/status"} { // not asked for: not served
		rec := httptest.NewRecorder()
		m.Mux(Endpoints{}).ServeHTTP(rec, httptest.NewRequest("GET", path, nil))
		if rec.Code != http.StatusNotFound {
			t.Errorf("%s without its endpoint: %d", path, rec.Code)
		}
	}
}

type errTest struct{}

func (errTest) Error() string { return "test" }
