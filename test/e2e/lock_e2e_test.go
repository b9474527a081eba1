package e2e

import (
	"fmt"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/flattend/flattend/test/cephtest"
)

// Three nodes, four clones each, started together: all flat and correct, never two at once, and
// the record of who held the lock when shows the nodes handing over to each other.
func TestThreeNodesHandOver(t *testing.T) {
	conn := cephtest.Connect(t)
	ioctx := cephtest.IOContext(t, conn)
	lockImage := cephtest.Name(t, "lock")
	p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 32<<20, 22)
	var nodes, clones []string
	for n := range 3 {
		node := cephtest.Name(t, fmt.Sprintf("n%d", n))
		nodes = append(nodes, node)
		for i := range 4 {
			c := fmt.Sprintf("%s-c%d", node, i)
			cephtest.Clone(t, ioctx, p, c, node)
			clones = append(clones, c)
		}
	}
	w := watchRADOS(t, conn, ioctx, lockImage, 1, clones...)
	var procs []*proc
	for _, n := range nodes {
		procs = append(procs, start(t, "once", "--config", nodeConfig(t, n, lockImage, "backoff: {min: 1s, max: 5s}\n")))
	}
	all := waitAllOK(t, procs, 3*time.Minute)
	w.finish(t) // never two flattens at once, as RADOS saw it
	for _, c := range clones {
		cephtest.AssertFlatAndIntact(t, ioctx, p, c)
	}
	ivs := intervals(t, all, time.Time{})
	if len(ivs) != 12 {
		t.Fatalf("%d flattens, want 12", len(ivs))
	}
	sort.Slice(ivs, func(i, j int) bool { return ivs[i].from.Before(ivs[j].from) })
	handovers := 0
	var gaps []time.Duration
	for i := 1; i < len(ivs); i++ {
		gaps = append(gaps, ivs[i].from.Sub(ivs[i-1].to))
		if ivs[i].node != ivs[i-1].node {
			handovers++
		}
	}
	var seq []string
	for _, iv := range ivs {
		seq = append(seq, iv.node[len(iv.node)-7:])
	}
	t.Logf("order: %s", strings.Join(seq, " "))
	sort.Slice(gaps, func(i, j int) bool { return gaps[i] < gaps[j] })
	t.Logf("handovers %d; gap between flattens: median %s, max %s (backoff min 1s: the release notification, not polling, starts the next)",
		handovers, gaps[len(gaps)/2].Round(time.Millisecond), gaps[len(gaps)-1].Round(time.Millisecond))
	if handovers < 2 {
		t.Errorf("only %d handovers between nodes: %s", handovers, strings.Join(seq, " "))
	}
	// The gap is a figure, not an assertion (a loaded machine may stretch it past the backoff):
	// that a release wakes the next waiter is asserted causally in internal/lock (TestReleaseWakesWaiters).
}

// slots: 2 and four nodes: never more than two flattens at once, and both slots used while work
// remains, as the RADOS observer saw it. Each flatten lasts 8 s by construction (paced), far
// longer than a waiting node takes to try a free slot (backoff max 1 s, or woken at once).
func TestTwoSlotsFourNodes(t *testing.T) {
	conn := cephtest.Connect(t)
	ioctx := cephtest.IOContext(t, conn)
	lockImage := cephtest.Name(t, "lock")
	p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 16<<20, 16) // 256 objects of 64 KiB
	var clones, nodes []string
	for n := range 4 {
		node := cephtest.Name(t, fmt.Sprintf("n%d", n))
		nodes = append(nodes, node)
		for i := range 2 {
			c := fmt.Sprintf("%s-c%d", node, i)
			cephtest.Clone(t, ioctx, p, c, node)
			clones = append(clones, c)
		}
	}
	w := watchRADOS(t, conn, ioctx, lockImage, 2, clones...)
	var procs []*proc
	for _, node := range nodes {
		procs = append(procs, start(t, "once", "--config", nodeConfig(t, node, lockImage, "lock: {pool: "+cephtest.Pool+", image: "+lockImage+", slots: 2}\nflatten: {concurrent_ops: 1, max_bytes_per_second: 2MiB}\n")))
	}
	all := waitAllOK(t, procs, 3*time.Minute)
	if st := w.finish(t); st.MaxConcurrent != 2 { // never more than two: finish checks it
		t.Errorf("the RADOS observer never saw both slots flattening at once (max %d)", st.MaxConcurrent)
	}
	for _, c := range clones {
		cephtest.AssertFlatAndIntact(t, ioctx, p, c)
	}
	ivs := intervals(t, all, time.Time{})
	if len(ivs) != 8 {
		t.Fatalf("%d flattens, want 8", len(ivs))
	}
}

// A holder stopped (SIGSTOP) past the watch timeout is broken and blocklisted by the node that
// takes over. When it wakes (SIGCONT) it finds the lock lost, does not finish "its" flatten on
// it, reconnects and completes its clone under a new lock.
func TestStoppedHolderIsFencedAndRecovers(t *testing.T) {
	conn := cephtest.Connect(t)
	ioctx := cephtest.IOContext(t, conn)
	lockImage := cephtest.Name(t, "lock")
	slow := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "slow"), 64<<20, 16)
	small := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "small"), 4<<20, 16) // b: 4 s at 1 MiB/s
	nodeA, nodeB := cephtest.Name(t, "a"), cephtest.Name(t, "b")
	cloneA, cloneB := nodeA+"-c", nodeB+"-c"
	cephtest.Clone(t, ioctx, slow, cloneA, nodeA)
	cephtest.Clone(t, ioctx, small, cloneB, nodeB)
	w := watchRADOS(t, conn, ioctx, lockImage, 1, cloneA, cloneB)

	a := start(t, "once", "--config", nodeConfig(t, nodeA, lockImage, "flatten: {concurrent_ops: 1}\n"))
	a.waitFor(t, time.Minute, "progress to 20%", func(e event) bool { return e.Msg == "flatten progress" && e.Percent >= 20 })
	if err := a.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stoppedAt := time.Now()
	b := start(t, "once", "--config", nodeConfig(t, nodeB, lockImage, "flatten: {concurrent_ops: 1, max_bytes_per_second: 1MiB}\n"))
	if code := b.wait(t, cephtest.WatchTimeout()+time.Minute); code != 0 {
		t.Fatalf("node b exited %d", code)
	}
	cephtest.AssertFlatAndIntact(t, ioctx, small, cloneB)
	if !cephtest.IsClone(t, ioctx, cloneA) {
		t.Fatal("a's clone got flat while a was stopped")
	}
	bDone := time.Now()
	if err := a.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	if code := a.wait(t, 2*time.Minute); code != 0 {
		t.Fatalf("node a exited %d after SIGCONT", code)
	}
	if cephtest.IsClone(t, ioctx, cloneA) {
		t.Fatalf("%s still has a parent", cloneA)
	}
	cephtest.AssertFlatAndIntact(t, ioctx, slow, cloneA) // repaired before the resume
	// RADOS shows a fenced: blocklisted, and its stopped client never owned a lock again once b
	// flattened (unfenced, it re-watches its clone on SIGCONT and owns it again).
	w.finish(t)
	w.assertFenced(t, 0)

	aIvs := intervals(t, a.events(t), time.Time{})
	bIvs := intervals(t, b.events(t), time.Time{})
	if len(aIvs) != 2 || aIvs[0].result == "flat" || aIvs[1].result != "flat" {
		t.Fatalf("a's flattens %+v: want one stopped by the loss, then one that finished", aIvs)
	}
	if len(bIvs) != 1 || bIvs[0].from.Before(stoppedAt) {
		t.Fatalf("b's flatten %+v started before a was stopped", bIvs)
	}
	if aIvs[1].from.Before(bDone) {
		t.Fatalf("a restarted its flatten at %s, before b was done at %s", aIvs[1].from, bDone)
	}
	lost := false
	for _, e := range a.events(t) {
		if strings.Contains(e.Msg, "lock lost") || strings.Contains(e.Error, "lock lost") {
			lost = true
		}
	}
	if !lost {
		t.Error("a never said it lost the lock")
	}
	t.Logf("a's first flatten ended %q: %s", aIvs[0].result, firstError(a.events(t)))
}

func firstError(evs []event) string {
	for _, e := range evs {
		if e.Msg == "flatten finished" && e.Error != "" {
			return e.Error
		}
	}
	return ""
}

// flattend status shows, from any node, who holds the lock, on which clone, how far, and who
// waits; its JSON is decoded with the test's own types (formats_test.go).
func TestStatusShowsHolder(t *testing.T) {
	// The holder flattens 128 MiB at 1 MiB/s: 128 s by construction, and it is stopped (SIGTERM)
	// only once status has shown it, however slow the machine. The record is rewritten with
	// progress every 3 s, and each status run connects.
	n := newSlowNode(t, cephtest.Connect(t), 128)
	node, lockImage := n.node, n.lockImage
	cfg := nodeConfig(t, node, lockImage, "flatten: {concurrent_ops: 1, max_bytes_per_second: 1MiB}\n")
	other := nodeConfig(t, cephtest.Name(t, "observer"), lockImage, "")
	status := func() (statusJSON, string) {
		t.Helper()
		code, out := runCmd(t, 30*time.Second, "status", "--config", other, "--json")
		if code != 0 {
			t.Fatalf("status --json: exit %d\n%s", code, out)
		}
		var r statusJSON
		decodeStrict(t, "status --json", out, &r)
		return r, out
	}

	r, out := status()
	if len(r.Slots) != 1 || r.Slots[0].Holder != nil {
		t.Fatalf("status with nobody holding:\n%s", out)
	}
	assertKeys(t, "status --json, free", out, statusKeysFree)
	pr := start(t, "once", "--config", cfg)
	pr.waitFor(t, time.Minute, "progress", func(e event) bool { return e.Msg == "flatten progress" && e.Percent > 0 })
	// A second node queues behind the holder.
	waiter := cephtest.Name(t, "waiter")
	cephtest.Clone(t, n.ioctx, n.parent, waiter+"-c", waiter)
	wp := start(t, "once", "--config", nodeConfig(t, waiter, lockImage, ""))
	for {
		select {
		case <-pr.done:
			t.Fatalf("the holder exited before status showed its progress and the waiter: %s", out)
		case <-wp.done:
			t.Fatalf("the waiter exited while the holder held the lock: %s", out)
		default:
		}
		r, out = status()
		queued := len(r.Waiting) == 1 && r.Waiting[0].Node == waiter && !r.Waiting[0].Since.IsZero()
		if s := r.Slots[0]; s.Holder != nil && s.Percent != nil && *s.Percent > 0 && queued {
			if s.Holder.Node != node || s.Holder.Clone != cephtest.Pool+"/"+node+"-c" || s.Stale || s.ETASec == nil {
				t.Fatalf("status: %s", out)
			}
			assertKeys(t, "status --json, held", out, statusKeysHeld)
			break
		}
		time.Sleep(300 * time.Millisecond)
	}
	code, text := runCmd(t, 30*time.Second, "status", "--config", other)
	if code != 0 || !strings.Contains(text, node) || !strings.Contains(text, "held") || !strings.Contains(text, "1. "+waiter+", for ") {
		t.Errorf("status text: exit %d\n%s", code, text)
	}
	t.Logf("status while flattening:\n%s", text)
	if err := pr.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := pr.wait(t, 2*time.Minute); code != 0 {
		t.Fatalf("once exited %d after SIGTERM", code)
	}
	if code := wp.wait(t, 2*time.Minute); code != 0 {
		t.Fatalf("waiting once exited %d", code)
	}
	r, out = status()
	if r.Slots[0].Holder != nil || r.Slots[0].Owner != "" || len(r.Waiting) != 0 || !strings.Contains(out, `"waiting": []`) {
		t.Fatalf("status after release: %s", out)
	}
}
