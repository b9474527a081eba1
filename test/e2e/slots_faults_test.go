package e2e

import (
	"fmt"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ceph/go-ceph/rados"

	"github.com/flattend/flattend/internal/lock"
	"github.com/flattend/flattend/test/cephtest"
	"github.com/flattend/flattend/test/observer"
)

// slotFleet is n nodes sharing a lock of `slots` slots, each owning one clone of a shared parent
// of 64 KiB objects, flattened paced (32 MiB at 2 MiB/s: 16 s by construction).
type slotFleet struct {
	conn                *rados.Conn
	ioctx               *rados.IOContext
	parent              cephtest.Parent
	lockImage           string
	slots               int
	nodes, clones, conf []string
}

func newSlotFleet(t *testing.T, n, slots int) *slotFleet {
	t.Helper()
	conn := cephtest.Connect(t)
	f := &slotFleet{conn: conn, ioctx: cephtest.IOContext(t, conn), lockImage: cephtest.Name(t, "lock"), slots: slots}
	f.parent = cephtest.MakeParent(t, f.ioctx, cephtest.Name(t, "parent"), 32<<20, 16)
	for i := range n {
		node := cephtest.Name(t, fmt.Sprintf("n%d", i))
		cephtest.Clone(t, f.ioctx, f.parent, node+"-c", node)
		f.nodes, f.clones = append(f.nodes, node), append(f.clones, node+"-c")
		f.conf = append(f.conf, nodeConfig(t, node, f.lockImage, fmt.Sprintf(
			"lock: {pool: %s, image: %s, check_interval: 1s, slots: %d}\nflatten: {concurrent_ops: 1, max_bytes_per_second: 2MiB}\n",
			cephtest.Pool, f.lockImage, slots)))
	}
	return f
}

// holders waits until every slot is owned by one of procs that is copying its clone (it logged
// progress), and returns, per slot, the index of that process and the slot's owner address as
// RADOS shows it.
func (f *slotFleet) holders(t *testing.T, procs []*proc) (idx []int, addr []string) {
	t.Helper()
	for deadline := time.Now().Add(2 * time.Minute); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		st, err := lock.ReadStatus(f.conn, cephtest.Pool, f.lockImage, f.slots)
		if err != nil {
			continue // the slot images are made by the first node
		}
		idx, addr = nil, nil
		for _, s := range st {
			i := slices.IndexFunc(procs, func(p *proc) bool {
				return s.Holder != nil && s.Owner != "" && s.Holder.PID == p.cmd.Process.Pid && s.Holder.Client == s.Owner
			})
			if i < 0 || !slices.ContainsFunc(procs[i].events(t), func(e event) bool { return e.Msg == "flatten progress" }) {
				break
			}
			idx, addr = append(idx, i), append(addr, s.Owner)
		}
		if len(idx) == f.slots {
			return idx, addr
		}
	}
	t.Fatalf("the %d slots of %s were not all held by flattening nodes within 2 minutes", f.slots, f.lockImage)
	return nil, nil
}

// Two slots, four nodes: the holder of slot 0 is killed -9 and the holder of slot 1 stopped
// (SIGSTOP) past the watch timeout, both mid-flatten. From RADOS alone: never more than 2
// flattens at once, each broken holder is blocklisted and never owns a lock again once its
// successor flattens, and the two waiting nodes take over both slots. Every clone ends flat with
// its parent's content (the broken nodes' clones by a later run of those nodes).
func TestTwoSlotsKilledAndStoppedHolders(t *testing.T) {
	f := newSlotFleet(t, 4, 2)
	w := watchRADOS(t, f.conn, f.ioctx, f.lockImage, 2, f.clones...)
	var procs []*proc
	for i := range f.nodes {
		procs = append(procs, start(t, "once", "--config", f.conf[i]))
	}
	idx, addr := f.holders(t, procs)
	killed, stopped := procs[idx[0]], procs[idx[1]]
	if err := killed.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if err := stopped.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = stopped.cmd.Process.Signal(syscall.SIGCONT) })
	killed.wait(t, 10*time.Second)
	var survivors []int
	for i := range procs {
		if i != idx[0] && i != idx[1] {
			survivors = append(survivors, i)
		}
	}
	for _, i := range survivors {
		if code := procs[i].wait(t, cephtest.WatchTimeout()+3*time.Minute); code != 0 {
			t.Fatalf("surviving node %s exited %d", f.nodes[i], code)
		}
		cephtest.AssertFlatAndIntact(t, f.ioctx, f.parent, f.clones[i])
	}
	// The stopped holder wakes up fenced; whatever it does then, the observer keeps watching.
	if err := stopped.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	stopped.wait(t, 2*time.Minute)
	for _, i := range idx {
		if code, out := runCmd(t, 3*time.Minute, "once", "--config", f.conf[i]); code != 0 {
			t.Fatalf("rerun of broken node %s: exit %d\n%s", f.nodes[i], code, out)
		}
	}
	for i := range f.clones {
		cephtest.AssertFlatAndIntact(t, f.ioctx, f.parent, f.clones[i])
	}
	st := w.finish(t)
	if st.MaxConcurrent != 2 {
		t.Errorf("the observer saw at most %d flattens at once, want 2 (both slots busy)", st.MaxConcurrent)
	}
	for slot := range 2 {
		old := w.assertFenced(t, slot)
		if bare(old.Addr) != bare(addr[slot]) {
			t.Errorf("slot %d: the observer's first holder is %s at %s, the test broke %s", slot, old, old.Addr, addr[slot])
		}
		next := w.slotOwners(slot)[1].Owner
		if !slices.ContainsFunc(survivors, func(i int) bool { return ownsClone(w, next, f.clones[i]) }) {
			t.Errorf("slot %d went to %s, which flattened no surviving node's clone", slot, next)
		}
	}
}

// ownsClone reports whether the observer saw o own clone's lock.
func ownsClone(w *witness, o observer.Owner, clone string) bool {
	return slices.ContainsFunc(w.Sightings(), func(s observer.Sighting) bool { return !s.Slot && s.Image == clone && s.Owner.Client == o.Client })
}

// unlock --force --slot 1 on a two-slot lock breaks exactly slot 1's holder: from RADOS, slot 1's
// lock image loses that owner and its client is blocklisted, while slot 0's holder keeps its lock
// and is not blocklisted; the broken client never owns a lock again (the observer), and a waiting
// node takes slot 1.
func TestUnlockSlotBreaksOnlyThatSlot(t *testing.T) {
	f := newSlotFleet(t, 3, 2)
	w := watchRADOS(t, f.conn, f.ioctx, f.lockImage, 2, f.clones...)
	procs := []*proc{start(t, "once", "--config", f.conf[0]), start(t, "once", "--config", f.conf[1])}
	idx, addr := f.holders(t, procs)
	procs = append(procs, start(t, "once", "--config", f.conf[2])) // waits for a slot
	slot0 := cephtest.Lockers(t, f.ioctx, f.lockImage)
	slot1 := cephtest.Lockers(t, f.ioctx, f.lockImage+".1")
	if len(slot0) != 1 || len(slot1) != 1 {
		t.Fatalf("lockers before: slot 0 %q, slot 1 %q", slot0, slot1)
	}
	code, out := runStdin(t, "", "unlock", "--force", "--force-live", "--yes", "--slot", "1", "--config", f.conf[2])
	if code != 0 || !strings.Contains(out, "lock of slot 1 broken") {
		t.Fatalf("unlock --slot 1: exit %d\n%s", code, out)
	}
	if got := cephtest.Lockers(t, f.ioctx, f.lockImage+".1"); slices.Contains(got, slot1[0]) {
		t.Errorf("slot 1 is still owned by %s after unlock --slot 1", slot1[0])
	}
	if got := cephtest.Lockers(t, f.ioctx, f.lockImage); !slices.Equal(got, slot0) {
		t.Errorf("slot 0 changed owner: %q before unlock --slot 1, %q after", slot0, got)
	}
	if !blocklisted(t, f.conn, addr[1]) {
		t.Errorf("slot 1's holder %s is not in `ceph osd blocklist ls`", addr[1])
	}
	if blocklisted(t, f.conn, addr[0]) {
		t.Errorf("slot 0's holder %s was blocklisted by unlock --slot 1", addr[0])
	}
	for _, i := range []int{idx[0], 2} {
		if code := procs[i].wait(t, 3*time.Minute); code != 0 {
			t.Fatalf("node %s exited %d", f.nodes[i], code)
		}
	}
	procs[idx[1]].wait(t, 3*time.Minute) // broken: it may fail, or reconnect as a new client
	if code, out := runCmd(t, 3*time.Minute, "once", "--config", f.conf[idx[1]]); code != 0 {
		t.Fatalf("rerun of the broken node: exit %d\n%s", code, out)
	}
	for _, c := range f.clones {
		cephtest.AssertFlatAndIntact(t, f.ioctx, f.parent, c)
	}
	w.finish(t)
	old := w.assertFenced(t, 1)
	if bare(old.Addr) != bare(addr[1]) {
		t.Errorf("slot 1: the observer's first holder is %s at %s, unlock broke %s", old, old.Addr, addr[1])
	}
	if first := w.slotOwners(0)[0].Owner; bare(first.Addr) != bare(addr[0]) || blocklisted(t, f.conn, first.Addr) {
		t.Errorf("slot 0's first holder %s at %s: want %s, not blocklisted", first, first.Addr, addr[0])
	}
}

// bare drops an address's messenger prefix: the observer reads "v1:127.0.0.1:0/123", the
// holder record "127.0.0.1:0/123".
func bare(a string) string {
	_, rest, ok := strings.Cut(a, ":")
	if ok && (strings.HasPrefix(a, "v1:") || strings.HasPrefix(a, "v2:") || strings.HasPrefix(a, "any:")) {
		return rest
	}
	return a
}
