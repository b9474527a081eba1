package e2e

import (
	"maps"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"

	"github.com/flattend/flattend/internal/flattener"
	"github.com/flattend/flattend/test/cephtest"
)

// breakFromOutside breaks image's lock as an operator would (`rbd lock rm`, then `ceph osd
// blocklist add` of its owner) and waits until this connection has the OSD map that fences it.
// It returns the owner's address.
func breakFromOutside(t *testing.T, conn *rados.Conn, ioctx *rados.IOContext, image string) string {
	t.Helper()
	img, err := rbd.OpenImage(ioctx, image, rbd.NoSnapshot)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	_, lockers, err := img.ListLockers()
	if err != nil || len(lockers) != 1 {
		t.Fatalf("lockers of %s: %+v, %v", image, lockers, err)
	}
	l := lockers[0]
	if err := img.BreakLock(l.Client, l.Cookie); err != nil {
		t.Fatalf("breaking %s's lock on %s: %v", l.Client, image, err)
	}
	cephtest.MonCommand(t, conn, map[string]any{"prefix": "osd blocklist", "blocklistop": "add", "addr": l.Addr})
	if err := conn.WaitForLatestOSDMap(); err != nil {
		t.Fatal(err)
	}
	return l.Addr
}

// A lease lost in the middle of a lost-copy-up repair stops the repair: no object is written by
// the fenced client, the clone keeps its flattening mark, and the next holder verifies, repairs
// and flattens it to its parent's content. Both nodes verify whatever the librbd
// (verify_copyups: always).
//
// The repair is held by construction: the clone's data lives in a pool of the test's own whose
// object quota is reached, so librados parks the repair's first copy-up write (a full pool
// pauses writes, it does not fail them). The test then breaks the slot's lock from outside,
// blocklists its owner and keeps the slot itself (A reconnects as a new client), lifts the
// quota, and reads from RADOS that the parked write never landed: no data object of the clone
// was created or changed.
func TestLockLostDuringRepair(t *testing.T) {
	conn := cephtest.Connect(t)
	ioctx := cephtest.IOContext(t, conn)
	p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 8<<20, 16) // 128 objects
	dataPool := cephtest.Name(t, "data")
	cephtest.EnsurePool(t, conn, dataPool)
	data := cephtest.PoolIOContext(t, conn, dataPool)
	nodeA, nodeB := cephtest.Name(t, "a"), cephtest.Name(t, "b")
	clone := nodeA + "-c"
	cephtest.CloneDataPool(t, ioctx, p, clone, dataPool)
	cephtest.SetMeta(t, ioctx, clone, "flattend.owner", nodeA)
	var lost []string // lost copy-ups: the object map says they exist, RADOS has no object
	for _, n := range []uint64{10, 40, 70, 100} {
		oid := cephtest.CopyUp(t, ioctx, clone, n)
		if err := data.Delete(oid); err != nil {
			t.Fatal(err)
		}
		lost = append(lost, oid)
	}
	// Object 0 copied up and kept: the pool holds one object, and the evidence below is not blind.
	cephtest.CopyUp(t, ioctx, clone, 0)
	objectQuota(t, conn, dataPool, 1, true)
	t.Cleanup(func() { objectQuota(t, conn, dataPool, 0, false) })

	lockImage := cephtest.Name(t, "lock")
	// A's gates would close on its own full data pool: off, so that it reaches the repair. The
	// repair runs whatever the librbd (a fixed one needs none: verify_copyups: auto skips it).
	a := start(t, "once", "--config", nodeConfig(t, nodeA, lockImage, "gates: {health: false, recovery: false}\nflatten: {verify_copyups: always}\n"))
	// The mark is set right before the verification, on the lease's connection.
	for deadline := time.Now().Add(time.Minute); !strings.Contains(flatteningMark(t, ioctx, clone), nodeA); time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%s never marked %s as being flattened", nodeA, clone)
		}
	}
	before := cephtest.DataObjectsIn(t, conn, cephtest.Pool, dataPool, clone)
	if len(before) != 1 {
		t.Fatalf("data objects of %s before the repair: %v, want object 0 alone", clone, before)
	}
	addr := breakFromOutside(t, conn, ioctx, lockImage)
	// The slot stays taken: A reconnects as a new client once its repair returns, and must not
	// be the one that finishes the clone here.
	release := cephtest.HoldLock(t, cephtest.IOContext(t, cephtest.Connect(t)), lockImage)
	fenced := cephtest.DataObjectsIn(t, conn, cephtest.Pool, dataPool, clone)
	objectQuota(t, conn, dataPool, 0, false) // the parked write goes out now: the OSD must refuse it
	// A's job returns once its repair does: the parked write was answered.
	a.waitFor(t, 2*time.Minute, "the lost lease", func(e event) bool { return e.Msg == "lock lost, reconnecting" })
	after := cephtest.DataObjectsIn(t, conn, cephtest.Pool, dataPool, clone)
	if !maps.Equal(after, fenced) || !maps.Equal(before, fenced) {
		t.Errorf("data objects written after the lease of %s was broken: %v before the break, %v at the fence, %v after the repair returned", addr, before, fenced, after)
	}
	for _, oid := range lost {
		if _, ok := after[oid]; ok {
			t.Errorf("lost object %s was written by the fenced repair", oid)
		}
	}
	if !blocklisted(t, conn, addr) {
		t.Errorf("%s is not in the blocklist", addr)
	}
	if mark := flatteningMark(t, ioctx, clone); !strings.Contains(mark, nodeA) {
		t.Fatalf("after the lost lease %s's %s is %q, want %s's mark", clone, flattener.FlatteningKey, mark, nodeA)
	}
	if err := a.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	a.wait(t, time.Minute)
	release()

	code, out := runCmd(t, 2*time.Minute, "once", "--config", nodeConfig(t, nodeB, lockImage, "flatten: {verify_copyups: always}\n"), "--image", cephtest.Pool+"/"+clone)
	if code != 0 {
		t.Fatalf("once --image by %s: exit %d\n%s", nodeB, code, out)
	}
	cephtest.AssertFlatAndIntact(t, ioctx, p, clone)
	if !strings.Contains(out, "resuming an interrupted flatten") || !strings.Contains(out, "lost copy-ups found and redone before the flatten") {
		t.Errorf("%s did not report resuming %s's flatten and redoing its lost copy-ups:\n%s", nodeB, nodeA, out)
	}
	if mark := flatteningMark(t, ioctx, clone); mark != "" {
		t.Errorf("flattening mark %q left after %s's clean flatten", mark, nodeB)
	}
}

// Node A is killed -9 mid-flatten of its clone; one object it had copied up is then lost (the
// map says it exists, RADOS has no object: what a death between librbd's object-map update and
// its write leaves). Node B flattens that clone (`once --image`): it takes over A's slot once A's
// watch expires (A is fenced, from RADOS), reads the mark A left, verifies, redoes the lost
// copy-up and flattens; the clone ends with its parent's content and without the mark.
func TestTakeoverRepairsOtherNodesClone(t *testing.T) {
	conn := cephtest.Connect(t)
	n := newSlowNode(t, conn, 32) // 512 objects of 64 KiB
	w := watchRADOS(t, conn, n.ioctx, n.lockImage, 1, n.clone)
	// Paced at 2 MiB/s the flatten lasts 16 s by construction: it is running when killed.
	a := start(t, "once", "--config", nodeConfig(t, n.node, n.lockImage, "flatten: {concurrent_ops: 1, max_bytes_per_second: 2MiB}\n"))
	a.waitFor(t, time.Minute, "progress to 10%", func(e event) bool { return e.Msg == "flatten progress" && e.Percent >= 10 })
	if err := a.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	a.wait(t, 10*time.Second)
	if !cephtest.IsClone(t, n.ioctx, n.clone) {
		t.Fatal("clone flat before the kill")
	}
	mark := flatteningMark(t, n.ioctx, n.clone)
	if !strings.Contains(mark, n.node) {
		t.Fatalf("after the kill %s is %q, want %s's mark", flattener.FlatteningKey, mark, n.node)
	}
	// A fresh clone has no data object: every one there now was copied up by A.
	copied := slices.Sorted(maps.Keys(cephtest.DataObjects(t, conn, cephtest.Pool, n.clone)))
	if len(copied) == 0 {
		t.Fatal("A copied nothing up before the kill")
	}
	if err := n.ioctx.Delete(copied[0]); err != nil {
		t.Fatal(err)
	}
	lostObj := copied[0][strings.LastIndexByte(copied[0], '.')+1:]

	nodeB := cephtest.Name(t, "b")
	b := start(t, "once", "--config", nodeConfig(t, nodeB, n.lockImage, "flatten: {concurrent_ops: 1}\n"), "--image", cephtest.Pool+"/"+n.clone)
	if code := b.wait(t, cephtest.WatchTimeout()+2*time.Minute); code != 0 {
		t.Fatalf("%s's once --image exited %d", nodeB, code)
	}
	cephtest.AssertFlatAndIntact(t, n.ioctx, n.parent, n.clone)
	if m := flatteningMark(t, n.ioctx, n.clone); m != "" {
		t.Errorf("flattening mark %q left after %s's clean flatten", m, nodeB)
	}
	w.finish(t)
	w.assertFenced(t, 0)
	evs := b.events(t)
	if !slices.ContainsFunc(evs, func(e event) bool { return e.Msg == "resuming an interrupted flatten" }) {
		t.Errorf("%s did not read the mark %q left by %s", nodeB, mark, n.node)
	}
	if !flattener.CopyupFixed(flattener.CephVersion()) &&
		!slices.ContainsFunc(evs, func(e event) bool { return e.Msg == "lost copy-ups found and redone before the flatten" }) {
		t.Errorf("%s did not redo the lost copy-up of object 0x%s", nodeB, lostObj)
	}
}
