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
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"

	"github.com/flattend/flattend/internal/cephconn"
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
	// Slots is how many flattens may run at once cluster-wide (default 1). Nodes with different
	// values share the first slots, so at most max(old, new) run while a change rolls out.
	Slots int
	// CheckInterval is how often a lease confirms it still owns its slot (default 2 s).
	CheckInterval time.Duration
	// Node names this node in the holder record other nodes read.
	Node string
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

// New returns the mutex on the slots described by o, over conn.
func New(conn *rados.Conn, o Options) *Mutex {
	if o.Slots < 1 {
		o.Slots = 1
	}
	if o.CheckInterval <= 0 {
		o.CheckInterval = 2 * time.Second
	}
	return &Mutex{conn: conn, o: o}
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

// Ensure creates the lock images and the handover object if they are missing, checks that the
// images are fit to be lock images, and starts watching for releases. Many nodes may call it at
// once: creating races are settled by Ceph, "already exists" counts as success.
func (m *Mutex) Ensure() error {
	ioctx, err := cephconn.OpenPool(m.conn, m.o.Pool)
	if err != nil {
		return fmt.Errorf("lock image %s: %w", m.Name(), err)
	}
	defer ioctx.Destroy()
	for i := range m.o.Slots {
		name := SlotImage(m.o.Image, i)
		_, err = rbd.Create2(ioctx, name, lockImageSize, rbd.FeatureLayering|rbd.FeatureExclusiveLock, 22)
		exists := errors.Is(err, rbd.ErrExist) || cephconn.IsErrno(err, syscall.EEXIST)
		if err != nil && !exists {
			return fmt.Errorf("creating lock image %s/%s: %w", m.o.Pool, name, cephconn.WithHint(err))
		}
		err = checkImage(ioctx, m.o.Pool, name)
		// librbd's create claims the name first and writes the header after: a node whose create
		// lost that race can find the header missing for a few milliseconds.
		for wait := 20 * time.Millisecond; exists && cephconn.IsNotFound(err) && wait <= headerWait; wait *= 2 {
			time.Sleep(wait)
			err = checkImage(ioctx, m.o.Pool, name)
		}
		if exists && cephconn.IsNotFound(err) {
			return fmt.Errorf("%w: the name is taken but the image has no header; a create was killed half-way? (rbd rm %s/%s)", err, m.o.Pool, name)
		}
		if err != nil {
			return err
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.hand == nil && !m.closing {
		name := m.o.Node
		if name == "" {
			name = "client." + strconv.FormatUint(m.conn.GetInstanceID(), 10)
		}
		wake := WakeObject(m.o.Image, name)
		h, err := startHandover(m.conn, m.o.Pool, HandoverObject(m.o.Image), wake, m.o.Node,
			func() { m.count(func(s *Stats) { s.WakesReceived++ }) })
		if err != nil {
			return fmt.Errorf("watching %s/%s: %w", m.o.Pool, wake, cephconn.WithHint(err))
		}
		m.hand = h
	}
	return nil
}

// headerWait bounds how long Ensure waits for another node's create to finish (its doubling
// sleeps add up to about 5 s).
const headerWait = 5 * time.Second

// Check verifies, without changing anything, that every slot's lock image exists and is fit: it
// has the exclusive-lock feature, no parent, and no data.
func (m *Mutex) Check() error {
	ioctx, err := cephconn.OpenPool(m.conn, m.o.Pool)
	if err != nil {
		return fmt.Errorf("lock image %s: %w", m.Name(), err)
	}
	defer ioctx.Destroy()
	for i := range m.o.Slots {
		if err := checkImage(ioctx, m.o.Pool, SlotImage(m.o.Image, i)); err != nil {
			return err
		}
	}
	return nil
}

func checkImage(ioctx *rados.IOContext, pool, name string) error {
	spec := pool + "/" + name
	img, err := rbd.OpenImageReadOnly(ioctx, name, rbd.NoSnapshot)
	if err != nil {
		return fmt.Errorf("opening lock image %s: %w", spec, cephconn.WithHint(err))
	}
	defer img.Close()
	features, err := img.GetFeatures()
	if err != nil {
		return fmt.Errorf("features of lock image %s: %w", spec, err)
	}
	if features&rbd.FeatureExclusiveLock == 0 {
		return fmt.Errorf("%s: %w (rbd feature enable %s exclusive-lock)", spec, ErrNoExclusiveLock, spec)
	}
	if _, err := img.GetParent(); err == nil {
		return fmt.Errorf("%s: %w: it is a clone; point lock.image at a dedicated image", spec, ErrNotLockImage)
	}
	size, err := img.GetSize()
	if err != nil {
		return fmt.Errorf("size of lock image %s: %w", spec, err)
	}
	if size > maxLockImageSize {
		return fmt.Errorf("%s: %w: it is %d MiB; point lock.image at a dedicated image (flattend creates a 1 MiB one)", spec, ErrNotLockImage, size>>20)
	}
	hasData := false
	err = img.DiffIterate(rbd.DiffIterateConfig{Offset: 0, Length: size, IncludeParent: rbd.ExcludeParent,
		WholeObject: rbd.EnableWholeObject, Callback: func(_, _ uint64, exists int, _ interface{}) int {
			if exists != 0 {
				hasData = true
			}
			return 0
		}})
	if err != nil {
		return fmt.Errorf("reading lock image %s: %w", spec, cephconn.WithHint(err))
	}
	if hasData {
		return fmt.Errorf("%s: %w: it holds data; point lock.image at a dedicated image", spec, ErrNotLockImage)
	}
	return nil
}

// Wait queues this node for a slot (if it was not already), so that releasing holders hand it
// one in turn. TryLock does it by itself when it finds every slot busy. A failure to queue is
// not an error: the node still polls.
func (m *Mutex) Wait() {
	m.mu.Lock()
	if m.waitingSince.IsZero() {
		m.waitingSince = time.Now()
	}
	h, since := m.hand, m.waitingSince
	m.mu.Unlock()
	if h != nil {
		h.enqueue(since)
	}
}

// StopWaiting takes this node out of the queue of waiters (it has a slot, or nothing left to
// do). A grant that reached it meanwhile is passed on to the next waiter.
func (m *Mutex) StopWaiting() {
	m.mu.Lock()
	m.waitingSince = time.Time{}
	h := m.hand
	m.mu.Unlock()
	if h == nil {
		return
	}
	h.dequeue()
	if h.takeGrants() > 0 {
		m.passOn(h)
	}
}

// passOn hands a slot that this node was granted but does not use to the next waiter, in the
// background: a grant that arrives while the node takes another slot or stops waiting would
// otherwise leave that slot to the polls.
func (m *Mutex) passOn(h *handover) { m.grantNext(h, nil) }

// grantNext hands a freed slot to the longest-waiting node in the background, then tells after
// (if set) whether one took it. It reports false, and does nothing, once the Mutex is closing.
func (m *Mutex) grantNext(h *handover, after func(granted bool)) bool {
	m.mu.Lock()
	if m.closing {
		m.mu.Unlock()
		return false
	}
	m.inflight.Add(1)
	m.mu.Unlock()
	go func() {
		defer m.inflight.Done()
		granted, notifies := h.release()
		m.count(func(s *Stats) {
			s.NotifiesSent += int64(notifies)
			if granted {
				s.Grants++
			}
		})
		if after != nil {
			after(granted)
		}
	}()
	return true
}

// HandedOver waits (until ctx ends) for the handover of this node's last release and reports
// whether the slot went to a waiting node. A node with more work then waits its turn instead of
// taking the slot straight back.
func (m *Mutex) HandedOver(ctx context.Context) bool {
	m.mu.Lock()
	ch := m.handingOver
	m.mu.Unlock()
	if ch == nil {
		return false
	}
	select {
	case <-ch:
	case <-ctx.Done():
		return false
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.handingOver == ch {
		m.handingOver = nil // answer once per release
	}
	return m.granted
}

// Wake returns a channel that receives when a releasing holder granted this node a slot: the
// moment to try again, without waiting for the backoff.
func (m *Mutex) Wake() <-chan struct{} {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.hand == nil {
		return nil
	}
	return m.hand.wake
}

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
	m.mu.Lock()
	h := m.hand
	m.mu.Unlock()
	if h != nil {
		// A broken watch means no grant can reach this node, and a lease on this connection
		// would be lost at its first check: reconnect first.
		if _, err := h.watcher.Check(); err != nil {
			return nil, fmt.Errorf("%w: the watch on %s is broken: %w", ErrLost, h.wakeOID, err)
		}
		// The grants that woke this node: this attempt uses one, and passes the others on.
		for range max(h.takeGrants()-1, 0) {
			m.passOn(h)
		}
	}
	type result struct {
		img      *rbd.Image
		slot     int
		err      error
		deferred bool
	}
	ch := make(chan result, 1)
	var mu sync.Mutex
	abandoned := false
	m.inflight.Add(1)
	go func() {
		defer m.inflight.Done()
		var r result
		r.err = ErrLocked
		// Behind other live waiters only the queue is read: the lock images see the same few
		// operations per handover however many nodes wait.
		r.deferred = h != nil && !h.mayPoll(m.o.Slots)
		first := rand.N(m.o.Slots)
		for k := range m.o.Slots {
			if r.deferred {
				break
			}
			slot := (first + k) % m.o.Slots
			img, err := m.acquire(SlotImage(m.o.Image, slot))
			if errors.Is(err, ErrLocked) {
				continue
			}
			r = result{img: img, slot: slot, err: err}
			break
		}
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
		if r.err != nil {
			if errors.Is(r.err, ErrLocked) {
				m.count(func(s *Stats) {
					s.Busy++
					if r.deferred {
						s.PollsDeferred++
					}
				})
				m.Wait()
			}
			return nil, r.err
		}
		m.StopWaiting() // a grant for another slot that came meanwhile goes on
		return m.newLease(r.img, r.slot), nil
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

// giveBack releases a lock nobody will use (its TryLock gave up before it was obtained) and
// hands the slot to the next waiter.
func (m *Mutex) giveBack(img *rbd.Image) {
	_ = img.LockRelease()
	_ = img.Close()
	m.mu.Lock()
	h := m.hand
	m.mu.Unlock()
	if h != nil {
		m.passOn(h)
	}
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
	if heldByLiveClient(img) {
		// Asking librbd would send the owner a lock request and wait for its answer, which a
		// busy owner (a paced flatten blocks its librbd thread) gives only seconds later.
		_ = img.Close()
		return nil, ErrLocked
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
		return nil, fmt.Errorf("%s: %w (rbd feature enable %s exclusive-lock)", spec, ErrNoExclusiveLock, spec)
	}
	return nil, fmt.Errorf("acquiring lock on %s: %w", spec, wrapErr(err))
}

// heldByLiveClient reports whether img's lock has an owner that still watches the image: a live
// holder. An owner without a watch is dead (its watch timed out), and only LockAcquire breaks its
// lock; on any doubt this says no and LockAcquire decides.
func heldByLiveClient(img *rbd.Image) bool {
	owners, err := img.LockGetOwners()
	if err != nil || len(owners) == 0 {
		return false
	}
	watchers, err := img.ListWatchers()
	if err != nil {
		return false
	}
	for _, w := range watchers {
		if w.Addr == owners[0].Owner {
			return true
		}
	}
	return false
}

// wrapErr marks errors that mean this connection is dead as ErrLost as well.
func wrapErr(err error) error {
	if cephconn.IsBlocklisted(err) {
		return fmt.Errorf("%w: %w (this client was blocklisted)", ErrLost, err)
	}
	return cephconn.WithHint(err)
}

// released hands the freed slot to the longest-waiting node, in the background (HandedOver
// tells how it went).
func (m *Mutex) released() {
	m.mu.Lock()
	h := m.hand
	if h == nil || m.closing {
		m.mu.Unlock()
		return
	}
	done := make(chan struct{})
	m.handingOver, m.granted = done, false
	m.mu.Unlock()
	if !m.grantNext(h, func(granted bool) {
		m.mu.Lock()
		m.granted = granted
		m.mu.Unlock()
		close(done)
	}) {
		close(done)
	}
}

// Close stops watching for releases and waits, at most until ctx ends, for librbd calls that
// callers gave up on. The connection may be shut down only after Close returned nil.
func (m *Mutex) Close(ctx context.Context) error {
	m.mu.Lock()
	m.closing = true
	h := m.hand
	m.hand = nil
	m.mu.Unlock()
	done := make(chan struct{})
	go func() {
		m.inflight.Wait() // notifications use the handover's I/O context: they end first
		if h != nil {
			h.stop()
		}
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("lock %s: a librbd call is still running: %w", m.Name(), context.Cause(ctx))
	}
}

// watchHealth says how long ago this connection's watch was last confirmed by the OSD, or why it
// is broken. A client cut off from the cluster, or blocklisted, finds out here.
func (m *Mutex) watchHealth() (time.Duration, error) {
	m.mu.Lock()
	h := m.hand
	m.mu.Unlock()
	if h == nil {
		return 0, nil
	}
	return h.watcher.Check()
}
