// Package scheduler is the only package that knows the order of things: when the window is open
// it asks discovery for this node's clones and walks them one at a time: take the cluster-wide
// lock (backing off while it is busy), flatten under it, release, next.
package scheduler

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/ceph/go-ceph/rados"
	"go.uber.org/zap"

	"github.com/flattend/flattend/internal/cephconn"
	"github.com/flattend/flattend/internal/discovery"
	"github.com/flattend/flattend/internal/flattener"
	"github.com/flattend/flattend/internal/lock"
)

// ErrWindowClosed is the cause of cancellation when the night window ends.
var ErrWindowClosed = errors.New("the flatten window closed")

// Config is what the scheduler needs, already validated.
type Config struct {
	Node           string
	Window         Window
	BackoffMin     time.Duration
	BackoffMax     time.Duration
	RescanInterval time.Duration // discovery again, inside an open window, after a pass
	Lock           lock.Options
}

// Dialer makes a fresh RADOS connection.
type Dialer func() (*rados.Conn, error)

// Scheduler runs passes over this node's clones. It owns one RADOS connection at a time, which
// carries both the lock and the flatten I/O; after a lock loss that connection is thrown away.
type Scheduler struct {
	cfg     Config
	dial    Dialer
	sources []discovery.Source
	log     *zap.Logger

	conn  *rados.Conn
	mutex *lock.Mutex
	// unclean lists clones whose flatten this process lost mid-way: their object map must be
	// rebuilt before they are resumed.
	unclean map[string]bool
}

// New returns a scheduler. Call Close when done.
func New(cfg Config, dial Dialer, sources []discovery.Source, log *zap.Logger) *Scheduler {
	return &Scheduler{cfg: cfg, dial: dial, sources: sources, log: log.With(zap.String("node", cfg.Node)), unclean: map[string]bool{}}
}

// Summary counts what a pass did.
type Summary struct {
	Discovered int      `json:"discovered"`
	Flattened  int      `json:"flattened"`
	Failed     []string `json:"failed"` // "pool/image: error"
	Left       int      `json:"left"`   // not reached or cancelled
}

// Done reports whether every discovered clone is flat now.
func (s Summary) Done() bool { return len(s.Failed) == 0 && s.Left == 0 }

// Run works in every window until ctx ends; a daemon started inside a window works in what is
// left of it. It returns nil when ctx ends.
func (s *Scheduler) Run(ctx context.Context) error {
	for {
		now := time.Now()
		open, end := s.cfg.Window.At(now)
		if !open {
			next := s.cfg.Window.NextOpen(now)
			if next.IsZero() {
				return fmt.Errorf("the window schedule never opens again")
			}
			s.log.Info("window closed", zap.Time("next_open", next))
			if sleep(ctx, time.Until(next)) != nil {
				return nil
			}
			continue
		}
		s.log.Info("window open", zap.Time("until", end))
		wctx, cancel := context.WithDeadlineCause(ctx, end, ErrWindowClosed)
		s.workWindow(wctx)
		cancel()
		if ctx.Err() != nil {
			return nil
		}
		s.log.Info("window ended")
	}
}

func (s *Scheduler) workWindow(ctx context.Context) {
	retry := Backoff{Min: s.cfg.BackoffMin, Max: s.cfg.BackoffMax}
	for {
		sum, err := s.Pass(ctx)
		if ctx.Err() != nil {
			return
		}
		wait := s.cfg.RescanInterval
		if err != nil {
			s.log.Error("pass failed", zap.Error(err))
			wait = min(wait, retry.Next())
		} else {
			retry.Reset()
			s.log.Info("pass done", zap.Int("discovered", sum.Discovered), zap.Int("flattened", sum.Flattened),
				zap.Int("failed", len(sum.Failed)), zap.Duration("next_pass_in", wait))
		}
		if sleep(ctx, wait) != nil {
			return
		}
	}
}

// Pass discovers this node's clones now and flattens them one at a time until all are done or
// ctx ends. A clone that fails is logged and counted; the pass goes on with the others.
func (s *Scheduler) Pass(ctx context.Context) (Summary, error) {
	var sum Summary
	conn, _, err := s.session()
	if err != nil {
		return sum, err
	}
	start := time.Now()
	clones, err := discovery.Discover(ctx, conn, s.sources)
	if err != nil {
		return sum, err
	}
	sum.Discovered = len(clones)
	s.log.Info("discovered clones", zap.Int("count", len(clones)), zap.Duration("took", time.Since(start)))
	for i, c := range clones {
		if ctx.Err() != nil {
			sum.Left += len(clones) - i
			break
		}
		err := s.flattenOne(ctx, c)
		switch {
		case err == nil:
			sum.Flattened++
		case ctx.Err() != nil:
			sum.Left++
		default:
			s.log.Error("flatten failed", zap.String("image", c.Spec()), zap.Error(err))
			sum.Failed = append(sum.Failed, c.Spec()+": "+err.Error())
		}
	}
	if s.mutex != nil {
		s.mutex.StopWaiting() // grants to a node with nothing left to do would be wasted
	}
	return sum, nil
}

// flattenOne takes the lock (backing off while it is busy), flattens c under it and releases it.
func (s *Scheduler) flattenOne(ctx context.Context, c discovery.Clone) error {
	bo := Backoff{Min: s.cfg.BackoffMin, Max: s.cfg.BackoffMax}
	waitStart := time.Now()
	for {
		conn, mutex, err := s.session()
		if err != nil {
			return err
		}
		if mutex.HandedOver(ctx) {
			// Our last release went to a node that was waiting: wait our turn like everyone.
			mutex.Wait()
			d := bo.Next()
			s.log.Debug("slot handed over, waiting our turn", zap.String("image", c.Spec()), zap.Duration("wait", d))
			if err := waitForRelease(ctx, mutex.Wake(), d); err != nil {
				return err
			}
		}
		lease, err := mutex.TryLock(ctx)
		switch {
		case errors.Is(err, lock.ErrLocked):
			d := bo.Next()
			s.log.Debug("lock busy, backing off", zap.String("lock", mutex.Name()), zap.String("image", c.Spec()), zap.Duration("wait", d))
			if err := waitForRelease(ctx, mutex.Wake(), d); err != nil {
				return err
			}
			continue
		case errors.Is(err, lock.ErrLost):
			s.log.Warn("connection fenced, reconnecting", zap.Error(err))
			s.discard()
			if err := sleep(ctx, bo.Next()); err != nil {
				return err
			}
			continue
		case err != nil:
			return err
		}
		s.log.Debug("lock acquired", zap.String("lock", lease.Image()), zap.String("image", c.Spec()), zap.Duration("waited", time.Since(waitStart)))

		ferr := s.repairInterrupted(conn, lease, c)
		if ferr == nil {
			ferr = s.flattenUnder(ctx, conn, lease, c)
		}
		uerr := lease.Unlock()
		s.log.Debug("lock released", zap.String("lock", lease.Image()), zap.NamedError("unlock_error", uerr))
		lost := errors.Is(uerr, lock.ErrLost) || errors.Is(ferr, lock.ErrLost) || cephconn.IsBlocklisted(ferr)
		if lost || uerr != nil {
			// The lock was lost or the connection fenced: never reuse it.
			s.log.Warn("lock lost, reconnecting", zap.NamedError("lease", uerr), zap.NamedError("flatten", ferr))
			s.discard()
		}
		switch {
		case ferr == nil:
			// Even if the loss shows only now: librbd detaches the parent only after every object
			// is copied, and a fenced client cannot finish, so a finished flatten is complete.
			return nil
		case ctx.Err() == nil && lost:
			s.unclean[c.Spec()] = true
			// Losing the lock is not the clone's fault: take it again (on a new connection) and
			// resume where the copy stopped.
			if err := sleep(ctx, bo.Next()); err != nil {
				return err
			}
			continue
		}
		return ferr
	}
}

// repairInterrupted rebuilds the object map of a clone whose flatten stopped uncleanly: one this
// process lost, or the one a previous holder of this slot was flattening when it was killed, cut
// off or fenced (its record is still on the lock image). It runs under the lock, like a flatten.
// An error means c itself could not be repaired and must not be flattened now.
func (s *Scheduler) repairInterrupted(conn *rados.Conn, lease *lock.Lease, c discovery.Clone) error {
	var specs []string
	if r := lease.Interrupted(); r != nil && r.Clone != "" {
		s.log.Warn("previous holder stopped without releasing", zap.String("lock", lease.Image()),
			zap.String("holder", r.Node), zap.Int("pid", r.PID), zap.String("clone", r.Clone))
		specs = append(specs, r.Clone)
	}
	if s.unclean[c.Spec()] {
		specs = append(specs, c.Spec())
	}
	var cErr error
	for _, spec := range specs {
		t, err := flattener.ParseTarget(spec)
		if err == nil {
			err = flattener.RepairObjectMap(conn, t)
		}
		switch {
		case err == nil, errors.Is(err, flattener.ErrNotFound):
			s.log.Info("object map rebuilt after an interrupted flatten", zap.String("image", spec))
			delete(s.unclean, spec)
		default:
			s.log.Error("rebuilding the object map failed", zap.String("image", spec), zap.Error(err))
			if spec == c.Spec() {
				cErr = fmt.Errorf("not resuming an interrupted flatten before its object map is rebuilt: %w", err)
			}
		}
	}
	return cErr
}

// flattenUnder flattens c while lease holds; losing the lease cancels the flatten.
func (s *Scheduler) flattenUnder(ctx context.Context, conn *rados.Conn, lease *lock.Lease, c discovery.Clone) error {
	t := flattener.Target{Pool: c.Pool, Namespace: c.Namespace, Image: c.Image}
	log := s.log.With(zap.String("image", t.String()))
	info, err := flattener.Inspect(conn, t)
	switch {
	case errors.Is(err, flattener.ErrNotFound):
		log.Info("image gone since discovery, skipped")
		return nil
	case err != nil:
		return err
	case info.Parent == "":
		log.Info("already flat")
		return nil
	}

	fctx, cancel := lease.Context(ctx)
	defer cancel()
	if err := lease.Working(t.String()); err != nil {
		return err
	}
	log.Info("flatten started", zap.String("parent", info.Parent), zap.Uint64("bytes", info.Overlap), zap.String("lock", lease.Image()))
	start := time.Now()
	var decile atomic.Int64
	err = flattener.Flatten(fctx, conn, t, func(done, total uint64) {
		lease.Progress(done, total)
		if total == 0 {
			return
		}
		d := int64(done * 10 / total)
		if old := decile.Load(); d > old && d < 10 && decile.CompareAndSwap(old, d) {
			log.Info("flatten progress", zap.Int64("percent", d*10), zap.Uint64("objects_done", done), zap.Uint64("objects", total))
		}
	})
	result := "flat"
	switch {
	case err == nil:
	case errors.Is(err, flattener.ErrCancelled):
		result = "cancelled"
		if lerr := lease.Err(); lerr != nil {
			err = lerr // the lease's loss is the story
		}
	default:
		result = "failed"
	}
	log.Info("flatten finished", zap.String("result", result), zap.Uint64("bytes", info.Overlap),
		zap.Duration("duration", time.Since(start)), zap.Error(err))
	return err
}

// session returns the current connection and mutex, dialling and preparing the lock image first
// if there is none.
func (s *Scheduler) session() (*rados.Conn, *lock.Mutex, error) {
	if s.conn != nil {
		return s.conn, s.mutex, nil
	}
	conn, err := s.dial()
	if err != nil {
		return nil, nil, err
	}
	o := s.cfg.Lock
	o.Node = s.cfg.Node
	m := lock.New(conn, o)
	if err := m.Ensure(); err != nil {
		conn.Shutdown()
		return nil, nil, err
	}
	s.conn, s.mutex = conn, m
	return conn, m, nil
}

// discard drops the current connection after a loss. It is shut down once no librbd call runs on
// it (a LockAcquire blocked behind a dead holder returns within the watch timeout).
func (s *Scheduler) discard() {
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	defer cancel()
	s.Close(ctx)
}

// Close shuts the connection down, waiting until ctx ends for librbd calls still running on it;
// if they do not finish it is left open (the process is about to exit anyway).
func (s *Scheduler) Close(ctx context.Context) {
	if s.conn == nil {
		return
	}
	conn, m := s.conn, s.mutex
	s.conn, s.mutex = nil, nil
	if err := m.Close(ctx); err != nil {
		s.log.Warn("leaving a connection open", zap.Error(err))
		return
	}
	conn.Shutdown()
}

// waitForRelease waits d, or less when a holder grants this node a slot on wake (nil: never).
func waitForRelease(ctx context.Context, wake <-chan struct{}, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-wake:
		return nil
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}

func sleep(ctx context.Context, d time.Duration) error { return waitForRelease(ctx, nil, d) }

// Connect dials and prepares the lock image now, so that a daemon with a Ceph problem fails at
// start rather than at the first window.
func (s *Scheduler) Connect() error {
	_, _, err := s.session()
	return err
}
