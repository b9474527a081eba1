package scheduler

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/flattend/flattend/internal/discovery"
	"github.com/flattend/flattend/internal/fleet"
	"github.com/flattend/flattend/internal/lock"
	"github.com/flattend/flattend/internal/rbdimage"
	"github.com/flattend/flattend/internal/window"
)

// reportingSession is a fake session that finds clones and keeps the fleet summaries written.
type reportingSession struct {
	*fakeSession
	found       []discovery.Clone
	discoverErr error
	written     *[]fleet.Entry
}

func (r reportingSession) Discover(context.Context, []discovery.Source) ([]discovery.Clone, error) {
	return r.found, r.discoverErr
}

func (r reportingSession) WriteSummary(e fleet.Entry) error {
	*r.written = append(*r.written, e)
	return errors.New("the cluster said no") // logged, never fails the pass
}

func reportingScheduler(t *testing.T, c *cluster, found []discovery.Clone, discoverErr error) (*Scheduler, *[]fleet.Entry) {
	t.Helper()
	w, err := window.New("0 1 * * *", 6*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	written := &[]fleet.Entry{}
	connect := func(o lock.Options) (Locker, Flattener, error) {
		l, _, err := c.connect(o)
		r := reportingSession{fakeSession: l.(*fakeSession), found: found, discoverErr: discoverErr, written: written}
		return r, r, err
	}
	cfg := Config{Version: "v-test", Window: w, BackoffMin: time.Millisecond, BackoffMax: time.Millisecond, GateInterval: time.Minute}
	return New(cfg, connect, nil, zap.NewNop()), written
}

// A pass writes its summary after each flatten (running, with the backlog so far) and at its end
// (result, backlog left, next window); a failed write does not fail it.
func TestPassWritesFleetSummary(t *testing.T) {
	c := &cluster{}
	c.flatten = func(_ context.Context, _ int, s rbdimage.Spec) error {
		if s.Image == "b" {
			return errors.New("boom")
		}
		return nil
	}
	s, written := reportingScheduler(t, c, clones("a", "b", "c"), nil)
	before := time.Now()
	sum, err := s.Pass(context.Background())
	if err != nil || sum.Flattened != 2 || len(sum.Failed) != 1 {
		t.Fatalf("pass: %+v, %v", sum, err)
	}
	got := *written
	if len(got) != 4 {
		t.Fatalf("%d summaries written, want 3 flattens + the end: %+v", len(got), got)
	}
	for i, want := range []struct {
		result string
		left   int
	}{{fleet.Running, 2}, {fleet.Running, 2}, {fleet.Running, 1}, {fleet.Failed, 1}} {
		if e := got[i]; e.Result != want.result || e.ClonesLeft != want.left || e.BytesLeft != uint64(want.left)*4<<20 {
			t.Errorf("summary %d: result %q, %d clones (%d bytes) left; want %q, %d", i, e.Result, e.ClonesLeft, e.BytesLeft, want.result, want.left)
		}
	}
	end := got[3]
	if end.Version != "v-test" || end.Discovered != 3 || end.Flattened != 2 || end.Failed != 1 ||
		!strings.Contains(end.LastError, "p/b") || end.PassEnded.IsZero() || end.PassStarted.Before(before.Add(-time.Second)) ||
		!end.NextWindow.After(before) || end.NextWindow.Minute() != 0 || end.PeriodSec != 86400 || end.WindowSec != 6*3600 {
		t.Errorf("end of pass: %+v", end)
	}
	if got[0].PassEnded != (time.Time{}) {
		t.Errorf("a running pass has an end: %+v", got[0])
	}
}

func TestPassSummaryResults(t *testing.T) {
	s, written := reportingScheduler(t, &cluster{}, clones("a"), nil)
	if _, err := s.Pass(context.Background()); err != nil {
		t.Fatal(err)
	}
	if w := *written; w[len(w)-1].Result != fleet.OK || w[len(w)-1].ClonesLeft != 0 {
		t.Errorf("all flat: %+v", w[len(w)-1])
	}

	s, written = reportingScheduler(t, &cluster{}, nil, errors.New("listing pool p: EIO"))
	if _, err := s.Pass(context.Background()); err == nil {
		t.Fatal("discovery error not returned")
	}
	if w := *written; len(w) != 1 || w[0].Result != fleet.Failed || w[0].LastError != "listing pool p: EIO" {
		t.Errorf("failed discovery: %+v", w)
	}

	c := &cluster{}
	ctx, cancel := context.WithCancelCause(context.Background())
	c.flatten = func(ctx context.Context, _ int, s rbdimage.Spec) error {
		cancel(ErrWindowClosed)
		return cancelled(ctx, s)
	}
	s, written = reportingScheduler(t, c, clones("a", "b"), nil)
	if _, err := s.Pass(ctx); err != nil {
		t.Fatal(err)
	}
	if w := *written; w[len(w)-1].Result != fleet.Cancelled || w[len(w)-1].ClonesLeft != 2 {
		t.Errorf("window closed: %+v", w)
	}

	// Named clones (once --image) are not the node's backlog: nothing is written.
	s, written = reportingScheduler(t, &cluster{}, nil, nil)
	if sum := s.FlattenNamed(context.Background(), clones("x")); sum.Flattened != 1 || len(*written) != 0 {
		t.Errorf("once --image: %+v, wrote %+v", sum, *written)
	}
}
