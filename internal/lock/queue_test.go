package lock_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/flattend/flattend/internal/lock"
	"github.com/flattend/flattend/test/cephtest"
)

// A node whose clock runs an hour behind does not go before a node that queued first: the order
// is the cluster's, not the nodes' clocks.
func TestQueueIgnoresNodeClocks(t *testing.T) {
	cephtest.IOContext(t, cephtest.Connect(t)) // the test pool
	image := cephtest.Name(t, "clock")
	o := lock.Options{Pool: cephtest.Pool, Image: image}
	holder := newMutex(t, cephtest.DaemonConnect(t), o)
	o.Node = "early"
	early := newMutex(t, cephtest.DaemonConnect(t), o)
	o.Node = "late-slow-clock"
	late := newMutex(t, cephtest.DaemonConnect(t), o)
	lock.SetClock(late, func() time.Time { return time.Now().Add(-time.Hour) })
	patient(holder, early, late)
	for _, m := range []*lock.Mutex{holder, early, late} {
		if err := m.Ensure(); err != nil {
			t.Fatal(err)
		}
	}
	l, err := holder.TryLock(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := early.TryLock(context.Background()); !errors.Is(err, lock.ErrLocked) {
		t.Fatal(err)
	}
	waitQueued(t, holder, image, 1)
	if _, err := late.TryLock(context.Background()); !errors.Is(err, lock.ErrLocked) {
		t.Fatal(err)
	}
	waitQueued(t, holder, image, 2)
	q, err := lock.ReadQueue(cephtest.DaemonConnect(t), cephtest.Pool, image)
	if err != nil {
		t.Fatal(err)
	}
	if q[0].Node != "early" || q[1].Node != "late-slow-clock" {
		t.Errorf("queue order %+v: the node that queued first must be first", q)
	}
	if err := l.Unlock(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-early.Wake():
	case <-late.Wake():
		t.Fatal("the release woke the node with the slow clock, which queued last")
	case <-time.After(wakeBound):
		t.Fatalf("nobody woken within %s of the release", wakeBound)
	}
	el, err := early.TryLock(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	_ = el.Unlock()
}

// Entries that no flattend wrote (wrong format, hostile bytes, huge or broken values, a wake
// object outside the lock's names, an old-format key with a time of 1970) neither go first nor
// keep a release from waking the live waiter behind them, and status does not list them.
func TestJunkQueueEntriesDoNotBlock(t *testing.T) {
	cephtest.IOContext(t, cephtest.Connect(t)) // the test pool
	image := cephtest.Name(t, "junk")
	o := lock.Options{Pool: cephtest.Pool, Image: image}
	holder := newMutex(t, cephtest.DaemonConnect(t), o)
	o.Node = "live"
	live := newMutex(t, cephtest.DaemonConnect(t), o)
	for _, m := range []*lock.Mutex{holder, live} {
		if err := m.Ensure(); err != nil {
			t.Fatal(err)
		}
	}
	l, err := holder.TryLock(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := live.TryLock(context.Background()); !errors.Is(err, lock.ErrLocked) {
		t.Fatal(err)
	}
	waitQueued(t, holder, image, 1)

	admin := cephtest.IOContext(t, cephtest.Connect(t))
	junk := junkEntries(image)
	if err := admin.SetOmap(lock.HandoverObject(image), junk); err != nil {
		t.Fatal(err)
	}
	q, err := lock.ReadQueue(cephtest.DaemonConnect(t), cephtest.Pool, image)
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range q {
		if strings.ContainsAny(w.Node, "\x1b\x00") || len(w.Node) > 1000 || w.Node == "old-format" || w.Node == "elsewhere" {
			t.Errorf("status lists a junk entry: %.80q", w.Node)
		}
	}
	if err := l.Unlock(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-live.Wake():
	case <-time.After(wakeBound):
		t.Fatalf("the live waiter behind the junk was not granted the slot within %s of the release", wakeBound)
	}
	wl, err := live.TryLock(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	_ = wl.Unlock()
}

// junkEntries are queue entries no flattend writes, and well-formed ones of dead waiters, all
// placed before any live waiter.
func junkEntries(image string) map[string][]byte {
	ghost := func(node string) []byte {
		b, _ := json.Marshal(map[string]string{"node": node, "wake": lock.WakeObject(image, node)})
		return b
	}
	junk := map[string][]byte{
		"w.0000000000000000000.00000000000000000001": ghost("old-format"),
		"w.":                     []byte("{"),
		"w.\x1b[2J\x00evil":      []byte("\x1b[31m"),
		"q.":                     []byte("{"),
		"q.\x1b[2J\x00evil":      ghost("hostile-key"),
		lock.QueueKey(0, 1):      []byte("not json \x1b[31m"),
		lock.QueueKey(0, 2):      []byte(`{"node":"elsewhere","wake":"` + image + `"}`), // the lock image itself
		lock.QueueKey(0, 3):      []byte(`{"node":"big","wake":"` + strings.Repeat("x", 1<<20) + `"}`),
		lock.QueueKey(0, 4) + "": []byte(`{"node":"` + strings.Repeat("n", 1<<20) + `"}`),
	}
	for i := range 6 { // well-formed but dead: nobody answers for them
		junk[lock.QueueKey(uint64(i), uint64(100+i))] = ghost(fmt.Sprintf("dead%d", i))
	}
	return junk
}

// Status lists every waiter, however many there are (omap reads come in pages).
func TestStatusListsAllWaiters(t *testing.T) {
	cephtest.IOContext(t, cephtest.Connect(t)) // the test pool
	image := cephtest.Name(t, "many")
	m := newMutex(t, cephtest.DaemonConnect(t), lock.Options{Pool: cephtest.Pool, Image: image})
	if err := m.Ensure(); err != nil {
		t.Fatal(err)
	}
	const n = 300
	entries := map[string][]byte{}
	for i := range n {
		node := fmt.Sprintf("n%03d", i)
		b, _ := json.Marshal(map[string]string{"node": node, "wake": lock.WakeObject(image, node)})
		entries[lock.QueueKey(uint64(1+i), uint64(1000+i))] = b
	}
	admin := cephtest.IOContext(t, cephtest.Connect(t))
	if err := admin.SetOmap(lock.HandoverObject(image), entries); err != nil {
		t.Fatal(err)
	}
	q, err := lock.ReadQueue(cephtest.DaemonConnect(t), cephtest.Pool, image)
	if err != nil {
		t.Fatal(err)
	}
	if len(q) != n {
		t.Fatalf("status lists %d waiters, want %d", len(q), n)
	}
	for i, w := range q {
		if want := fmt.Sprintf("n%03d", i); w.Node != want {
			t.Fatalf("waiter %d is %q, want %q", i, w.Node, want)
		}
	}
}
