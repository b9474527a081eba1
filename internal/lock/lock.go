// Package lock is flattend's cluster-wide mutex: the managed exclusive lock of a small dedicated
// RBD image. Whoever holds it may flatten; everyone else backs off.
//
// The shape follows etcd's concurrency.Mutex: TryLock returns ErrLocked at once when another node
// holds the lock, and a Lease whose Done channel closes when the lock is lost. The lease lives on
// the caller's RADOS connection, and the caller must do the guarded work (the flatten) on that same
// connection: a node that breaks a stale holder's lock makes Ceph blocklist the holder's
// connection, which fences the holder's flatten I/O too. A lost lease means a dead connection:
// the caller shuts it down and dials a new one.
package lock

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"syscall"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"

	"github.com/flattend/flattend/internal/cephconn"
)

var (
	// ErrLocked means another live client holds the lock; try again later.
	ErrLocked = errors.New("lock is held by another node")
	// ErrLost means a lease ended without Unlock: another node broke the lock (and blocklisted
	// this connection), or ownership could not be confirmed.
	ErrLost = errors.New("lock lost")
	// ErrNoExclusiveLock means the lock image lacks the exclusive-lock feature.
	ErrNoExclusiveLock = errors.New("lock image lacks the exclusive-lock feature")
	// ErrNotLockImage means the configured image is someone's data image, not a lock image.
	ErrNotLockImage = errors.New("image is not a dedicated lock image")
)

// lockImageSize is the size given to a lock image flattend creates; it never holds data.
const lockImageSize = 1 << 20

// Mutex is the lock on one lock image, on one connection.
type Mutex struct {
	conn          *rados.Conn
	pool, image   string
	checkInterval time.Duration

	// inflight counts calls into librbd still running after their caller gave up (a LockAcquire
	// that blocks behind a dead holder cannot be interrupted). Close waits for them.
	inflight sync.WaitGroup
}

// New returns the mutex on pool/image over conn. checkInterval is how often a lease confirms it
// still owns the lock.
func New(conn *rados.Conn, pool, image string, checkInterval time.Duration) *Mutex {
	if checkInterval <= 0 {
		checkInterval = 2 * time.Second
	}
	return &Mutex{conn: conn, pool: pool, image: image, checkInterval: checkInterval}
}

// Name is "pool/image".
func (m *Mutex) Name() string { return m.pool + "/" + m.image }

// Ensure creates the lock image if it is missing and checks that it is fit to be one. Many nodes
// may call it at once: creating races are settled by Ceph, "already exists" counts as success.
func (m *Mutex) Ensure() error {
	ioctx, err := cephconn.OpenPool(m.conn, m.pool)
	if err != nil {
		return fmt.Errorf("lock image %s: %w", m.Name(), err)
	}
	defer ioctx.Destroy()
	_, err = rbd.Create2(ioctx, m.image, lockImageSize, rbd.FeatureLayering|rbd.FeatureExclusiveLock, 22)
	if err != nil && !errors.Is(err, rbd.ErrExist) && !cephconn.IsErrno(err, syscall.EEXIST) {
		if h := cephconn.Hint(err); h != "" {
			return fmt.Errorf("creating lock image %s: %w (%s)", m.Name(), err, h)
		}
		return fmt.Errorf("creating lock image %s: %w", m.Name(), err)
	}
	return m.Check()
}

// Check verifies, without changing anything, that the lock image exists and is fit.
func (m *Mutex) Check() error {
	ioctx, err := cephconn.OpenPool(m.conn, m.pool)
	if err != nil {
		return fmt.Errorf("lock image %s: %w", m.Name(), err)
	}
	defer ioctx.Destroy()
	img, err := rbd.OpenImageReadOnly(ioctx, m.image, rbd.NoSnapshot)
	if err != nil {
		return fmt.Errorf("opening lock image %s: %w", m.Name(), err)
	}
	defer img.Close()
	features, err := img.GetFeatures()
	if err != nil {
		return fmt.Errorf("features of lock image %s: %w", m.Name(), err)
	}
	if features&rbd.FeatureExclusiveLock == 0 {
		return fmt.Errorf("%s: %w (rbd feature enable %s exclusive-lock)", m.Name(), ErrNoExclusiveLock, m.Name())
	}
	if _, err := img.GetParent(); err == nil {
		return fmt.Errorf("%s: %w: it is a clone; point lock.image at a dedicated image", m.Name(), ErrNotLockImage)
	}
	return nil
}

// TryLock takes the lock if it is free and returns ErrLocked if another live client holds it.
//
// Behind a holder that died, librbd blocks until the dead client's watch times out (about 30 s),
// then breaks its lock and blocklists it. The call runs in its own goroutine so that ctx can give
// up on it; a lock it still obtains after that is released at once.
func (m *Mutex) TryLock(ctx context.Context) (*Lease, error) {
	type result struct {
		img *rbd.Image
		err error
	}
	ch := make(chan result, 1)
	var mu sync.Mutex
	abandoned := false
	m.inflight.Add(1)
	go func() {
		defer m.inflight.Done()
		img, err := m.acquire()
		mu.Lock()
		defer mu.Unlock()
		if abandoned {
			if err == nil {
				_ = img.LockRelease()
				_ = img.Close()
			}
			return
		}
		ch <- result{img, err}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			return nil, r.err
		}
		return m.newLease(r.img), nil
	case <-ctx.Done():
		mu.Lock()
		abandoned = true
		mu.Unlock()
		select {
		case r := <-ch: // it finished just as ctx ended: give the lock back
			if r.err == nil {
				_ = r.img.LockRelease()
				_ = r.img.Close()
			}
		default:
		}
		return nil, context.Cause(ctx)
	}
}

func (m *Mutex) acquire() (*rbd.Image, error) {
	ioctx, err := cephconn.OpenPool(m.conn, m.pool)
	if err != nil {
		return nil, fmt.Errorf("lock image %s: %w", m.Name(), err)
	}
	// The image keeps using ioctx's settings; librbd holds its own reference to the pool.
	defer ioctx.Destroy()
	img, err := rbd.OpenImage(ioctx, m.image, rbd.NoSnapshot)
	if err != nil {
		return nil, fmt.Errorf("opening lock image %s: %w", m.Name(), wrapErr(err))
	}
	err = img.LockAcquire(rbd.LockModeExclusive)
	if err == nil {
		return img, nil
	}
	_ = img.Close()
	switch {
	case cephconn.IsErrno(err, syscall.EROFS), cephconn.IsErrno(err, syscall.EBUSY):
		return nil, ErrLocked
	case cephconn.IsErrno(err, syscall.EINVAL):
		return nil, fmt.Errorf("%s: %w (rbd feature enable %s exclusive-lock)", m.Name(), ErrNoExclusiveLock, m.Name())
	}
	return nil, fmt.Errorf("acquiring lock on %s: %w", m.Name(), wrapErr(err))
}

// wrapErr marks errors that mean this connection is dead as ErrLost as well.
func wrapErr(err error) error {
	if cephconn.IsBlocklisted(err) {
		return fmt.Errorf("%w: %w (this client was blocklisted)", ErrLost, err)
	}
	if h := cephconn.Hint(err); h != "" {
		return fmt.Errorf("%w (%s)", err, h)
	}
	return err
}

// Close waits, at most until ctx ends, for librbd calls that callers gave up on. The connection
// may be shut down only after Close returned nil.
func (m *Mutex) Close(ctx context.Context) error {
	done := make(chan struct{})
	go func() { m.inflight.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("lock %s: a librbd call is still running: %w", m.Name(), context.Cause(ctx))
	}
}

// Lease is a held lock. Done closes when the lock is lost; Unlock releases it.
type Lease struct {
	m     *Mutex
	img   *rbd.Image
	since time.Time

	done      chan struct{}
	stop      chan struct{}
	monitored sync.WaitGroup
	mu        sync.Mutex
	err       error // why done closed
	unlocked  bool
}

func (m *Mutex) newLease(img *rbd.Image) *Lease {
	l := &Lease{m: m, img: img, since: time.Now(), done: make(chan struct{}), stop: make(chan struct{})}
	l.monitored.Add(1)
	go l.monitor()
	return l
}

// Since is when the lock was taken.
func (l *Lease) Since() time.Time { return l.since }

// Done closes when the lock is lost (not on Unlock).
func (l *Lease) Done() <-chan struct{} { return l.done }

// Err says why Done closed: an error wrapping ErrLost. Nil while the lease holds.
func (l *Lease) Err() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.err
}

// Context returns a context that is cancelled, with the lease's Err as cause, when the lock is
// lost or parent ends. Call cancel when done with it.
func (l *Lease) Context(parent context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancelCause(parent)
	go func() { // ends with ctx, at the latest when the caller cancels it
		select {
		case <-l.done:
			cancel(l.Err())
		case <-ctx.Done():
		}
	}()
	return ctx, func() { cancel(context.Canceled) }
}

// monitor confirms ownership every checkInterval; any doubt ends the lease.
func (l *Lease) monitor() {
	defer l.monitored.Done()
	t := time.NewTicker(l.m.checkInterval)
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-t.C:
		}
		owner, err := l.img.LockIsExclusiveOwner()
		switch {
		case err != nil:
			l.lose(fmt.Errorf("%w: checking ownership of %s: %w", ErrLost, l.m.Name(), err))
			return
		case !owner:
			l.lose(fmt.Errorf("%w: %s is no longer ours (another node broke it)", ErrLost, l.m.Name()))
			return
		}
	}
}

func (l *Lease) lose(err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.err == nil && !l.unlocked {
		l.err = err
		close(l.done)
	}
}

// Unlock stops the ownership checks, releases the lock and closes the lock image. After a loss
// it only closes the image and returns the loss.
func (l *Lease) Unlock() error {
	l.mu.Lock()
	if l.unlocked {
		l.mu.Unlock()
		return nil
	}
	l.unlocked = true
	lost := l.err
	l.mu.Unlock()
	close(l.stop)
	l.monitored.Wait()

	var err error
	if lost == nil {
		if rerr := l.img.LockRelease(); rerr != nil {
			err = fmt.Errorf("releasing lock on %s: %w", l.m.Name(), wrapErr(rerr))
		}
	} else {
		err = lost
	}
	if cerr := l.img.Close(); cerr != nil && err == nil {
		err = fmt.Errorf("closing lock image %s: %w", l.m.Name(), cerr)
	}
	return err
}
