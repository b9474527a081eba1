package lock

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"syscall"
	"time"

	"github.com/ceph/go-ceph/rbd"

	"github.com/flattend/flattend/internal/cephconn"
)

// TryLock takes a free slot and returns ErrLocked if live clients hold every slot, or if this
// node is queued behind other live waiters. Slots are tried from a random one so that nodes
// spread over them.
//
// A slot whose owner still watches its image is busy without a lock request. Behind a holder
// that died, the slot stays busy until the dead client's watch times out (about 30 s); then
// LockAcquire breaks its lock and blocklists it. LockAcquire can still block (an owner that dies
// during the call), so it runs in its own goroutine that ctx can give up on; a lock it still
// obtains after that is released at once.
func (m *Mutex) TryLock(ctx context.Context) (*Lease, error) {
	h := m.handoverState()
	granted := false
	if h != nil {
		// A broken watch means no grant can reach this node, and a lease on this connection
		// would be lost at its first check: reconnect first.
		if _, err := h.watcher.Check(); err != nil {
			return nil, fmt.Errorf("%w: the watch on %s is broken: %w", ErrLost, h.wakeOID, err)
		}
		// The grants that woke this node: this attempt uses one, and passes the others on.
		grants := h.takeGrants()
		for range max(grants-1, 0) {
			m.passOn(h)
		}
		granted = grants > 0
	}
	ch := make(chan attempt, 1)
	var mu sync.Mutex
	abandoned := false
	m.inflight.Add(1)
	go func() {
		defer m.inflight.Done()
		r := m.tryAll(h, granted)
		mu.Lock()
		defer mu.Unlock()
		if abandoned {
			if r.err == nil {
				m.giveBack(r.img)
			}
			return
		}
		ch <- r
	}()
	select {
	case r := <-ch:
		return m.settle(r)
	case <-ctx.Done():
		mu.Lock()
		abandoned = true
		mu.Unlock()
		select {
		case r := <-ch: // it finished just as ctx ended: give the lock back
			if r.err == nil {
				m.giveBack(r.img)
			}
		default:
		}
		return nil, context.Cause(ctx)
	}
}

// attempt is the outcome of one try over every slot.
type attempt struct {
	img      *rbd.Image
	slot     int
	err      error
	deferred bool // not tried: other live waiters are ahead in the queue
}

// tryAll tries the slots from a random one, unless other waiters come first (a node a releasing
// holder granted a slot is first). It may block in librbd (behind a holder that died during the
// call).
func (m *Mutex) tryAll(h *handover, granted bool) attempt {
	// Behind other live waiters only the queue is read: the lock images see the same few
	// operations per handover however many nodes wait.
	if h != nil && !granted && !h.mayPoll(m.o.Slots) {
		return attempt{err: ErrLocked, deferred: true}
	}
	first := rand.N(m.o.Slots)
	for k := range m.o.Slots {
		slot := (first + k) % m.o.Slots
		img, err := m.acquire(SlotImage(m.o.Image, slot))
		if !errors.Is(err, ErrLocked) {
			return attempt{img: img, slot: slot, err: err}
		}
	}
	return attempt{err: ErrLocked}
}

// settle turns a finished attempt into TryLock's answer: a lease, or a place in the queue.
func (m *Mutex) settle(r attempt) (*Lease, error) {
	if r.err != nil {
		if errors.Is(r.err, ErrLocked) {
			m.count(func(s *Stats) {
				s.Busy++
				if r.deferred {
					s.PollsDeferred++
				}
			})
			m.wait()
		}
		return nil, r.err
	}
	m.StopWaiting() // a grant for another slot that came meanwhile goes on
	return m.newLease(r.img, r.slot), nil
}

// giveBack releases a lock nobody will use (its TryLock gave up before it was obtained) and
// hands the slot to the next waiter.
func (m *Mutex) giveBack(img *rbd.Image) {
	_ = img.LockRelease()
	_ = img.Close()
	if h := m.handoverState(); h != nil {
		m.passOn(h)
	}
}

// handoverState is the queue's state on this connection; nil before Ensure and after Close.
func (m *Mutex) handoverState() *handover {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.hand
}

func (m *Mutex) count(f func(*Stats)) {
	m.mu.Lock()
	defer m.mu.Unlock()
	f(&m.stats)
}

func (m *Mutex) acquire(name string) (*rbd.Image, error) {
	spec := m.o.Pool + "/" + name
	ioctx, err := cephconn.OpenPool(m.conn, m.o.Pool)
	if err != nil {
		return nil, fmt.Errorf("lock image %s: %w", spec, err)
	}
	// The image keeps working after ioctx is destroyed: librbd holds its own copy.
	defer ioctx.Destroy()
	img, err := rbd.OpenImage(ioctx, name, rbd.NoSnapshot)
	if err != nil {
		return nil, fmt.Errorf("opening lock image %s: %w", spec, wrapErr(err))
	}
	m.count(func(s *Stats) { s.Attempts++ })
	owner, live := lockOwner(img)
	if live {
		// Asking librbd would send the owner a lock request and wait for its answer, which a
		// busy owner (a paced flatten blocks its librbd thread) gives only seconds later.
		_ = img.Close()
		return nil, ErrLocked
	}
	err = img.LockAcquire(rbd.LockModeExclusive)
	if err == nil {
		if owner != "" {
			// librbd broke a dead owner's lock: make sure it is fenced before using the slot.
			if err := m.fenced(spec, owner); err != nil {
				_ = img.LockRelease()
				_ = img.Close()
				return nil, err
			}
		}
		return img, nil
	}
	_ = img.Close()
	switch {
	case cephconn.IsErrno(err, syscall.EROFS), cephconn.IsErrno(err, syscall.EBUSY):
		return nil, ErrLocked
	case cephconn.IsErrno(err, syscall.EINVAL):
		return nil, fmt.Errorf("%s: %w (rbd feature enable %s exclusive-lock)", spec, ErrNoExclusiveLock, spec)
	}
	return nil, fmt.Errorf("acquiring lock on %s: %w", spec, wrapErr(err))
}

// fenced checks that owner, whose lock on spec librbd just broke, is blocklisted. A blocklist
// this key may not read is a warning; an owner that is not blocklisted (and cannot be added)
// is an error, and the slot is not used.
func (m *Mutex) fenced(spec, owner string) error {
	until, err := Fence(m.conn, owner)
	switch {
	case errors.Is(err, ErrFenceUnverified):
		if m.warn != nil {
			m.warn(fmt.Sprintf("took over %s from a dead holder, but %v", spec, err))
		}
		return nil
	case err != nil:
		return fmt.Errorf("took over %s from a dead holder: %w: not using the slot", spec, err)
	}
	if m.warn != nil && time.Until(until) < 5*time.Minute {
		m.warn(fmt.Sprintf("took over %s: its previous holder %s is blocklisted only until %s", spec, owner, until.Format(time.RFC3339)))
	}
	return nil
}

// lockOwner returns the owner of img's lock, if any, and whether it still watches the image: a
// live holder. An owner without a watch is dead (its watch timed out), and only LockAcquire
// breaks its lock; on any doubt this says not live and LockAcquire decides. A dead owner is
// returned only if it still owns the lock after its watch was found gone: a holder that releases
// cleanly unlocks before it unwatches, so it is never taken for a dead one (and fenced).
func lockOwner(img *rbd.Image) (owner string, live bool) {
	owners, err := img.LockGetOwners()
	if err != nil || len(owners) == 0 {
		return "", false
	}
	owner = owners[0].Owner
	watchers, err := img.ListWatchers()
	if err != nil {
		return owner, false
	}
	for _, w := range watchers {
		if w.Addr == owner {
			return owner, true
		}
	}
	if owners, err = img.LockGetOwners(); err != nil || len(owners) == 0 || owners[0].Owner != owner {
		return "", false
	}
	return owner, false
}

// wrapErr marks errors that mean this connection is dead as ErrLost as well.
func wrapErr(err error) error {
	if cephconn.IsBlocklisted(err) {
		return fmt.Errorf("%w: %w (this client was blocklisted)", ErrLost, err)
	}
	return cephconn.WithHint(err)
}
