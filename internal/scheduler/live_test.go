package scheduler

import (
	"context"
	"testing"
	"time"

	"github.com/flattend/flattend/internal/lock"
	"github.com/flattend/flattend/internal/rbdimage"
)

// stuckUsers is a fake whose Users call does not return until release: a Ceph call that hangs
// outside any flatten (paused OSDs, no op timeout).
type stuckUsers struct {
	*fakeSession
	entered chan struct{}
	release chan struct{}
}

func (f stuckUsers) Users(s rbdimage.Spec) ([]string, error) {
	close(f.entered)
	<-f.release
	return f.fakeSession.Users(s)
}

// The watchdog reads Stalled: a main loop stuck in a Ceph call that never returns, outside a
// flatten, must show as stalled (the watchdog then stops its pings), and moving again resets it.
func TestStalledCoversAStuckCephCall(t *testing.T) {
	c := &cluster{}
	stuck := stuckUsers{entered: make(chan struct{}), release: make(chan struct{})}
	connect := func(o lock.Options) (Locker, Flattener, error) {
		l, f, err := c.connect(o)
		stuck.fakeSession = f.(*fakeSession)
		return l, stuck, err
	}
	s := newTestScheduler(c, Config{})
	s.cfg.Connect = connect
	done := make(chan Summary)
	go func() { done <- s.work(context.Background(), clones("a")) }()
	<-stuck.entered
	const wedged = 50 * time.Millisecond
	time.Sleep(wedged) // a lower bound only: the loop cannot move while Users blocks
	if got := s.Stalled(); got < wedged {
		t.Errorf("Stalled() = %s while the loop is stuck in Users for %s or more", got, wedged)
	}
	close(stuck.release)
	if sum := <-done; sum.Flattened != 1 {
		t.Fatalf("summary %+v", sum)
	}
	if got := s.Stalled(); got >= wedged {
		t.Errorf("Stalled() = %s after the loop moved again", got)
	}
}

// A loop asleep on a timer on purpose (between passes, waiting for the window) is not stalled,
// however long the sleep; once the sleep is over it counts again.
func TestStalledNotWhileSleepingOnPurpose(t *testing.T) {
	s := newTestScheduler(&cluster{}, Config{})
	ctx, cancel := context.WithCancel(context.Background())
	slept := make(chan error)
	go func() { slept <- s.pause(ctx, time.Hour) }()
	for s.live.quiet.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	s.live.last.Store(time.Now().Add(-time.Hour).UnixNano()) // as if the sleep began an hour ago
	if got := s.Stalled(); got != 0 {
		t.Errorf("Stalled() = %s during a sleep on purpose", got)
	}
	cancel()
	<-slept
	if got := s.Stalled(); got > time.Second {
		t.Errorf("Stalled() = %s just after waking", got)
	}
}
