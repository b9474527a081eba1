package scheduler

import (
	"context"
	"errors"
	"slices"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/flattend/flattend/internal/backoff"
	"github.com/flattend/flattend/internal/cephconn"
	"github.com/flattend/flattend/internal/discovery"
	"github.com/flattend/flattend/internal/flattener"
	"github.com/flattend/flattend/internal/gate"
	"github.com/flattend/flattend/internal/lock"
	"github.com/flattend/flattend/internal/rbdimage"
)

// The job for one clone: ask what can be asked before the lock (gates, the clone's state and
// users), take a slot, ask again only what went stale while waiting, mark the clone, verify what
// an interrupted flatten may have lost, flatten under the lease, unmark, release, clean up. The job talks to the
// cluster through two small interfaces, so that its rules are tested with fakes.

// Locker is the cluster-wide lock, on one session (lock.Session).
type Locker interface {
	// Lock blocks until this node holds a slot; an error wrapping lock.ErrLost means the
	// session is dead.
	Lock(ctx context.Context) (Lease, error)
	// StopWaiting leaves the queue of waiters: this node has nothing more to do for now.
	StopWaiting()
	// Close ends the session, waiting until ctx ends for librbd calls still running. If they
	// outlast ctx it returns an error, and the connection is shut down when they return; Close
	// may be called again to wait for that.
	Close(ctx context.Context) error
}

// Lease is a held slot (lock.Lease).
type Lease interface {
	Image() string
	// Context is cancelled, with Err as its cause, when the lock is lost.
	Context(parent context.Context) (context.Context, context.CancelFunc)
	// Interrupted is the record of a previous holder that lost the slot mid-flatten (or nil).
	Interrupted() *lock.Record
	// Working records the clone about to be flattened; no flatten may start if it fails.
	Working(clone string) error
	Progress(done, total uint64)
	Err() error
	Unlock() error
}

// Flattener does the work on clones, on the session's connection (the one the lock fences).
type Flattener interface {
	Discover(ctx context.Context, sources []discovery.Source) ([]discovery.Clone, error)
	// CheckGates is nil when every enabled gate lets need more bytes into pool.
	CheckGates(g gate.Config, pool string, need uint64) error
	// WatchGates is cancelled, with the *gate.Closed error as cause, when a gate closes.
	WatchGates(ctx context.Context, g gate.Config, pool string, every time.Duration, need func() uint64) (context.Context, context.CancelFunc)
	Inspect(s rbdimage.Spec) (rbdimage.Info, error)
	Users(s rbdimage.Spec) ([]string, error)
	// VerifyCopyups copies up the objects an interrupted flatten may have lost.
	VerifyCopyups(ctx context.Context, s rbdimage.Spec) (flattener.Verified, error)
	// MarkFlattening marks s as being flattened, and returns the mark an interrupted flatten
	// left ("" if none); ClearFlattening removes it after a clean end.
	MarkFlattening(s rbdimage.Spec, note string) (string, error)
	ClearFlattening(s rbdimage.Spec) error
	// MarkInterrupted marks s, which another holder was flattening, unless it is marked.
	MarkInterrupted(s rbdimage.Spec, note string) error
	Interrupted(s rbdimage.Spec) (string, error)
	Flatten(ctx context.Context, s rbdimage.Spec, bytesPerSecond uint64, progress func(done, total uint64)) error
	RemoveSnapshotIfUnused(snap rbdimage.Spec) (removed bool, why string, err error)
}

// Connector makes a session: the lock's slots and the clone operations on one new connection.
type Connector func(o lock.Options) (Locker, Flattener, error)

// errResume means the job lost its session: take it up again on a new one.
var errResume = errors.New("session lost: resume on a new one")

// flattenClone runs c's job until it ends; after a lost session it is taken up again on a new
// one, where the flatten resumes from where the copy stopped.
func (s *Scheduler) flattenClone(ctx context.Context, c discovery.Clone) error {
	bo := backoff.Backoff{Min: s.cfg.BackoffMin, Max: s.cfg.BackoffMax}
	for {
		sess, err := s.session()
		if err != nil {
			return err
		}
		if err = s.job(ctx, sess, c); !errors.Is(err, errResume) {
			return err
		}
		if err := s.pause(ctx, bo.Next()); err != nil {
			return err
		}
	}
}

// prepared is what the job asked before the lock, and when.
type prepared struct {
	info rbdimage.Info
	at   time.Time
	done bool // nothing to do: flat already, or gone
}

// job is one attempt at c on sess.
func (s *Scheduler) job(ctx context.Context, sess *session, c discovery.Clone) error {
	pre, err := s.prepare(sess, c, false)
	if err != nil || pre.done {
		return err
	}
	waitStart := time.Now()
	lease, err := sess.Lock(ctx)
	switch {
	case lost(err):
		s.log.Warn("connection fenced, reconnecting", zap.Error(err))
		s.discard()
		return errResume
	case err != nil:
		return err
	}
	s.log.Debug("lock acquired", zap.String("lock", lease.Image()), zap.String("image", c.Spec.String()), zap.Duration("waited", time.Since(waitStart)))
	s.cfg.Metrics.LockAcquired(time.Since(waitStart))
	ferr := s.underLease(ctx, sess, lease, c, pre)
	uerr := lease.Unlock()
	s.log.Debug("lock released", zap.String("lock", lease.Image()), zap.NamedError("unlock_error", uerr))
	isLost := lost(uerr, ferr)
	s.cfg.Metrics.LockReleased(isLost)
	switch {
	case isLost || uerr != nil:
		// The lock was lost or the connection fenced: never reuse it.
		s.log.Warn("lock lost, reconnecting", zap.NamedError("lease", uerr), zap.NamedError("flatten", ferr))
		s.discard()
	case cephconn.IsErrno(ferr, syscall.ETIMEDOUT):
		// A write that timed out (ceph.op_timeout) left the clone's exclusive lock owned by this
		// connection, with no handle to release it: every later try on it failed with EROFS. A
		// new connection breaks that lock, as it would a dead client's.
		s.log.Warn("a Ceph call timed out, reconnecting", zap.Error(ferr))
		s.discard()
	}
	switch {
	case ferr == nil:
		// Even if the loss shows only now: librbd detaches the parent only after every object
		// is copied, and a fenced client cannot finish, so a finished flatten is complete.
		if !isLost {
			// A failed release discarded sess (its connection is shut down): clean up on a new one.
			if live, err := s.session(); err == nil {
				s.cleanupParent(live, c)
			}
		}
		return nil
	case ctx.Err() == nil && isLost:
		// Losing the lock is not the clone's fault: resume where the copy stopped (verified
		// first, like every flatten).
		return errResume
	}
	return ferr
}

// prepare asks whether c still needs a flatten and may have one now: its parent, its users and
// the gates. Asked before the lock, the answers are used after the grant if they are still fresh
// (gates.check_interval), so that a handover costs only what must be done under the lock.
func (s *Scheduler) prepare(sess *session, c discovery.Clone, locked bool) (prepared, error) {
	spec := c.Spec
	log := s.log.With(zap.String("image", spec.String()))
	info, err := sess.Inspect(spec)
	switch {
	case errors.Is(err, rbdimage.ErrNotFound):
		log.Info("image gone since discovery, skipped")
		return prepared{done: true}, nil
	case err != nil:
		return prepared{}, err
	case info.Parent == nil:
		log.Info("already flat")
		return prepared{done: true}, nil
	}
	users, err := sess.Users(spec)
	if err != nil {
		return prepared{}, err
	}
	if err := InUse(users, s.cfg.AllowInUse); err != nil {
		if !locked {
			// The user may be a holder killed mid-flatten whose watch has not timed out yet;
			// taking the lock waits for that. Decide under the lock: pre.at is zero, so stale.
			return prepared{info: info}, nil
		}
		return prepared{}, err
	}
	switch {
	case slices.ContainsFunc(users, func(u string) bool { return strings.HasPrefix(u, "lock owner ") }):
		log.Warn("clone in use: librbd hands the flatten to the client that owns its lock (flatten.in_use: allow); "+
			"flattend's pace and cancel do not reach it, and this node holds its slot until that flatten ends", zap.Strings("users", users))
	case len(users) > 0:
		log.Warn("clone in use: the flatten takes its lock, stalling that client's writes until it ends (flatten.in_use: allow)",
			zap.Strings("users", users))
	}
	if err := sess.CheckGates(s.cfg.Gates, dataPool(c, info), info.Overlap); err != nil {
		return prepared{}, err
	}
	if dataPool(c, info) != spec.Pool { // the image's own pool gets only metadata, but must not be full
		if err := sess.CheckGates(s.cfg.Gates, spec.Pool, 0); err != nil {
			return prepared{}, err
		}
	}
	return prepared{info: info, at: time.Now()}, nil
}

// underLease is the part of the job that needs the lock.
func (s *Scheduler) underLease(ctx context.Context, sess *session, lease Lease, c discovery.Clone, pre prepared) error {
	if s.tooLate() {
		return errTooLate // the wait for the lock took the window's rest
	}
	s.markForOwner(sess, lease, c)
	if time.Since(pre.at) > s.cfg.GateInterval {
		// The wait outlasted the answers (or the clone looked in use): ask again, under the lock.
		var err error
		if pre, err = s.prepare(sess, c, true); err != nil || pre.done {
			return err
		}
	}
	return s.flattenUnder(ctx, sess, lease, c, pre.info)
}

// dataPool is the pool a flatten of c writes its bytes to: c's data pool (rbd clone --data-pool),
// else its own.
func dataPool(c discovery.Clone, info rbdimage.Info) string {
	if info.DataPool != "" {
		return info.DataPool
	}
	return c.Spec.Pool
}
