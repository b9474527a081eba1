package scheduler

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"runtime"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/flattend/flattend/internal/lock"
	"github.com/flattend/flattend/internal/rbdimage"
)

// closingSession is a fakeSession that knows when it was closed, fails its release when told
// to, and may hold its Close back (a librbd call still running on its connection).
type closingSession struct {
	*fakeSession
	mu          sync.Mutex
	closed      bool
	failRelease bool
	busy        chan struct{} // Close waits for it to close (nil: no call running)
}

type failingLease struct {
	Lease
	s *closingSession
}

func (l failingLease) Unlock() error {
	err := l.Lease.Unlock()
	if err == nil && l.s.failRelease {
		err = errors.New("releasing lock on p/lock: Connection timed out") // not a loss
	}
	return err
}

func (f *closingSession) Lock(ctx context.Context) (Lease, error) {
	l, err := f.fakeSession.Lock(ctx)
	if err != nil {
		return nil, err
	}
	return failingLease{l, f}, nil
}

func (f *closingSession) Close(ctx context.Context) error {
	if f.busy != nil {
		select {
		case <-f.busy:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	f.mu.Lock()
	f.closed = true
	f.mu.Unlock()
	return f.fakeSession.Close(ctx)
}

func (f *closingSession) isClosed() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.closed
}

// use records a call on this session, and a use after Close as such.
func (f *closingSession) use(what string) {
	if f.isClosed() {
		f.c.log("%s on closed session %d", what, f.n)
		return
	}
	f.c.log("%s on %d", what, f.n)
}

func (f *closingSession) Interrupted(s rbdimage.Spec) (string, error) {
	f.use("interrupted?")
	return "", nil
}

func (f *closingSession) RemoveSnapshotIfUnused(snap rbdimage.Spec) (bool, string, error) {
	f.use("remove " + snap.String())
	return true, "", nil
}

// closingCluster hands out closingSessions, configured by setup.
func closingCluster(c *cluster, setup func(*closingSession)) (Connector, *[]*closingSession) {
	var made []*closingSession
	return func(o lock.Options) (Locker, Flattener, error) {
		l, _, err := c.connect(o)
		cs := &closingSession{fakeSession: l.(*fakeSession)}
		if setup != nil {
			setup(cs)
		}
		made = append(made, cs)
		return cs, cs, err
	}, &made
}

// A release that fails discards the session (its connection is shut down); the parent snapshot
// cleanup of the flattened clone then runs on a new session, never on the closed one.
func TestCleanupNeverOnAClosedSession(t *testing.T) {
	c := &cluster{}
	connect, _ := closingCluster(c, func(cs *closingSession) { cs.failRelease = cs.n == 1 })
	s := newTestScheduler(c, Config{CleanupSnapshots: regexp.MustCompile(`^s$`)})
	s.cfg.Connect = connect
	if sum := s.work(context.Background(), clones("a")); sum.Flattened != 1 {
		t.Fatalf("summary %+v", sum)
	}
	want := []string{"connect 1", "lock 1", "mark p/a", "flatten p/a on 1", "unmark p/a", "unlock 1", "close 1",
		"connect 2", "interrupted? on 2", "remove p/golden@s on 2"}
	if got := c.Events(); !slices.Equal(got, want) {
		t.Fatalf("events\n got %q\nwant %q", got, want)
	}
}

// A discarded session whose Close outlasts its wait (a librbd call still running) is not
// forgotten: the scheduler's Close waits for it to shut its connection down.
func TestDiscardedSessionIsShutDownLater(t *testing.T) {
	c := &cluster{}
	busy := make(chan struct{})
	var first *fakeSession
	connect, made := closingCluster(c, func(cs *closingSession) {
		if cs.n == 1 {
			cs.busy, first = busy, cs.fakeSession
		}
	})
	c.flatten = func(ctx context.Context, sess int, s rbdimage.Spec) error {
		if sess == 1 {
			first.leases[0].lose()
			<-ctx.Done()
			return cancelled(ctx, s)
		}
		return nil
	}
	s := newTestScheduler(c, Config{})
	s.cfg.Connect = connect
	s.closeWait = time.Millisecond
	if sum := s.work(context.Background(), clones("a")); sum.Flattened != 1 {
		t.Fatalf("summary %+v", sum)
	}
	if (*made)[0].isClosed() {
		t.Fatal("session 1 closed while its librbd call was still running")
	}
	close(busy) // the call returns
	s.Close(context.Background())
	for i, cs := range *made {
		if !cs.isClosed() {
			t.Errorf("session %d never closed: its connection leaks", i+1)
		}
	}
}

// Losing and regaining the lock many times leaves no goroutine behind once the scheduler is
// closed.
func TestNoGoroutineOutlivesLockLosses(t *testing.T) {
	base := runtime.NumGoroutine()
	c := &cluster{}
	var mu sync.Mutex
	sessions := map[int]*fakeSession{}
	c.flatten = func(ctx context.Context, sess int, s rbdimage.Spec) error {
		if sess > 6 {
			return nil
		}
		mu.Lock()
		f := sessions[sess]
		mu.Unlock()
		f.leases[len(f.leases)-1].lose()
		<-ctx.Done()
		return cancelled(ctx, s)
	}
	connect := func(o lock.Options) (Locker, Flattener, error) {
		l, f, err := c.connect(o)
		mu.Lock()
		sessions[l.(*fakeSession).n] = l.(*fakeSession)
		mu.Unlock()
		return l, f, err
	}
	s := newTestScheduler(c, Config{})
	s.cfg.Connect = connect
	if sum := s.work(context.Background(), clones("a", "b", "c")); sum.Flattened != 3 {
		t.Fatalf("summary %+v", sum)
	}
	if c.sessions != 7 {
		t.Fatalf("%d sessions, want 7 (6 losses)", c.sessions)
	}
	s.Close(context.Background())
	// Goroutines end asynchronously after their context is cancelled: give them time to go.
	n := runtime.NumGoroutine()
	for deadline := time.Now().Add(5 * time.Second); n > base && time.Now().Before(deadline); n = runtime.NumGoroutine() {
		time.Sleep(10 * time.Millisecond)
	}
	if n > base {
		buf := make([]byte, 1<<20)
		t.Fatalf("%d goroutines after the scheduler closed, %d before:\n%s", n, base, buf[:runtime.Stack(buf, true)])
	}
}

// A flatten that failed on ceph.op_timeout is verified before its resume (like every flatten): a
// copy-up cut short may have left the object map saying "exists" for an object never written.
// Its mark stays until the resumed flatten ends cleanly, on a new connection.
func TestTimedOutFlattenVerifiedBeforeResume(t *testing.T) {
	c := &cluster{}
	calls := 0
	c.flatten = func(_ context.Context, _ int, s rbdimage.Spec) error {
		if calls++; calls == 1 {
			return fmt.Errorf("%s: flatten: %w", s, syscall.ETIMEDOUT)
		}
		return nil
	}
	s := newTestScheduler(c, Config{VerifyCopyups: true})
	if sum := s.work(context.Background(), clones("a")); len(sum.Failed) != 1 {
		t.Fatalf("first pass: %+v", sum)
	}
	delete(s.retries, "p/a") // due again now
	if sum := s.work(context.Background(), clones("a")); sum.Flattened != 1 {
		t.Fatalf("second pass: %+v", sum)
	}
	// The timed-out connection is not reused (it may own the clone's lock with no handle left:
	// TestRetryAfter in test/e2e): the retry runs on a new one.
	want := []string{"connect 1", "lock 1", "mark p/a", "verify p/a on 1", "flatten p/a on 1", "unlock 1", "close 1",
		"connect 2", "lock 2", "mark p/a", "verify p/a on 2", "flatten p/a on 2", "unmark p/a", "unlock 2"}
	if got := c.Events(); !slices.Equal(got, want) {
		t.Fatalf("events\n got %q\nwant %q", got, want)
	}
}
