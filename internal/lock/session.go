package lock

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/ceph/go-ceph/rados"

	"github.com/flattend/flattend/internal/backoff"
	"github.com/flattend/flattend/internal/cephconn"
)

// Lock blocks until this node holds a slot, and returns its lease. While every slot is busy it
// waits in the queue, woken by a releasing holder's grant or, failing that, after a jittered
// backoff. A node whose own last release went to a waiter waits its turn first instead of
// taking the slot straight back. It returns ctx's cause when ctx ends, and an error wrapping
// ErrLost when this connection is no longer fit to hold a lock.
func (m *Mutex) Lock(ctx context.Context) (*Lease, error) {
	bo := &backoff.Backoff{Min: m.o.BackoffMin, Max: m.o.BackoffMax}
	if m.handedOver(ctx) {
		m.wait()
		if err := m.sleep(ctx, bo.Next()); err != nil {
			return nil, err
		}
	}
	lease, err := retryBusy(ctx, bo, m.TryLock, m.sleep, m.busy)
	if err != nil {
		m.StopWaiting()
	}
	return lease, err
}

// retryBusy is Lock's loop: try until it returns anything but ErrLocked, sleeping a backoff
// between tries (busy, if set, is told each wait).
func retryBusy(ctx context.Context, bo *backoff.Backoff, try func(context.Context) (*Lease, error),
	sleep func(context.Context, time.Duration) error, busy func(time.Duration)) (*Lease, error) {
	for {
		lease, err := try(ctx)
		if !errors.Is(err, ErrLocked) {
			return lease, err
		}
		wait := bo.Next()
		if busy != nil {
			busy(wait)
		}
		if err := sleep(ctx, wait); err != nil {
			return nil, err
		}
	}
}

// sleep waits d, or less when a releasing holder grants this node a slot.
func (m *Mutex) sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-m.Wake():
	case <-ctx.Done():
		return context.Cause(ctx)
	}
	return nil
}

// Dialer makes a fresh RADOS connection.
type Dialer func() (*rados.Conn, error)

// Session is one RADOS connection and the lock's slots on it, in the manner of etcd's
// concurrency.Session. The work a lease guards (the flatten) must run on Conn: a node that breaks
// this holder's stale lock blocklists this connection, which fences that work too. Done closes
// when the session is lost (a lease lost, the connection blocklisted or cut off); then Close it
// and make a new one.
type Session struct {
	conn  *rados.Conn
	mutex *Mutex

	once sync.Once
	done chan struct{}
	mu   sync.Mutex
	err  error

	closeOnce sync.Once
	closed    chan struct{} // closed once Close has shut the connection down
}

// Hooks are told what Lock does, for logs.
type Hooks struct {
	// Busy is told each wait while every slot is busy.
	Busy func(wait time.Duration)
	// Warn is told what the lock met that an operator should know of: junk in the queue, a
	// holder whose fencing could not be verified.
	Warn func(msg string)
}

// NewSession dials, prepares the lock images (creating them when missing) and starts watching
// for grants.
func NewSession(dial Dialer, o Options, hooks Hooks) (*Session, error) {
	if err := o.validate(); err != nil {
		return nil, err
	}
	conn, err := dial()
	if err != nil {
		return nil, err
	}
	s := &Session{conn: conn, done: make(chan struct{}), closed: make(chan struct{})}
	s.mutex = &Mutex{conn: conn, o: o, lost: s.Observe, busy: hooks.Busy, warn: hooks.Warn, now: time.Now, notifyTimeout: defaultNotifyTimeout}
	if err := s.mutex.Ensure(); err != nil {
		conn.Shutdown()
		return nil, err
	}
	return s, nil
}

// Conn is the session's connection: do the guarded work on it.
func (s *Session) Conn() *rados.Conn { return s.conn }

// Mutex is the session's set of slots.
func (s *Session) Mutex() *Mutex { return s.mutex }

// Done closes when the session is lost.
func (s *Session) Done() <-chan struct{} { return s.done }

// Err says why Done closed; nil while the session holds.
func (s *Session) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// Lock takes a slot (see Mutex.Lock). A loss it runs into ends the session.
func (s *Session) Lock(ctx context.Context) (*Lease, error) {
	if err := s.Err(); err != nil {
		return nil, err
	}
	l, err := s.mutex.Lock(ctx)
	if err != nil {
		s.Observe(err)
		return nil, err
	}
	return l, nil
}

// Observe ends the session if err means its connection is dead: a lost lease, or Ceph saying
// this client was blocklisted. Other errors change nothing.
func (s *Session) Observe(err error) {
	if !IsLoss(err) {
		return
	}
	s.once.Do(func() {
		s.mu.Lock()
		s.err = err
		s.mu.Unlock()
		close(s.done)
	})
}

// IsLoss reports whether err means a lock was lost or its connection fenced.
func IsLoss(err error) bool { return errors.Is(err, ErrLost) || cephconn.IsBlocklisted(err) }

// Close stops the lock's watches and shuts the connection down, waiting until ctx ends for
// librbd calls still running on it (a LockAcquire blocked behind a dead holder returns within
// the watch timeout). If they outlast ctx, Close returns an error and the connection is shut
// down when they return: it is never left open. Close may be called again to wait for that.
func (s *Session) Close(ctx context.Context) error {
	s.Observe(fmt.Errorf("%w: session closed", ErrLost))
	s.closeOnce.Do(func() {
		go func() { // owned by the session: ends when the last librbd call on it has returned
			defer close(s.closed)
			_ = s.mutex.Close(context.Background())
			s.conn.Shutdown()
		}()
	})
	select {
	case <-s.closed:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("lock %s: a librbd call is still running (the connection is shut down when it returns): %w",
			s.mutex.Name(), context.Cause(ctx))
	}
}
