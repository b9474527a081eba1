package lock_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"

	"github.com/flattend/flattend/internal/lock"
	"github.com/flattend/flattend/test/cephtest"
)

// Many nodes starting at once all create the lock images; every one must succeed. The race is
// narrow (a loser's create returns "exists" while the winner is still writing the header), so the
// start is repeated over fresh images.
func TestEnsureConcurrentCreate(t *testing.T) {
	conn := cephtest.DaemonConnect(t)
	ioctx := cephtest.IOContext(t, conn)
	const nodes, rounds, slots = 6, 10, 2
	conns := make([]*rados.Conn, nodes)
	for i := range conns {
		conns[i] = cephtest.DaemonConnect(t)
	}
	for round := range rounds {
		image := cephtest.Name(t, fmt.Sprintf("lock%d", round))
		errs := make([]error, nodes)
		var wg sync.WaitGroup
		start := make(chan struct{})
		for i := range nodes {
			wg.Add(1)
			go func() {
				defer wg.Done()
				m := newMutex(t, conns[i], lock.Options{Pool: cephtest.Pool, Image: image, Slots: slots, CheckInterval: time.Second})
				<-start
				errs[i] = m.Ensure()
			}()
		}
		close(start)
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Errorf("round %d, node %d: %v", round, i, err)
			}
		}
		for s := range slots {
			img, err := rbd.OpenImageReadOnly(ioctx, lock.SlotImage(image, s), rbd.NoSnapshot)
			if err != nil {
				t.Fatal(err)
			}
			f, _ := img.GetFeatures()
			img.Close()
			if f&rbd.FeatureExclusiveLock == 0 {
				t.Errorf("created lock image lacks exclusive-lock (features %#x)", f)
			}
		}
	}
}

// halfCreate leaves what a create killed after claiming the name looks like, or what a loser of
// a create race sees for a few milliseconds: rbd_id.<name> naming an image with no header.
func halfCreate(t *testing.T, ioctx *rados.IOContext, name string) {
	t.Helper()
	id := "f1a77e4dbad"
	b := binary.LittleEndian.AppendUint32(nil, uint32(len(id)))
	if err := ioctx.WriteFull("rbd_id."+name, append(b, id...)); err != nil {
		t.Fatal(err)
	}
}

// A node whose create found the name taken waits for the creator to finish writing the header.
func TestEnsureWaitsForConcurrentCreate(t *testing.T) {
	conn := cephtest.DaemonConnect(t)
	ioctx := cephtest.IOContext(t, conn)
	image := cephtest.Name(t, "lock")
	halfCreate(t, ioctx, image)
	errc := make(chan error, 1)
	go func() {
		errc <- newMutex(t, conn, lock.Options{Pool: cephtest.Pool, Image: image, CheckInterval: time.Second}).Ensure()
	}()
	time.Sleep(300 * time.Millisecond)
	// The "other node" finishes: here by making the image anew.
	if err := ioctx.Delete("rbd_id." + image); err != nil {
		t.Fatal(err)
	}
	if _, err := rbd.Create2(ioctx, image, 1<<20, rbd.FeatureLayering|rbd.FeatureExclusiveLock, 22); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("Ensure while another create finishes: %v", err)
	}
}

// A name claimed by a create that never finished is an error that says what to do, not a hang.
func TestEnsureHalfCreatedImage(t *testing.T) {
	conn := cephtest.DaemonConnect(t)
	ioctx := cephtest.IOContext(t, conn)
	image := cephtest.Name(t, "lock")
	halfCreate(t, ioctx, image)
	t.Cleanup(func() { _ = ioctx.Delete("rbd_id." + image) })
	err := newMutex(t, conn, lock.Options{Pool: cephtest.Pool, Image: image, CheckInterval: time.Second}).Ensure()
	if err == nil || !strings.Contains(err.Error(), "no header") || !strings.Contains(err.Error(), "rbd rm "+cephtest.Pool+"/"+image) {
		t.Fatalf("Ensure on a half-created lock image = %v, want an error saying how to remove it", err)
	}
}

func TestLockImageWithoutExclusiveLock(t *testing.T) {
	conn := cephtest.DaemonConnect(t)
	ioctx := cephtest.IOContext(t, conn)
	image := cephtest.Name(t, "nolock")
	if _, err := rbd.Create2(ioctx, image, 1<<20, rbd.FeatureLayering, 22); err != nil {
		t.Fatal(err)
	}
	err := newMutex(t, conn, lock.Options{Pool: cephtest.Pool, Image: image, CheckInterval: time.Second}).Ensure()
	if !errors.Is(err, lock.ErrNoExclusiveLock) {
		t.Fatalf("Ensure = %v, want ErrNoExclusiveLock", err)
	}
	t.Logf("error shown to the operator: %v", err)
}

func TestMissingPool(t *testing.T) {
	conn := cephtest.DaemonConnect(t)
	err := newMutex(t, conn, lock.Options{Pool: "no-such-pool", Image: "flattend-lock", CheckInterval: time.Second}).Ensure()
	if err == nil || !strings.Contains(err.Error(), `pool "no-such-pool" does not exist`) {
		t.Fatalf("Ensure = %v, want a missing-pool error", err)
	}
}

func TestTryLockBusyThenFree(t *testing.T) {
	connA, connB := cephtest.DaemonConnect(t), cephtest.DaemonConnect(t)
	cephtest.IOContext(t, connA)
	image := cephtest.Name(t, "lock")
	a := newMutex(t, connA, lock.Options{Pool: cephtest.Pool, Image: image, CheckInterval: time.Second})
	b := newMutex(t, connB, lock.Options{Pool: cephtest.Pool, Image: image, CheckInterval: time.Second})
	if err := a.Ensure(); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	la, err := a.TryLock(ctx)
	if err != nil {
		t.Fatalf("a: %v", err)
	}
	if _, err := b.TryLock(ctx); !errors.Is(err, lock.ErrLocked) {
		t.Fatalf("b while a holds: %v, want ErrLocked", err)
	}
	if err := la.Unlock(); err != nil {
		t.Fatalf("a unlock: %v", err)
	}
	lb, err := b.TryLock(ctx)
	if err != nil {
		t.Fatalf("b after release: %v", err)
	}
	defer lb.Unlock()
	if _, err := a.TryLock(ctx); !errors.Is(err, lock.ErrLocked) {
		t.Fatalf("a while b holds: %v, want ErrLocked", err)
	}
	select {
	case <-lb.Done():
		t.Fatalf("b's lease ended while held: %v", lb.Err())
	default:
	}
}

// A node that breaks our lock (as librbd does to a dead holder) blocklists our connection: the
// lease must notice and say so on Done, and its Context must be cancelled with the loss as cause.
func TestLeaseLossIsSignalled(t *testing.T) {
	connA, connB := cephtest.DaemonConnect(t), cephtest.DaemonConnect(t)
	ioB := cephtest.IOContext(t, connB)
	image := cephtest.Name(t, "lock")
	a := newMutex(t, connA, lock.Options{Pool: cephtest.Pool, Image: image, CheckInterval: 500 * time.Millisecond})
	if err := a.Ensure(); err != nil {
		t.Fatal(err)
	}
	la, err := a.TryLock(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	guarded, cancel := la.Context(context.Background())
	defer cancel()

	img, err := rbd.OpenImage(ioB, image, rbd.NoSnapshot)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	owners, err := img.LockGetOwners()
	if err != nil || len(owners) != 1 {
		t.Fatalf("owners = %v, %v", owners, err)
	}
	if err := img.LockBreak(rbd.LockModeExclusive, owners[0].Owner); err != nil {
		t.Fatalf("break: %v", err)
	}
	select {
	case <-la.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("lease did not notice the broken lock within 30 s")
	}
	if !errors.Is(la.Err(), lock.ErrLost) {
		t.Errorf("Err = %v, want ErrLost", la.Err())
	}
	select {
	case <-guarded.Done():
		if !errors.Is(context.Cause(guarded), lock.ErrLost) {
			t.Errorf("guarded context cause = %v", context.Cause(guarded))
		}
	case <-time.After(wakeBound):
		t.Fatal("guarded context not cancelled on loss")
	}
	if err := la.Unlock(); !errors.Is(err, lock.ErrLost) {
		t.Errorf("Unlock after loss = %v, want the loss", err)
	}
	// The breaker can now take it.
	if err := img.LockAcquire(rbd.LockModeExclusive); err != nil {
		t.Fatalf("breaker cannot take the lock: %v", err)
	}
	_ = img.LockRelease()
}

// A cancelled context gives up on TryLock without leaving the lock taken.
func TestTryLockCancelled(t *testing.T) {
	conn := cephtest.DaemonConnect(t)
	cephtest.IOContext(t, conn)
	image := cephtest.Name(t, "lock")
	m := newMutex(t, conn, lock.Options{Pool: cephtest.Pool, Image: image, CheckInterval: time.Second})
	if err := m.Ensure(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := m.TryLock(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("TryLock on cancelled ctx = %v", err)
	}
	if err := m.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	other := newMutex(t, cephtest.DaemonConnect(t), lock.Options{Pool: cephtest.Pool, Image: image, CheckInterval: time.Second})
	l, err := other.TryLock(context.Background())
	if err != nil {
		t.Fatalf("lock left taken by an abandoned TryLock: %v", err)
	}
	_ = l.Unlock()
}

func TestSlots(t *testing.T) {
	image := cephtest.Name(t, "slots")
	var leases []*lock.Lease
	var muts []*lock.Mutex
	for range 3 {
		c := cephtest.DaemonConnect(t)
		m := newMutex(t, c, lock.Options{Pool: cephtest.Pool, Image: image, Slots: 2, Node: "n"})
		if err := m.Ensure(); err != nil {
			t.Fatal(err)
		}
		muts = append(muts, m)
	}
	for i := range 2 {
		l, err := muts[i].TryLock(context.Background())
		if err != nil {
			t.Fatalf("slot %d: %v", i, err)
		}
		leases = append(leases, l)
	}
	if leases[0].Slot() == leases[1].Slot() {
		t.Fatalf("two leases on slot %d", leases[0].Slot())
	}
	if _, err := muts[2].TryLock(context.Background()); !errors.Is(err, lock.ErrLocked) {
		t.Fatalf("third node with 2 slots held: %v, want ErrLocked", err)
	}
	// A node configured with 1 slot competes for slot 0 only.
	one := newMutex(t, cephtest.DaemonConnect(t), lock.Options{Pool: cephtest.Pool, Image: image, Slots: 1})
	if err := one.Ensure(); err != nil {
		t.Fatal(err)
	}
	if _, err := one.TryLock(context.Background()); !errors.Is(err, lock.ErrLocked) {
		t.Fatalf("1-slot node while both slots held: %v", err)
	}
	free := leases[0].Slot()
	if err := leases[0].Unlock(); err != nil {
		t.Fatal(err)
	}
	l, err := muts[2].TryLock(context.Background())
	if err != nil || l.Slot() != free {
		t.Fatalf("after releasing slot %d: %v, %v", free, l, err)
	}
	_ = l.Unlock()
	_ = leases[1].Unlock()
}

// A release wakes the waiters on other connections at once.
func TestReleaseWakesWaiters(t *testing.T) {
	image := cephtest.Name(t, "wake")
	holder := newMutex(t, cephtest.DaemonConnect(t), lock.Options{Pool: cephtest.Pool, Image: image})
	waiter := newMutex(t, cephtest.DaemonConnect(t), lock.Options{Pool: cephtest.Pool, Image: image})
	patient(holder, waiter)
	for _, m := range []*lock.Mutex{holder, waiter} {
		if err := m.Ensure(); err != nil {
			t.Fatal(err)
		}
	}
	l, err := holder.TryLock(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := waiter.TryLock(context.Background()); !errors.Is(err, lock.ErrLocked) {
		t.Fatal(err)
	}
	select {
	case <-waiter.Wake():
		t.Fatal("woken before any release")
	default:
	}
	// The waiter's entry is written in the background: a release before it is in the queue has
	// nobody to wake (seen on a loaded machine, make test CEPH=reef beside make test).
	waitQueued(t, holder, image, 1)
	if err := l.Unlock(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-waiter.Wake():
	case <-time.After(wakeBound):
		t.Fatalf("no wake-up within %s of the release", wakeBound)
	}
	wl, err := waiter.TryLock(context.Background())
	if err != nil {
		t.Fatalf("woken waiter could not take the lock: %v", err)
	}
	_ = wl.Unlock()
	if s := waiter.Stats(); s.WakesReceived < 1 || s.Attempts != 2 {
		t.Errorf("waiter stats %+v", s)
	}
}

// Waiters are served in the order they began waiting, and a waiter behind others does not touch
// the lock image while it waits.
func TestQueueOrderAndDeferredPolls(t *testing.T) {
	image := cephtest.Name(t, "queue")
	o := lock.Options{Pool: cephtest.Pool, Image: image}
	holder := newMutex(t, cephtest.DaemonConnect(t), o)
	var waiters []*lock.Mutex
	for i := range 3 {
		o.Node = fmt.Sprintf("w%d", i)
		waiters = append(waiters, newMutex(t, cephtest.DaemonConnect(t), o))
	}
	patient(append([]*lock.Mutex{holder}, waiters...)...)
	for _, m := range append([]*lock.Mutex{holder}, waiters...) {
		if err := m.Ensure(); err != nil {
			t.Fatal(err)
		}
	}
	l, err := holder.TryLock(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range waiters {
		if _, err := w.TryLock(context.Background()); !errors.Is(err, lock.ErrLocked) {
			t.Fatal(err)
		}
		time.Sleep(5 * time.Millisecond) // distinct waiting starts
	}
	waitQueued(t, holder, image, 3)
	// Polls behind the first waiter are answered from the queue.
	for _, w := range waiters[1:] {
		before := w.Stats()
		if _, err := w.TryLock(context.Background()); !errors.Is(err, lock.ErrLocked) {
			t.Fatal(err)
		}
		if s := w.Stats(); s.Attempts != before.Attempts || s.PollsDeferred != before.PollsDeferred+1 {
			t.Errorf("a waiter behind another tried the lock image: before %+v, after %+v", before, s)
		}
	}
	if _, err := waiters[0].TryLock(context.Background()); !errors.Is(err, lock.ErrLocked) {
		t.Fatal(err)
	}
	if s := waiters[0].Stats(); s.Attempts != 2 || s.PollsDeferred != 0 {
		t.Errorf("the first waiter must poll the lock image: %+v", s)
	}
	// Each release wakes the next in line, and only it.
	for i, w := range waiters {
		if err := l.Unlock(); err != nil {
			t.Fatal(err)
		}
		select {
		case <-w.Wake():
		case <-time.After(wakeBound):
			t.Fatalf("waiter %d not woken within %s of the release", i, wakeBound)
		}
		for j, other := range waiters {
			if j == i {
				continue
			}
			select {
			case <-other.Wake():
				t.Fatalf("release %d woke waiter %d too", i, j)
			default:
			}
		}
		if l, err = w.TryLock(context.Background()); err != nil {
			t.Fatalf("woken waiter %d could not take the lock: %v", i, err)
		}
	}
	_ = l.Unlock()
}

// waitQueued waits until n nodes are in the queue: a Wait writes its entry in the background.
func waitQueued(t *testing.T, m *lock.Mutex, image string, n int) {
	t.Helper()
	conn := cephtest.DaemonConnect(t)
	for deadline := time.Now().Add(wakeBound); ; time.Sleep(20 * time.Millisecond) {
		q, err := lock.ReadQueue(conn, cephtest.Pool, image)
		if err != nil {
			t.Fatal(err)
		}
		if len(q) == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("queue %+v, want %d entries", q, n)
		}
	}
}

// A grant that reaches a node which then stops waiting goes on to the next waiter.
func TestUnusedGrantPassedOn(t *testing.T) {
	image := cephtest.Name(t, "pass")
	o := lock.Options{Pool: cephtest.Pool, Image: image}
	holder := newMutex(t, cephtest.DaemonConnect(t), o)
	o.Node = "first"
	first := newMutex(t, cephtest.DaemonConnect(t), o)
	o.Node = "second"
	second := newMutex(t, cephtest.DaemonConnect(t), o)
	patient(holder, first, second)
	for _, m := range []*lock.Mutex{holder, first, second} {
		if err := m.Ensure(); err != nil {
			t.Fatal(err)
		}
	}
	l, err := holder.TryLock(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range []*lock.Mutex{first, second} {
		if _, err := w.TryLock(context.Background()); !errors.Is(err, lock.ErrLocked) {
			t.Fatal(err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	waitQueued(t, holder, image, 2)
	if err := l.Unlock(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-first.Wake():
	case <-time.After(wakeBound):
		t.Fatal("first waiter not granted")
	}
	first.StopWaiting() // its pass ended meanwhile: the slot must not sit idle
	select {
	case <-second.Wake():
	case <-time.After(wakeBound):
		t.Fatal("the unused grant was not passed on to the second waiter")
	}
	sl, err := second.TryLock(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	_ = sl.Unlock()
}

// A waiter that died while queued cannot stall the queue: a release skips it, and a poller behind
// it drops it and polls.
func TestDeadWaiterSkipped(t *testing.T) {
	image := cephtest.Name(t, "dead")
	o := lock.Options{Pool: cephtest.Pool, Image: image}
	holder := newMutex(t, cephtest.DaemonConnect(t), o)
	deadConn := cephtest.DaemonConnect(t)
	dead := cephtest.Mutex(t, deadConn, o) // never closed: it dies with its connection
	live := newMutex(t, cephtest.DaemonConnect(t), o)
	for _, m := range []*lock.Mutex{holder, dead, live} {
		if err := m.Ensure(); err != nil {
			t.Fatal(err)
		}
	}
	l, err := holder.TryLock(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dead.TryLock(context.Background()); !errors.Is(err, lock.ErrLocked) {
		t.Fatal(err)
	}
	if _, err := live.TryLock(context.Background()); !errors.Is(err, lock.ErrLocked) {
		t.Fatal(err)
	}
	waitQueued(t, holder, image, 2)
	deadConn.Shutdown()

	// Behind the dead waiter, the live one still polls: its ping goes unanswered.
	before := live.Stats()
	if _, err := live.TryLock(context.Background()); !errors.Is(err, lock.ErrLocked) {
		t.Fatal(err)
	}
	if s := live.Stats(); s.Attempts != before.Attempts+1 {
		t.Errorf("behind a dead waiter, a poll must try the lock: before %+v, after %+v", before, s)
	}
	// The release goes to the live waiter.
	if err := l.Unlock(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-live.Wake():
	case <-time.After(wakeBound):
		t.Fatalf("live waiter not woken within %s of the release", wakeBound)
	}
	wl, err := live.TryLock(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	_ = wl.Unlock()
}

// The holder describes itself on the lock image; any node reads it; a record whose writer no
// longer owns the lock reads as stale.
func TestHolderRecordAndStatus(t *testing.T) {
	image := cephtest.Name(t, "rec")
	connA := cephtest.DaemonConnect(t)
	a := newMutex(t, connA, lock.Options{Pool: cephtest.Pool, Image: image, Node: "node-a", CheckInterval: 200 * time.Millisecond})
	if err := a.Ensure(); err != nil {
		t.Fatal(err)
	}
	l, err := a.TryLock(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Working("pool/clone"); err != nil {
		t.Fatal(err)
	}
	l.Progress(5, 20)
	reader := cephtest.DaemonConnect(t)
	var st []lock.SlotStatus
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, err = lock.ReadStatus(reader, cephtest.Pool, image, 1)
		if err != nil {
			t.Fatal(err)
		}
		if h := st[0].Holder; h != nil && h.Clone == "pool/clone" && h.Done == 5 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("record never showed the progress: %+v", st[0].Holder)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if h := st[0].Holder; h.Node != "node-a" || h.Total != 20 || st[0].Stale || st[0].Owner == "" || h.Client != st[0].Owner {
		t.Fatalf("status %+v holder %+v", st[0], h)
	}
	// Break the lock from elsewhere, as a node taking over from a dead holder does.
	ioB := cephtest.IOContext(t, reader)
	img, err := rbd.OpenImage(ioB, image, rbd.NoSnapshot)
	if err != nil {
		t.Fatal(err)
	}
	if err := img.LockBreak(rbd.LockModeExclusive, st[0].Owner); err != nil {
		t.Fatal(err)
	}
	img.Close()
	st, err = lock.ReadStatus(reader, cephtest.Pool, image, 1)
	if err != nil || st[0].Holder == nil || !st[0].Stale {
		t.Fatalf("after the break: %+v, %v; want a stale record", st, err)
	}
	<-l.Done()
	_ = l.Unlock()
}

func TestLockImageWithDataRefused(t *testing.T) {
	conn := cephtest.DaemonConnect(t)
	ioctx := cephtest.IOContext(t, conn)
	p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "data"), 4<<20, 22)
	err := newMutex(t, conn, lock.Options{Pool: cephtest.Pool, Image: p.Name}).Ensure()
	if !errors.Is(err, lock.ErrNotLockImage) || !strings.Contains(err.Error(), "holds data") {
		t.Fatalf("Ensure on a data image = %v", err)
	}
	clone := cephtest.Name(t, "clone")
	cephtest.Clone(t, ioctx, p, clone, "")
	err = newMutex(t, conn, lock.Options{Pool: cephtest.Pool, Image: clone}).Ensure()
	if !errors.Is(err, lock.ErrNotLockImage) || !strings.Contains(err.Error(), "clone") {
		t.Fatalf("Ensure on a clone = %v", err)
	}
}

// newMutex is lock.New, closed before the test's connections are shut down (a watch left on a
// shut-down connection makes librados abort on the next notification).
func newMutex(t *testing.T, conn *rados.Conn, o lock.Options) *lock.Mutex {
	m := cephtest.Mutex(t, conn, o)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := m.Close(ctx); err != nil {
			t.Error(err)
		}
	})
	return m
}

// patient gives ms a notify timeout well above any scheduling delay: a test of which waiter a
// release wakes must not see a live waiter that acked late taken for dead and skipped.
func patient(ms ...*lock.Mutex) {
	for _, m := range ms {
		lock.SetNotifyTimeout(m, wakeBound/2)
	}
}

// wakeBound is how long a test waits for a release's notification (or a loss's cancel) before
// calling it a hang. It bounds no speed: the release notifies at once, and a loaded machine
// may take seconds to run the watch callback; the order of wake-ups is what the tests assert.
const wakeBound = time.Minute
