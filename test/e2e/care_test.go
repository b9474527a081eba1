package e2e

import (
	"context"
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ceph/go-ceph/rbd"

	"github.com/flattend/flattend/internal/lock"
	"github.com/flattend/flattend/test/cephtest"
)

// A clone another client has open (standing in for a running VM's qemu) is skipped under the
// default flatten.in_use: skip, and `once` says so and exits 1; with in_use: allow it is flattened.
func TestInUseCloneSkipped(t *testing.T) {
	conn := cephtest.Connect(t)
	ioctx := cephtest.IOContext(t, conn)
	p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 8<<20, 22)
	node := cephtest.Name(t, "n")
	busy, free := node+"-busy", node+"-free"
	cephtest.Clone(t, ioctx, p, busy, node)
	cephtest.Clone(t, ioctx, p, free, node)
	qemu := cephtest.Connect(t)
	release := cephtest.HoldLock(t, cephtest.IOContext(t, qemu), busy)

	lockImage := cephtest.Name(t, "lock")
	code, out := runCmd(t, time.Minute, "once", "--config", nodeConfig(t, node, lockImage, ""))
	if code != 1 || !strings.Contains(out, "clone in use, skipped") || !strings.Contains(out, "lock owner client.") {
		t.Errorf("once with a clone in use: exit %d, want 1 and the skip explained:\n%s", code, out)
	}
	if !cephtest.IsClone(t, ioctx, busy) {
		t.Error("the clone in use was flattened")
	}
	cephtest.AssertFlatAndIntact(t, ioctx, p, free)

	release()
	code, out = runCmd(t, time.Minute, "once", "--config", nodeConfig(t, node, lockImage, ""))
	if code != 0 {
		t.Fatalf("once after the other client closed the clone: exit %d\n%s", code, out)
	}
	cephtest.AssertFlatAndIntact(t, ioctx, p, busy)
}

// The space gate refuses a clone whose pool has too little room for it, before anything is
// copied, and `once` exits 1 with the reason; with room again the same clone is flattened. The
// room is a byte quota on a pool of the test's own (the parent lives in the shared test pool:
// a parent in another pool is an edge case worth covering too).
func TestSpaceGateRefuses(t *testing.T) {
	conn := cephtest.Connect(t)
	ioctx := cephtest.IOContext(t, conn)
	p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 32<<20, 22)
	pool := cephtest.Name(t, "pool")
	cephtest.EnsurePool(t, conn, pool)
	pctx := cephtest.PoolIOContext(t, conn, pool)
	node := cephtest.Name(t, "n")
	clone := node + "-c"
	cephtest.CloneTo(t, ioctx, p, pctx, clone, node)
	quota := func(bytes int) {
		cephtest.MonCommand(t, conn, map[string]any{"prefix": "osd pool set-quota", "pool": pool, "field": "max_bytes", "val": fmt.Sprint(bytes)})
	}
	quota(60 << 20) // < 32 MiB × the default space_factor 2

	conf := nodeConfig(t, node, cephtest.Name(t, "lock"), fmt.Sprintf("discovery: {pools: [{pool: %s}]}\n", pool))
	code, out := runCmd(t, time.Minute, "once", "--config", conf)
	if code != 1 || !strings.Contains(out, "space gate closed: pool "+pool+" has 60.0 MiB available, the flatten needs 32.0 MiB × 2") {
		t.Errorf("once on a pool without room: exit %d, want 1 and the space gate's reason:\n%s", code, out)
	}
	if strings.Contains(out, "flatten started") {
		t.Error("a flatten started behind a closed gate")
	}
	if !cephtest.IsClone(t, pctx, clone) {
		t.Fatal("flattened although the gate was closed")
	}

	quota(0) // no quota
	if code, out := runCmd(t, time.Minute, "once", "--config", conf); code != 0 {
		t.Fatalf("once with room: exit %d\n%s", code, out)
	}
	cephtest.AssertFlatAndIntact(t, pctx, p, clone)
}

// A clone whose data lives in another pool (rbd clone --data-pool, as with an erasure-coded data
// pool): the space gate asks about the pool its bytes go to. Before, it asked about the clone's
// own pool, which had room, and flattened into a data pool that had none.
func TestSpaceGateWatchesDataPool(t *testing.T) {
	conn := cephtest.Connect(t)
	ioctx := cephtest.IOContext(t, conn)
	p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 32<<20, 22)
	dataPool := cephtest.Name(t, "data")
	cephtest.EnsurePool(t, conn, dataPool)
	node := cephtest.Name(t, "n")
	clone := node + "-c"
	cephtest.CloneDataPool(t, ioctx, p, clone, dataPool)
	cephtest.SetMeta(t, ioctx, clone, "flattend.owner", node)
	quota := func(bytes int) {
		cephtest.MonCommand(t, conn, map[string]any{"prefix": "osd pool set-quota", "pool": dataPool, "field": "max_bytes", "val": fmt.Sprint(bytes)})
	}
	quota(60 << 20) // < 32 MiB × the default space_factor 2

	conf := nodeConfig(t, node, cephtest.Name(t, "lock"), "")
	code, out := runCmd(t, time.Minute, "once", "--config", conf)
	if code != 1 || !strings.Contains(out, "space gate closed: pool "+dataPool+" has 60.0 MiB available") {
		t.Errorf("once with a full data pool: exit %d, want 1 and the space gate naming %s:\n%s", code, dataPool, out)
	}
	if !cephtest.IsClone(t, ioctx, clone) {
		t.Fatal("flattened into a data pool without room")
	}
	quota(0)
	if code, out := runCmd(t, time.Minute, "once", "--config", conf); code != 0 {
		t.Fatalf("once with room: exit %d\n%s", code, out)
	}
	cephtest.AssertFlatAndIntact(t, ioctx, p, clone)
}

// A gate that closes while a flatten runs aborts it within a check interval, logs why, keeps what
// was copied, and the next run finishes the clone. The health gate is closed for real: lowering
// the nearfull ratio below the OSD's use raises OSD_NEARFULL, on a cluster of the test's own
// (the packages sharing the main one run in parallel, and their health gates would close).
func TestHealthGateAbortsRunningFlatten(t *testing.T) {
	cephtest.OwnCluster(t, "2")
	conn := cephtest.Connect(t)
	n := newSlowNode(t, conn, 256)
	conf := nodeConfig(t, n.node, n.lockImage, "flatten: {concurrent_ops: 1}\ngates: {check_interval: 1s}\n")
	// Paced at 1 MiB/s: 256 s of flatten by construction, far past the health change however
	// slow the monitors are to raise it; the abort ends it early.
	paced := nodeConfig(t, n.node, n.lockImage, "flatten: {concurrent_ops: 1, max_bytes_per_second: 1MiB}\ngates: {check_interval: 1s}\n")
	pr := start(t, "once", "--config", paced)
	pr.waitFor(t, time.Minute, "flatten progress", func(e event) bool { return e.Msg == "flatten progress" })

	ratio := func(r float64) {
		cephtest.MonCommand(t, conn, map[string]any{"prefix": "osd set-nearfull-ratio", "ratio": r})
	}
	restored := false
	restore := func() {
		if !restored {
			restored = true
			ratio(0.85)
			waitHealth(t, conn, func(h string) bool { return !strings.Contains(h, "OSD_NEARFULL") })
		}
	}
	t.Cleanup(restore)
	ratio(0.00001)
	aborted := time.Now()
	if code := pr.wait(t, 4*time.Minute); code != 1 {
		t.Errorf("once whose flatten a gate aborted: exit %d, want 1", code)
	}
	fin := pr.waitFor(t, time.Second, "flatten finished", func(e event) bool { return e.Msg == "flatten finished" })
	if fin.Result != "aborted by a safety gate" || !strings.Contains(fin.Error, "health gate closed: OSD_NEARFULL") {
		t.Errorf("flatten finished: result %q, error %q; want aborted by the health gate", fin.Result, fin.Error)
	}
	t.Logf("aborted %s after the nearfull ratio was lowered", fin.TS.Sub(aborted).Round(time.Millisecond))
	if !cephtest.IsClone(t, n.ioctx, n.clone) {
		t.Fatal("the clone was detached although its flatten was aborted")
	}

	restore()
	if code, out := runCmd(t, 2*time.Minute, "once", "--config", conf); code != 0 {
		t.Fatalf("once after the gate opened: exit %d\n%s", code, out)
	}
	cephtest.AssertFlatAndIntact(t, n.ioctx, n.parent, n.clone)
}

// The window's end cancels the running flatten (it resumes in a later run), and a flatten does not
// start when less than flatten.min_time_left of the window is left.
func TestWindowEnd(t *testing.T) {
	conn := cephtest.Connect(t)
	late := newSlowNode(t, conn, 16)
	ending := newSlowNode(t, conn, 256) // paced at 1 MiB/s below: 256 s of copying, by construction
	window := func(left time.Duration) string {
		now := time.Now()
		opened := now.Truncate(time.Minute)
		return fmt.Sprintf("window: {schedule: \"%d %d * * *\", duration: %s}\n", opened.Minute(), opened.Hour(),
			now.Sub(opened)+left)
	}
	lateRun := start(t, "run", "--config", nodeConfig(t, late.node, late.lockImage, window(40*time.Second)+"flatten: {min_time_left: 1m}\n"))
	lateRun.waitFor(t, time.Minute, "refusal to start", func(e event) bool { return e.Msg == "no more flattens in this window" })

	// The window must end while the flatten runs. The flatten outlasts any of these windows by
	// construction; a window so short that this machine did not even start the flatten in it
	// proves nothing (and flattens nothing), and is tried again, longer.
	var fin event
	for _, left := range []time.Duration{10 * time.Second, 40 * time.Second, 160 * time.Second} {
		run := start(t, "run", "--config", nodeConfig(t, ending.node, ending.lockImage, window(left)+"flatten: {concurrent_ops: 1, min_time_left: 1s, max_bytes_per_second: 1MiB}\n"))
		run.waitFor(t, left+2*time.Minute, "the window's end", func(e event) bool { return e.Msg == "window ended" })
		started := count(run.events(t), "flatten started") > 0
		if started {
			fin = run.waitFor(t, time.Minute, "flatten finished", func(e event) bool { return e.Msg == "flatten finished" })
		}
		if err := run.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		if code := run.wait(t, time.Minute); code != 0 {
			t.Fatalf("run after the window's end and SIGTERM: exit %d", code)
		}
		if started {
			break
		}
		t.Logf("a window of %s ended before this machine started the flatten: again, longer", left)
	}
	if fin.Msg == "" {
		t.Fatal("the flatten never started inside a window")
	}
	if fin.Result != "cancelled" || !strings.Contains(fin.Error, "the flatten window closed") {
		t.Errorf("flatten at the window's end: result %q, error %q; want cancelled by the window", fin.Result, fin.Error)
	}
	if count(lateRun.events(t), "flatten started") != 0 {
		t.Error("a flatten started with less than min_time_left of the window left")
	}
	for _, n := range []slowNode{late, ending} {
		if !cephtest.IsClone(t, n.ioctx, n.clone) {
			t.Errorf("%s flattened although the window did not allow it", n.clone)
		}
	}
	if code, out := runCmd(t, 3*time.Minute, "once", "--config", ending.conf); code != 0 {
		t.Fatalf("resuming once: exit %d\n%s", code, out)
	}
	cephtest.AssertFlatAndIntact(t, ending.ioctx, ending.parent, ending.clone)
}

// cleanup.parent_snapshots removes a matching parent snapshot once its last clone is flat, and
// never one outside the pattern or one with clones left. A clone marked by an interrupted flatten
// (here the mark flattend 0.x left) is verified like every clone, its flatten reports the
// interruption and clears the mark, and its parent snapshot then goes too.
func TestParentSnapshotCleanup(t *testing.T) {
	conn := cephtest.Connect(t)
	ioctx := cephtest.IOContext(t, conn)
	node := cephtest.Name(t, "n")
	parent := func(snap string) cephtest.Parent {
		p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 4<<20, 22)
		q := cephtest.SnapProtect(t, ioctx, p.Name, snap)
		q.Size, q.Digest = p.Size, p.Digest
		return q
	}
	done, other, outside, hurt := parent("snapshot-done"), parent("snapshot-other"), parent("golden"), parent("snapshot-hurt")
	cephtest.Clone(t, ioctx, done, node+"-d1", node)
	cephtest.Clone(t, ioctx, done, node+"-d2", node)
	cephtest.Clone(t, ioctx, other, node+"-o1", node)
	cephtest.Clone(t, ioctx, other, cephtest.Name(t, "theirs"), "another-node")
	cephtest.Clone(t, ioctx, outside, node+"-g1", node)
	cephtest.Clone(t, ioctx, hurt, node+"-h1", node)
	cephtest.SetMeta(t, ioctx, node+"-h1", "flattend.interrupted", "2026-11-24T00:00:00Z repaired by test")

	code, out := runCmd(t, 2*time.Minute, "once", "--config", nodeConfig(t, node, cephtest.Name(t, "lock"),
		"cleanup: {parent_snapshots: true, snapshot_pattern: \"^snapshot-\"}\n"))
	if code != 0 {
		t.Fatalf("once: exit %d\n%s", code, out)
	}
	for _, c := range []struct {
		p    cephtest.Parent
		kept bool
	}{{done, false}, {other, true}, {outside, true}, {hurt, false}} {
		if got := cephtest.HasSnapshot(t, ioctx, c.p.Name, c.p.Snap); got != c.kept {
			t.Errorf("%s@%s: exists = %v, want %v", c.p.Name, c.p.Snap, got, c.kept)
		}
	}
	for _, want := range []string{"parent snapshot removed: its last clone is flat", "1 clone(s) still depend on it",
		"resuming an interrupted flatten"} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q", want)
		}
	}
	for c, p := range map[string]cephtest.Parent{"-d1": done, "-d2": done, "-o1": other, "-g1": outside, "-h1": hurt} {
		cephtest.AssertFlatAndIntact(t, ioctx, p, node+c)
	}
}

// Clone edge cases: a clone of a clone (the deeper one goes first), a clone whose parent is in
// the trash, and a clone deleted between discovery and its turn: all handled with a log line.
func TestCloneEdgeCases(t *testing.T) {
	conn := cephtest.Connect(t)
	ioctx := cephtest.IOContext(t, conn)
	node := cephtest.Name(t, "n")
	p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 4<<20, 22)
	child, grandchild := node+"-child", node+"-grandchild"
	cephtest.Clone(t, ioctx, p, child, node)
	c1 := cephtest.SnapProtect(t, ioctx, child, "s2")
	c1.Size, c1.Digest = p.Size, p.Digest
	cephtest.Clone(t, ioctx, c1, grandchild, node)

	trashed := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "trashed"), 4<<20, 22)
	orphan := node + "-of-trashed"
	cephtest.Clone(t, ioctx, trashed, orphan, node)
	img, err := rbd.OpenImage(ioctx, trashed.Name, rbd.NoSnapshot)
	if err != nil {
		t.Fatal(err)
	}
	if err := img.Trash(0); err != nil {
		t.Fatalf("moving %s to the trash: %v", trashed.Name, err)
	}
	img.Close()

	doomed := node + "-doomed"
	cephtest.Clone(t, ioctx, p, doomed, node)

	// Hold the lock so that the node discovers, then waits; delete a clone meanwhile.
	lockImage := cephtest.Name(t, "lock")
	conf := nodeConfig(t, node, lockImage, "")
	holder := cephtest.Connect(t)
	m := cephtest.Mutex(t, holder, lock.Options{Pool: cephtest.Pool, Image: lockImage, CheckInterval: time.Second})
	if err := m.Ensure(); err != nil {
		t.Fatal(err)
	}
	lease, err := m.TryLock(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	pr := start(t, "once", "--config", conf)
	pr.waitFor(t, 30*time.Second, "discovery", func(e event) bool { return e.Msg == "discovered clones" })
	if err := rbd.RemoveImage(ioctx, doomed); err != nil {
		t.Fatal(err)
	}
	if err := lease.Unlock(); err != nil {
		t.Fatal(err)
	}
	_ = m.Close(context.Background())
	if code := pr.wait(t, 2*time.Minute); code != 0 {
		t.Fatalf("once: exit %d", code)
	}
	evs := pr.events(t)
	gone := false
	var order []string
	for _, e := range evs {
		if e.Msg == "image gone since discovery, skipped" && strings.HasSuffix(e.Image, doomed) {
			gone = true
		}
		if e.Msg == "flatten started" {
			order = append(order, e.Image[strings.LastIndexByte(e.Image, '/')+1:])
		}
	}
	if !gone {
		t.Error("no 'image gone since discovery' line for the deleted clone")
	}
	if len(order) != 3 || order[0] != grandchild {
		t.Errorf("flattens in order %v, want 3 with the grandchild (depth 2) first", order)
	}
	for _, c := range []string{child, grandchild} {
		cephtest.AssertFlatAndIntact(t, ioctx, p, c)
	}
	cephtest.AssertFlatAndIntact(t, ioctx, trashed, orphan)
}

// A paced flatten holds each object back on a librbd thread that the lock's connection shares.
// With 4 MiB objects at 1 MiB/s that thread is blocked 4 s at a time while another node keeps
// asking for the lock: the holder must keep its lock (no loss, no fencing) and finish, and the
// other node must get the slot after it, never during.
func TestPacedFlattenKeepsLock(t *testing.T) {
	conn := cephtest.Connect(t)
	ioctx := cephtest.IOContext(t, conn)
	p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 16<<20, 22) // 4 objects of 4 MiB
	lockImage := cephtest.Name(t, "lock")
	a, b := cephtest.Name(t, "a"), cephtest.Name(t, "b")
	cephtest.Clone(t, ioctx, p, a+"-c", a)
	cephtest.Clone(t, ioctx, p, b+"-c", b)
	w := watchRADOS(t, conn, ioctx, lockImage, 1, a+"-c", b+"-c")
	pa := start(t, "once", "--config", nodeConfig(t, a, lockImage, "flatten: {max_bytes_per_second: 1MiB}\n"))
	pa.waitFor(t, time.Minute, "a's flatten start", func(e event) bool { return e.Msg == "flatten started" })
	pb := start(t, "once", "--config", nodeConfig(t, b, lockImage, ""))
	all := waitAllOK(t, []*proc{pa, pb}, 2*time.Minute)
	w.finish(t) // b never flattened while a held the lock, as RADOS saw it
	for _, c := range []string{a + "-c", b + "-c"} {
		cephtest.AssertFlatAndIntact(t, ioctx, p, c)
	}
	busy := 0
	for _, e := range all {
		switch {
		case e.Node == a && (strings.Contains(e.Msg, "lock lost") || strings.Contains(e.Msg, "fenced")):
			t.Errorf("the paced holder lost its lock: %s %s", e.Msg, e.Error)
		case e.Node == b && e.Msg == "lock busy, backing off":
			busy++
		}

	}
	// b polls every second at most (backoff max 1s) during a's 12 s: its attempts must come back
	// busy, not hang in librbd until a releases.
	if busy < 3 {
		t.Errorf("node b found the lock busy %d times during a 12 s flatten: its attempts hung", busy)
	}
	ivs := intervals(t, all, time.Time{})
	if len(ivs) != 2 {
		t.Fatalf("%d flattens, want 2", len(ivs))
	}
	t.Logf("paced flatten of 16 MiB at 1 MiB/s: %s; node b asked %d times meanwhile", ivs[0].to.Sub(ivs[0].from).Round(time.Millisecond), busy)
}
