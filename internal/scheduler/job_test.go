package scheduler

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/flattend/flattend/internal/discovery"
	"github.com/flattend/flattend/internal/flattener"
	"github.com/flattend/flattend/internal/gate"
	"github.com/flattend/flattend/internal/lock"
	"github.com/flattend/flattend/internal/rbdimage"
)

// The job's rules over fakes: no cluster, a few milliseconds each. The real-cluster tests in
// test/e2e run the same rules against Ceph.

// cluster is a fake Ceph shared by the sessions a test makes: what happened, in order.
type cluster struct {
	mu       sync.Mutex
	events   []string
	sessions int
	gates    error // CheckGates' answer
	users    []string
	// flatten runs as the flatten of a clone (nil: succeeds at once).
	flatten func(ctx context.Context, sess int, s rbdimage.Spec) error
	held    int // slots held now
	maxHeld int
	marks   map[string]string // flattening marks on clones
}

func (c *cluster) log(format string, args ...any) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.events = append(c.events, fmt.Sprintf(format, args...))
}

func (c *cluster) Events() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.events)
}

func (c *cluster) connect(lock.Options) (Locker, Flattener, error) {
	c.mu.Lock()
	c.sessions++
	n := c.sessions
	c.mu.Unlock()
	c.log("connect %d", n)
	f := &fakeSession{c: c, n: n}
	return f, f, nil
}

// fakeSession is one session: a Locker and a Flattener.
type fakeSession struct {
	c      *cluster
	n      int
	leases []*fakeLease
}

func (f *fakeSession) Lock(ctx context.Context) (Lease, error) {
	f.c.mu.Lock()
	f.c.held++
	f.c.maxHeld = max(f.c.maxHeld, f.c.held)
	f.c.mu.Unlock()
	f.c.log("lock %d", f.n)
	l := &fakeLease{s: f, done: make(chan struct{})}
	f.leases = append(f.leases, l)
	return l, nil
}

func (f *fakeSession) StopWaiting() {}
func (f *fakeSession) Close(context.Context) error {
	f.c.log("close %d", f.n)
	return nil
}

func (f *fakeSession) Discover(context.Context, []discovery.Source) ([]discovery.Clone, error) {
	return nil, nil
}

func (f *fakeSession) CheckGates(gate.Config, string, uint64) error { return f.c.gates }
func (f *fakeSession) WatchGates(ctx context.Context, _ gate.Config, _ string, _ time.Duration, _ func() uint64) (context.Context, context.CancelFunc) {
	return context.WithCancel(ctx)
}

func (f *fakeSession) Inspect(s rbdimage.Spec) (rbdimage.Info, error) {
	return rbdimage.Info{Size: 4 << 20, Overlap: 4 << 20, Parent: &rbdimage.Spec{Pool: "p", Image: "golden", Snap: "s"}}, nil
}
func (f *fakeSession) Users(rbdimage.Spec) ([]string, error) { return f.c.users, nil }
func (f *fakeSession) VerifyCopyups(_ context.Context, s rbdimage.Spec) (flattener.Verified, error) {
	f.c.log("verify %s on %d", s, f.n)
	return flattener.Verified{}, nil
}
func (f *fakeSession) MarkFlattening(s rbdimage.Spec, _ string) (string, error) {
	f.c.log("mark %s", s)
	if f.c.marks == nil {
		f.c.marks = map[string]string{}
	}
	prev := f.c.marks[s.String()]
	f.c.marks[s.String()] = "marked"
	return prev, nil
}
func (f *fakeSession) ClearFlattening(s rbdimage.Spec) error {
	f.c.log("unmark %s", s)
	delete(f.c.marks, s.String())
	return nil
}
func (f *fakeSession) MarkInterrupted(s rbdimage.Spec, _ string) error {
	f.c.log("mark interrupted %s", s)
	return nil
}
func (f *fakeSession) Interrupted(rbdimage.Spec) (string, error) { return "", nil }
func (f *fakeSession) Flatten(ctx context.Context, s rbdimage.Spec, _ uint64, progress func(done, total uint64)) error {
	f.c.log("flatten %s on %d", s, f.n)
	if f.c.flatten != nil {
		return f.c.flatten(ctx, f.n, s)
	}
	return nil
}
func (f *fakeSession) RemoveSnapshotIfUnused(rbdimage.Spec) (bool, string, error) {
	return false, "", nil
}

// fakeLease can be lost by the test (lose), as a broken lock would be.
type fakeLease struct {
	s    *fakeSession
	mu   sync.Mutex
	err  error
	done chan struct{}
}

func (l *fakeLease) Image() string { return "p/lock" }
func (l *fakeLease) Context(parent context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancelCause(parent)
	go func() {
		select {
		case <-l.done:
			cancel(l.Err())
		case <-ctx.Done():
		}
	}()
	return ctx, func() { cancel(context.Canceled) }
}
func (l *fakeLease) Interrupted() *lock.Record { return nil }
func (l *fakeLease) Working(string) error      { return nil }
func (l *fakeLease) Progress(uint64, uint64)   {}
func (l *fakeLease) Err() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.err
}
func (l *fakeLease) lose() {
	l.mu.Lock()
	l.err = fmt.Errorf("%w: broken by another node", lock.ErrLost)
	l.mu.Unlock()
	close(l.done)
}
func (l *fakeLease) Unlock() error {
	l.s.c.mu.Lock()
	l.s.c.held--
	l.s.c.mu.Unlock()
	l.s.c.log("unlock %d", l.s.n)
	return l.Err()
}

func newTestScheduler(c *cluster, cfg Config) *Scheduler {
	cfg.BackoffMin, cfg.BackoffMax = time.Millisecond, time.Millisecond
	if cfg.GateInterval == 0 {
		cfg.GateInterval = time.Minute
	}
	return New(cfg, c.connect, nil, zap.NewNop())
}

func clones(names ...string) []discovery.Clone {
	var cs []discovery.Clone
	for _, n := range names {
		cs = append(cs, discovery.Clone{Spec: rbdimage.Spec{Pool: "p", Image: n}, Overlap: 4 << 20,
			Parent: rbdimage.Spec{Pool: "p", Image: "golden", Snap: "s"}})
	}
	return cs
}

// cancelled is what the flattener returns when its context ends.
func cancelled(ctx context.Context, s rbdimage.Spec) error {
	return fmt.Errorf("%s: %w: %w", s, flattener.ErrCancelled, context.Cause(ctx))
}

// The window's end cancels the running flatten, its lock is released, and the clone is left
// (not failed: it resumes next window).
func TestJobWindowEndCancelsAndReleases(t *testing.T) {
	c := &cluster{}
	started := make(chan struct{})
	c.flatten = func(ctx context.Context, _ int, s rbdimage.Spec) error {
		close(started)
		<-ctx.Done()
		return cancelled(ctx, s)
	}
	s := newTestScheduler(c, Config{})
	ctx, cancel := context.WithCancelCause(context.Background())
	go func() { <-started; cancel(ErrWindowClosed) }()
	sum := s.work(ctx, clones("a", "b"))
	if sum.Flattened != 0 || len(sum.Failed) != 0 || sum.Left != 2 {
		t.Fatalf("summary %+v, want both left, none failed", sum)
	}
	if c.held != 0 || !slices.Contains(c.Events(), "unlock 1") {
		t.Fatalf("lock not released: held %d, events %q", c.held, c.Events())
	}
	if _, failed := s.retries["p/a"]; failed {
		t.Error("a window's end counted as the clone's failure")
	}
}

// A lock lost mid-flatten cancels it; the session is closed, a new one made, and the flatten
// resumes there under a new lock. Every flatten is marked and verified first; the mark stays
// until a flatten ends cleanly.
func TestJobLockLossReconnectsAndResumesVerified(t *testing.T) {
	c := &cluster{}
	var first *fakeSession
	c.flatten = func(ctx context.Context, sess int, s rbdimage.Spec) error {
		if sess == 1 {
			first.leases[0].lose()
			<-ctx.Done()
			return cancelled(ctx, s)
		}
		return nil
	}
	s := newTestScheduler(c, Config{VerifyCopyups: true})
	sess, err := s.session()
	if err != nil {
		t.Fatal(err)
	}
	first = sess.Locker.(*fakeSession)
	sum := s.work(context.Background(), clones("a"))
	if sum.Flattened != 1 || !sum.Done() {
		t.Fatalf("summary %+v, want a flattened after the loss", sum)
	}
	want := []string{"connect 1", "lock 1", "mark p/a", "verify p/a on 1", "flatten p/a on 1", "unlock 1", "close 1",
		"connect 2", "lock 2", "mark p/a", "verify p/a on 2", "flatten p/a on 2", "unmark p/a", "unlock 2"}
	if got := c.Events(); !slices.Equal(got, want) {
		t.Fatalf("events\n got %q\nwant %q", got, want)
	}
}

// A closed gate is asked before the lock: no lock is taken, and the pass stops (health) or
// moves on to the next clone (space: only that pool lacks room).
func TestJobClosedGateSkips(t *testing.T) {
	c := &cluster{gates: &gate.Closed{Gate: "health", Reason: "HEALTH_ERR"}}
	s := newTestScheduler(c, Config{})
	sum := s.work(context.Background(), clones("a", "b"))
	if !sum.GateClosed || sum.Left != 2 || !strings.Contains(sum.Stopped, "health gate closed") {
		t.Fatalf("health gate: summary %+v", sum)
	}
	c = &cluster{gates: &gate.Closed{Gate: "space", Reason: "no room"}}
	s = newTestScheduler(c, Config{})
	sum = s.work(context.Background(), clones("a", "b"))
	if sum.GateClosed || len(sum.Skipped) != 2 || sum.Left != 0 {
		t.Fatalf("space gate: summary %+v", sum)
	}
	for _, e := range c.Events() {
		if strings.HasPrefix(e, "lock") || strings.HasPrefix(e, "flatten") {
			t.Fatalf("%q behind a closed gate (events %q)", e, c.Events())
		}
	}
}

// Gate answers asked before the lock are used only while fresh: after a longer wait they are
// asked again under the lock, and a gate that closed meanwhile stops the flatten.
func TestJobStaleGateAskedAgainUnderLock(t *testing.T) {
	c := &cluster{}
	s := newTestScheduler(c, Config{GateInterval: time.Nanosecond})
	sess, _ := s.session()
	pre, err := s.prepare(sess, clones("a")[0], false)
	if err != nil {
		t.Fatal(err)
	}
	c.gates = &gate.Closed{Gate: "recovery", Reason: "backfilling"}
	time.Sleep(time.Millisecond)
	lease, _ := sess.Lock(context.Background())
	err = s.underLease(context.Background(), sess, lease, clones("a")[0], pre)
	if !errors.Is(err, gate.ErrClosed) {
		t.Fatalf("underLease after the gate closed = %v, want a closed gate", err)
	}
	if slices.Contains(c.Events(), "flatten p/a on 1") {
		t.Fatal("flattened although the gate closed while waiting")
	}
}

// A clone in use is never flattened under in_use: skip. The decision is made under the lock: a
// holder killed mid-flatten still shows as a user until its watch times out, which the lock's
// takeover waits for.
func TestJobInUseSkipped(t *testing.T) {
	c := &cluster{users: []string{"watcher 10.0.0.1:0/1"}}
	s := newTestScheduler(c, Config{})
	sum := s.work(context.Background(), clones("a"))
	if len(sum.Skipped) != 1 || !strings.Contains(sum.Skipped[0], "in use by another client") {
		t.Fatalf("summary %+v", sum)
	}
	if want := []string{"connect 1", "lock 1", "unlock 1"}; !slices.Equal(c.Events(), want) {
		t.Fatalf("events %q, want %q (no flatten)", c.Events(), want)
	}
	c.users = nil // the user went away while this node waited for the lock
	if sum = s.work(context.Background(), clones("b")); sum.Flattened != 1 {
		t.Fatalf("clone no longer in use: %+v", sum)
	}
}

// Budgets stop the pass: no further flatten once max_per_window is reached.
func TestJobBudgetStopsPass(t *testing.T) {
	c := &cluster{}
	s := newTestScheduler(c, Config{MaxPerWindow: 1})
	sum := s.work(context.Background(), clones("a", "b", "c"))
	if sum.Flattened != 1 || sum.Left != 2 || !strings.Contains(sum.Stopped, "max_per_window (1) reached") {
		t.Fatalf("summary %+v", sum)
	}
}

// A failing flatten is counted, waits its retry, and the pass goes on; at most one slot is ever
// held by the job.
func TestJobFailureRetriedLater(t *testing.T) {
	c := &cluster{}
	c.flatten = func(_ context.Context, _ int, s rbdimage.Spec) error {
		if s.Image == "a" {
			return errors.New("EIO")
		}
		return nil
	}
	s := newTestScheduler(c, Config{RetryAfter: time.Hour})
	sum := s.work(context.Background(), clones("a", "b"))
	if len(sum.Failed) != 1 || sum.Flattened != 1 || c.maxHeld != 1 {
		t.Fatalf("summary %+v, max held %d", sum, c.maxHeld)
	}
	sum = s.work(context.Background(), clones("a"))
	if len(sum.Skipped) != 1 || !strings.Contains(sum.Skipped[0], "failed 1 time(s)") {
		t.Fatalf("second pass: %+v", sum)
	}
}
