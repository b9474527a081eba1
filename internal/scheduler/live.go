package scheduler

import (
	"context"
	"sync/atomic"
	"time"

	"github.com/flattend/flattend/internal/discovery"
	"github.com/flattend/flattend/internal/flattener"
	"github.com/flattend/flattend/internal/gate"
	"github.com/flattend/flattend/internal/rbdimage"
)

// liveness is what the systemd watchdog reads (Stalled): when the main loop last moved. It moves
// when a call into Ceph returns (the session's methods below tick), when a flatten reports
// progress (progress.at), and while it sleeps on a timer on purpose (between passes, waiting for
// the window or for a busy slot). A loop stuck in a call that never returns stops moving.
type liveness struct {
	last  atomic.Int64 // Unix ns of the last move
	quiet atomic.Int64 // Unix ns until which the loop sleeps on purpose; 0: not asleep
}

func (l *liveness) tick() {
	l.last.Store(time.Now().UnixNano())
	l.quiet.Store(0)
}

// sleeping says the loop waits on a timer for d: not stalled until then.
func (l *liveness) sleeping(d time.Duration) {
	now := time.Now()
	l.last.Store(now.UnixNano())
	l.quiet.Store(now.Add(d).UnixNano())
}

// Stalled reports how long the main loop has gone without moving (0 while it sleeps on purpose):
// a Ceph call that does not return, a flatten that makes no progress. The watchdog stops its
// pings when this reaches its period, and systemd restarts the daemon.
func (s *Scheduler) Stalled() time.Duration {
	now := time.Now().UnixNano()
	quiet := s.live.quiet.Load()
	if now < quiet {
		return 0
	}
	last := max(s.live.last.Load(), s.progress.at.Load(), quiet)
	if last == 0 {
		return 0 // not started
	}
	return time.Duration(now - last)
}

// pause sleeps d (or until ctx ends) on purpose: the watchdog is fed meanwhile.
func (s *Scheduler) pause(ctx context.Context, d time.Duration) error {
	s.live.sleeping(d)
	defer s.live.tick()
	return sleep(ctx, d)
}

// The session's calls tick the liveness when they return; they shadow those of the embedded
// Locker and Flattener, so that the job's code and the fakes stay as they are.

func (s *session) Lock(ctx context.Context) (Lease, error) {
	defer s.live.tick()
	l, err := s.Locker.Lock(ctx)
	if err != nil {
		return nil, err
	}
	return tickingLease{l, s.live}, nil
}

func (s *session) Discover(ctx context.Context, sources []discovery.Source) ([]discovery.Clone, error) {
	defer s.live.tick()
	return s.Flattener.Discover(ctx, sources)
}

func (s *session) CheckGates(g gate.Config, pool string, need uint64) error {
	defer s.live.tick()
	return s.Flattener.CheckGates(g, pool, need)
}

func (s *session) Inspect(spec rbdimage.Spec) (rbdimage.Info, error) {
	defer s.live.tick()
	return s.Flattener.Inspect(spec)
}

func (s *session) Users(spec rbdimage.Spec) ([]string, error) {
	defer s.live.tick()
	return s.Flattener.Users(spec)
}

func (s *session) VerifyCopyups(ctx context.Context, spec rbdimage.Spec) (flattener.Verified, error) {
	defer s.live.tick()
	return s.Flattener.VerifyCopyups(ctx, spec)
}

func (s *session) MarkFlattening(spec rbdimage.Spec, note string) (string, error) {
	defer s.live.tick()
	return s.Flattener.MarkFlattening(spec, note)
}

func (s *session) ClearFlattening(spec rbdimage.Spec) error {
	defer s.live.tick()
	return s.Flattener.ClearFlattening(spec)
}

func (s *session) MarkInterrupted(spec rbdimage.Spec, note string) error {
	defer s.live.tick()
	return s.Flattener.MarkInterrupted(spec, note)
}

func (s *session) Interrupted(spec rbdimage.Spec) (string, error) {
	defer s.live.tick()
	return s.Flattener.Interrupted(spec)
}

func (s *session) Flatten(ctx context.Context, spec rbdimage.Spec, bytesPerSecond uint64, progress func(done, total uint64)) error {
	defer s.live.tick()
	return s.Flattener.Flatten(ctx, spec, bytesPerSecond, progress)
}

func (s *session) RemoveSnapshotIfUnused(snap rbdimage.Spec) (bool, string, error) {
	defer s.live.tick()
	return s.Flattener.RemoveSnapshotIfUnused(snap)
}

// tickingLease ticks when the lease's calls into Ceph return.
type tickingLease struct {
	Lease
	live *liveness
}

func (l tickingLease) Working(clone string) error {
	defer l.live.tick()
	return l.Lease.Working(clone)
}

func (l tickingLease) Unlock() error {
	defer l.live.tick()
	return l.Lease.Unlock()
}

// busyHook is implemented by Lockers that can tell how long they will sleep while every slot is
// busy (cephLocker): a wait for a slot is not a stall.
type busyHook interface {
	onBusy(func(wait time.Duration))
}
