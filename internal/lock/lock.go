// Package lock is flattend's cluster-wide semaphore: the managed exclusive locks of N small
// dedicated RBD images ("slots"). Whoever holds a slot may flatten one clone; everyone else backs
// off, and is woken the moment a holder releases.
//
// The shape follows etcd's concurrency.Mutex: TryLock returns ErrLocked at once when every slot is
// held by a live client, and a Lease whose Done channel closes when the lock is lost. The lease
// lives on the caller's RADOS connection, and the caller must do the guarded work (the flatten) on
// that same connection: a node that breaks a stale holder's lock makes Ceph blocklist the holder's
// connection, which fences the holder's flatten I/O too. A lost lease means a dead connection:
// the caller shuts it down and dials a new one.
package lock

import (
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/ceph/go-ceph/rados"
)

var (
	// ErrLocked means live clients hold every slot; try again later.
	ErrLocked = errors.New("lock is held by another node")
	// ErrLost means a lease ended without Unlock: another node broke the lock (and blocklisted
	// this connection), or ownership could not be confirmed.
	ErrLost = errors.New("lock lost")
	// ErrNoExclusiveLock means a lock image lacks the exclusive-lock feature.
	ErrNoExclusiveLock = errors.New("lock image lacks the exclusive-lock feature")
	// ErrNotLockImage means the configured image is someone's data image, not a lock image.
	ErrNotLockImage = errors.New("image is not a dedicated lock image")
)

const (
	// lockImageSize is the size given to a lock image flattend creates; it never holds data.
	lockImageSize = 1 << 20
	// maxLockImageSize: anything bigger is somebody's disk, not a lock image.
	maxLockImageSize = 64 << 20
)

// Options configure a Mutex.
type Options struct {
	Pool  string
	Image string // slot 0 is Image itself; slot i > 0 is "Image.i"
	// Slots is how many flattens may run at once cluster-wide (at least 1). Nodes with different
	// values share the first slots, so at most max(old, new) run while a change rolls out.
	Slots int
	// CheckInterval is how often a lease confirms it still owns its slot.
	CheckInterval time.Duration
	// BackoffMin and BackoffMax bound Lock's jittered wait between two tries while every slot
	// is busy (a release wakes the next waiter sooner).
	BackoffMin, BackoffMax time.Duration
	// Node names this node in the holder record other nodes read.
	Node string
	// Version is this build's version, shown in the holder record.
	Version string
}

// validate refuses options that cannot work; the config package sets the defaults.
func (o Options) validate() error {
	switch {
	case o.Pool == "" || o.Image == "":
		return errors.New("lock: pool and image must be set")
	case o.Slots < 1:
		return fmt.Errorf("lock: slots must be at least 1, got %d", o.Slots)
	case o.CheckInterval <= 0:
		return fmt.Errorf("lock: check interval must be positive, got %s", o.CheckInterval)
	case o.BackoffMin <= 0 || o.BackoffMax < o.BackoffMin:
		return fmt.Errorf("lock: backoff must be 0 < min <= max, got %s..%s", o.BackoffMin, o.BackoffMax)
	}
	return nil
}

// SlotImage is the name of slot i's lock image.
func SlotImage(image string, i int) string {
	if i == 0 {
		return image
	}
	return image + "." + strconv.Itoa(i)
}

// HandoverObject is the RADOS object, beside the lock images, whose omap queues the waiters.
func HandoverObject(image string) string { return image + ".handover" }

// WakeObject is the RADOS object that node watches for the grant of a slot.
func WakeObject(image, node string) string { return image + ".wake." + node }

// Mutex is the set of slots, on one connection.
type Mutex struct {
	conn *rados.Conn
	o    Options
	// lost, if set, is told when a lease of this Mutex is lost or fails to unlock (its Session
	// ends then).
	lost func(error)
	busy func(wait time.Duration) // Hooks.Busy
	warn func(msg string)         // Hooks.Warn
	now  func() time.Time         // this node's clock; tests move it
	// notifyTimeout is how long a release waits for a waiter's ack (defaultNotifyTimeout,
	// unless a test on a loaded machine raises it: a slow ack is taken for a dead waiter).
	notifyTimeout time.Duration

	// inflight counts librbd calls still running after their caller gave up (a LockAcquire that
	// blocks behind a dead holder cannot be interrupted) and notifications being sent.
	inflight sync.WaitGroup

	mu           sync.Mutex
	hand         *handover // nil until Ensure
	stats        Stats
	closing      bool
	waitingSince time.Time     // when this node began waiting for a slot; zero when not waiting
	handingOver  chan struct{} // closed when the last release's handover is done
	granted      bool          // that handover gave the slot to a waiting node
}

// Stats counts what this Mutex asked of the cluster.
type Stats struct {
	Attempts      int64 // lock image tries: an owner check, and LockAcquire unless a live client owns it
	Busy          int64 // TryLocks that found every slot busy
	NotifiesSent  int64
	Grants        int64 // releases that handed the slot to a waiting node
	WakesReceived int64 // grants received
	PollsDeferred int64 // TryLocks answered from the queue (other waiters first), without LockAcquire
}

// New returns the mutex on the slots described by o, over conn. Call Ensure before locking.
func New(conn *rados.Conn, o Options) (*Mutex, error) {
	if err := o.validate(); err != nil {
		return nil, err
	}
	return &Mutex{conn: conn, o: o, now: time.Now, notifyTimeout: defaultNotifyTimeout}, nil
}

// Name is "pool/image" (of slot 0), with the slot count when there are several.
func (m *Mutex) Name() string {
	if m.o.Slots > 1 {
		return fmt.Sprintf("%s/%s (%d slots)", m.o.Pool, m.o.Image, m.o.Slots)
	}
	return m.o.Pool + "/" + m.o.Image
}

// Stats returns the counters so far.
func (m *Mutex) Stats() Stats {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.stats
}
