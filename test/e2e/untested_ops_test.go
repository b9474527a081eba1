package e2e

import (
	"encoding/json"
	"fmt"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ceph/go-ceph/rados"

	"github.com/flattend/flattend/test/cephtest"
)

// A holder whose slot's lock is broken while it flattens (`unlock --force`: the operator's way,
// which blocklists it) counts the loss: flattend_lock_lost_total and
// flattend_flattens_ended_total{result="cancelled",reason="lock_lost"} are 1, read from the
// real daemon's /metrics; then it reconnects and the clone ends flat and intact.
func TestLockLossCounted(t *testing.T) {
	conn := cephtest.Connect(t)
	n := newSlowNode(t, conn, 64)
	conf := nodeConfig(t, n.node, n.lockImage, "flatten: {concurrent_ops: 1, max_bytes_per_second: 2MiB}\n") // 32 s by construction
	pr := start(t, "run", "--config", conf)
	pr.waitFor(t, time.Minute, "flatten progress", func(e event) bool { return e.Msg == "flatten progress" })
	if v := metricValue(pr.scrape(t), "flattend_lock_lost_total"); v != 0 {
		t.Fatalf("flattend_lock_lost_total %v before any loss", v)
	}
	code, out := runCmd(t, time.Minute, "unlock", "--force", "--force-live", "--yes", "--config", conf)
	if code != 0 || !strings.Contains(out, "lock of slot 0 broken") {
		t.Fatalf("unlock --force: exit %d\n%s", code, out)
	}
	pr.waitMetric(t, time.Minute, "flattend_lock_lost_total", func(v float64) bool { return v == 1 })
	pr.waitMetric(t, 10*time.Second, `flattend_flattens_ended_total{reason="lock_lost",result="cancelled"}`, func(v float64) bool { return v == 1 })
	pr.waitFor(t, 3*time.Minute, "the resumed flatten", func(e event) bool { return e.Msg == "flatten finished" && e.Result == "flat" })
	cephtest.AssertFlatAndIntact(t, n.ioctx, n.parent, n.clone)
}

// A gate counts when it closes: the space gate (a byte quota on a pool of the test's own, so no
// other test is touched) refusing a clone before its flatten, and closing during one, which ends
// cancelled for the gate. flattend_gate_closed_total{gate="space"} and
// flattend_flattens_ended_total{result="cancelled",reason="gate"} read from /metrics.
func TestGateClosedCounted(t *testing.T) {
	conn := cephtest.Connect(t)
	ioctx := cephtest.IOContext(t, conn)
	p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 64<<20, 16)
	pool, pctx, quota := quotaPool(t, conn)
	node := cephtest.Name(t, "n")
	clone := node + "-c"
	cephtest.CloneTo(t, ioctx, p, pctx, clone, node)
	conf := nodeConfig(t, node, cephtest.Name(t, "lock"),
		"flatten: {concurrent_ops: 1, max_bytes_per_second: 2MiB}\n"+ // 32 s by construction
			fmt.Sprintf("discovery: {pools: [{pool: %s}], interval: 1s}\n", pool)+
			"gates: {check_interval: 1s}\n")
	pr := start(t, "run", "--config", conf)
	pr.waitFor(t, time.Minute, "flatten progress", func(e event) bool { return e.Msg == "flatten progress" })
	if v := metricValue(pr.scrape(t), `flattend_gate_closed_total{gate="space"}`); v != 0 {
		t.Fatalf("gate_closed_total{space} %v with the gate open", v)
	}
	quota(60 << 20) // < the ~58 MiB left × space_factor 2
	fin := pr.waitFor(t, time.Minute, "the flatten aborted", func(e event) bool { return e.Msg == "flatten finished" })
	if fin.Result != "aborted by a safety gate" || !strings.Contains(fin.Error, "space gate closed") {
		t.Fatalf("flatten finished %q %q, want aborted by the space gate", fin.Result, fin.Error)
	}
	pr.waitMetric(t, 10*time.Second, `flattend_flattens_ended_total{reason="gate",result="cancelled"}`, func(v float64) bool { return v == 1 })
	// The next pass's refusal before the flatten counts too (the abort itself is counted as an
	// ended flatten; each refusal after it as a closed gate).
	pr.waitFor(t, 30*time.Second, "a refusal", after(fin, "safety gate closed, clone left for later"))
	pr.waitMetric(t, 10*time.Second, `flattend_gate_closed_total{gate="space"}`, func(v float64) bool { return v >= 1 })
	if !cephtest.IsClone(t, pctx, clone) {
		t.Fatal("flattened behind a closed gate")
	}
}

// once --ignore-gates flattens a clone a closed gate refuses (a pool quota too small for it):
// flat, with the parent snapshot's content.
func TestOnceIgnoreGates(t *testing.T) {
	conn := cephtest.Connect(t)
	ioctx := cephtest.IOContext(t, conn)
	p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 32<<20, 22)
	pool, pctx, quota := quotaPool(t, conn)
	node := cephtest.Name(t, "n")
	clone := node + "-c"
	cephtest.CloneTo(t, ioctx, p, pctx, clone, node)
	quota(60 << 20) // < 32 MiB × space_factor 2: the gate is closed
	conf := nodeConfig(t, node, cephtest.Name(t, "lock"), fmt.Sprintf("discovery: {pools: [{pool: %s}]}\n", pool))
	if code, out := runCmd(t, time.Minute, "once", "--config", conf); code != 1 || !strings.Contains(out, "space gate closed") {
		t.Fatalf("once without --ignore-gates: exit %d, want 1 and the space gate:\n%s", code, out)
	}
	if code, out := runCmd(t, 2*time.Minute, "once", "--ignore-gates", "--config", conf); code != 0 {
		t.Fatalf("once --ignore-gates: exit %d\n%s", code, out)
	}
	cephtest.AssertFlatAndIntact(t, pctx, p, clone)
}

// SIGINT stops `once` like SIGTERM: exit 0, the flatten cancelled, the clone still a clone, the
// slot's lock without owner in RADOS; the next once completes the clone intact.
func TestOnceSIGINT(t *testing.T) {
	conn := cephtest.Connect(t)
	n := newSlowNode(t, conn, 64)
	pr := start(t, "once", "--config", nodeConfig(t, n.node, n.lockImage, "flatten: {concurrent_ops: 1, max_bytes_per_second: 2MiB}\n"))
	pr.waitFor(t, time.Minute, "flatten progress", func(e event) bool { return e.Msg == "flatten progress" })
	if owners := cephtest.Lockers(t, n.ioctx, n.lockImage); len(owners) != 1 {
		t.Fatalf("lock image owners while flattening: %v, want one", owners)
	}
	if err := pr.cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	if code := pr.wait(t, 30*time.Second); code != 0 {
		t.Fatalf("once after SIGINT exited %d, want 0", code)
	}
	if ivs := intervals(t, pr.events(t), time.Time{}); len(ivs) != 1 || ivs[0].result != "cancelled" {
		t.Fatalf("flattens %+v, want one cancelled", ivs)
	}
	if !cephtest.IsClone(t, n.ioctx, n.clone) {
		t.Fatal("the interrupted flatten detached the parent")
	}
	if owners := cephtest.Lockers(t, n.ioctx, n.lockImage); len(owners) != 0 {
		t.Fatalf("slot still owned after SIGINT: %v", owners)
	}
	if code, out := runCmd(t, 3*time.Minute, "once", "--config", n.conf); code != 0 {
		t.Fatalf("once after SIGINT: exit %d\n%s", code, out)
	}
	cephtest.AssertFlatAndIntact(t, n.ioctx, n.parent, n.clone)
}

// flatten.max_per_window 2 with 3 clones: exactly 2 lose their parent (RADOS says so), the third
// is left, and once exits 1 (work left).
func TestMaxPerWindow(t *testing.T) {
	conn := cephtest.Connect(t)
	ioctx := cephtest.IOContext(t, conn)
	p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 4<<20, 22)
	node := cephtest.Name(t, "n")
	clones := []string{node + "-c0", node + "-c1", node + "-c2"}
	for _, c := range clones {
		cephtest.Clone(t, ioctx, p, c, node)
	}
	code, out := runCmd(t, 2*time.Minute, "once", "--config", nodeConfig(t, node, cephtest.Name(t, "lock"), "flatten: {max_per_window: 2}\n"))
	if code != 1 || !strings.Contains(out, "flatten.max_per_window (2) reached") {
		t.Errorf("once with max_per_window 2 and 3 clones: exit %d, want 1 and the cap named:\n%s", code, out)
	}
	flat := 0
	for _, c := range clones {
		if !cephtest.IsClone(t, ioctx, c) {
			flat++
			cephtest.AssertFlatAndIntact(t, ioctx, p, c)
		}
	}
	if flat != 2 {
		t.Errorf("%d clones flat, want exactly flatten.max_per_window = 2", flat)
	}
}

// A pass that fails (discovery: its pool does not exist yet) is retried by `run`: once the pool
// and a clone in it exist, a later pass flattens the clone, intact.
func TestRunRetriesFailedPass(t *testing.T) {
	conn := cephtest.Connect(t)
	ioctx := cephtest.IOContext(t, conn)
	p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 8<<20, 22)
	pool := cephtest.Name(t, "late")
	node := cephtest.Name(t, "n")
	conf := nodeConfig(t, node, cephtest.Name(t, "lock"), fmt.Sprintf("discovery: {pools: [{pool: %s}], interval: 1s}\n", pool))
	pr := start(t, "run", "--config", conf)
	failed := pr.waitFor(t, time.Minute, "a failed pass", func(e event) bool { return e.Msg == "pass failed" })
	if !strings.Contains(failed.Error, pool) {
		t.Errorf("the failed pass does not name the missing pool: %q", failed.Error)
	}
	ownPool(t, conn, pool)
	cephtest.CloneTo(t, ioctx, p, cephtest.PoolIOContext(t, conn, pool), node+"-c", node)
	fin := pr.waitFor(t, 2*time.Minute, "the flatten of a later pass", func(e event) bool { return e.Msg == "flatten finished" })
	if fin.Result != "flat" {
		t.Fatalf("flatten finished %q %s", fin.Result, fin.Error)
	}
	cephtest.AssertFlatAndIntact(t, cephtest.PoolIOContext(t, conn, pool), p, node+"-c")
}

// mark sends msg to the notify socket as the daemon would: datagrams on one socket are read in
// the order they were sent, so a mark splits the daemon's datagrams into before and after.
func (n *notifySocket) mark(t *testing.T, msg string) {
	t.Helper()
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: n.path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	n.waitFor(t, msg, 10*time.Second)
}

// between counts the datagrams containing msg received after mark from and before mark to ("":
// up to now).
func (n *notifySocket) between(from, to, msg string) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	k, in := 0, false
	for _, m := range n.msgs {
		switch {
		case m == from:
			in = true
		case m == to && to != "":
			return k
		case in && strings.Contains(m, msg):
			k++
		}
	}
	return k
}

// The watchdog's pings stop while the main loop cannot move (OSDs paused mid-flatten) and
// resume once it moves again (unpaused). Order is asserted with marks the test sends on the
// notify socket, not by timing: no ping between "the daemon said it stopped feeding" and the
// unpause; a ping after the unpause. The cadence's upper bound (pings come from a ticker of a
// third of the period: at most elapsed/(period/3) + 2 in any stretch, the +2 for a tick that
// waited in the ticker's buffer) holds however loaded the machine; its lower bound (a ping at
// least every period) is what load breaks, and is left to systemd.
func TestWatchdogPingsStopAndResume(t *testing.T) {
	conn := cephtest.Connect(t)
	n, paced := pacedNode(t, conn)
	notify := newNotifySocket(t)
	const period = 2 * time.Second
	pr := startWithEnv(t, []string{"NOTIFY_SOCKET=" + notify.path, "WATCHDOG_USEC=2000000"}, "run", "--config", paced)
	pr.waitFor(t, time.Minute, "flatten started", func(e event) bool { return e.Msg == "flatten started" })
	notify.mark(t, "TEST=cadence-from")
	from := time.Now()
	notify.waitFor(t, "WATCHDOG=1", 3*period) // one at least, before the mark or after
	time.Sleep(2 * period)                    // a stretch to count pings in; not asserted on
	notify.mark(t, "TEST=cadence-to")
	elapsed := time.Since(from)
	if got, most := notify.between("TEST=cadence-from", "TEST=cadence-to", "WATCHDOG=1"), int(elapsed/(period/3))+2; got > most {
		t.Errorf("%d watchdog pings in %s, more than a ticker of period/3 can send (%d)", got, elapsed.Round(time.Millisecond), most)
	}

	unpause := pauseOSDs(t, conn)
	stalled := pr.waitFor(t, time.Minute, "the watchdog stopped", func(e event) bool {
		return e.Msg == "the main loop made no progress for a whole watchdog period: not feeding the watchdog"
	})
	notify.mark(t, "TEST=stalled")
	time.Sleep(2 * period) // room for a wrong ping to show
	notify.mark(t, "TEST=unpause")
	if got := notify.between("TEST=stalled", "TEST=unpause", "WATCHDOG=1"); got != 0 {
		t.Errorf("%d watchdog pings after the daemon said it stopped feeding (%s) and before the unpause", got, stalled.TS.Format(time.StampMilli))
	}
	unpause()
	for deadline := time.Now().Add(time.Minute); notify.between("TEST=unpause", "", "WATCHDOG=1") == 0; time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no watchdog ping after the OSDs were unpaused and the flatten could move again")
		}
	}
	if err := pr.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := pr.wait(t, time.Minute); code != 0 {
		t.Errorf("run exited %d on SIGTERM after the unpause", code)
	}
	if !cephtest.IsClone(t, n.ioctx, n.clone) {
		t.Log("the flatten finished before SIGTERM")
	}
}

// flatten.retry_after in a real run: a clone whose flatten fails is not tried again by the
// passes that follow before retry_after, although the cause is gone soon after the failure; a
// pass after retry_after flattens it, intact. The failure is real and certain: the clone's pool
// (a pool of the test's own) is over an object quota, and flagged full by the monitors, before
// flattend starts; its first write (the flattening mark) blocks and ceph.op_timeout fails it.
// (The space gate reads byte quotas only; the health gate, which would refuse the clone instead,
// is off.) The wait asserted is a lower bound the product sets: load only makes it longer; the
// passes in between show the clone was skipped, not left undiscovered.
func TestRetryAfter(t *testing.T) {
	conn := cephtest.Connect(t)
	ioctx := cephtest.IOContext(t, conn)
	p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 8<<20, 22)
	pool, pctx, _ := quotaPool(t, conn)
	node := cephtest.Name(t, "n")
	clone := node + "-c"
	cephtest.CloneTo(t, ioctx, p, pctx, clone, node)
	objects := func(n int, full bool) { objectQuota(t, conn, pool, n, full) }
	objects(1, true) // the clone's metadata objects are more already
	t.Cleanup(func() { objects(0, false) })
	// Long enough for the monitors to lift the full flag (they do within seconds) before the retry.
	const retryAfter = 30 * time.Second
	conf := nodeConfig(t, node, cephtest.Name(t, "lock"),
		fmt.Sprintf("ceph: {conf: %s, user: %s, keyring: %q, connect_timeout: 20s, op_timeout: 5s}\n", cephtest.ConfPath(t), cephtest.DaemonUser(), cephtest.DaemonKeyring())+
			fmt.Sprintf("flatten: {retry_after: %s}\n", retryAfter)+
			"gates: {health: false}\n"+
			fmt.Sprintf("discovery: {pools: [{pool: %s}], interval: 1s}\n", pool))
	pr := start(t, "run", "--config", conf)
	failure := pr.waitFor(t, 2*time.Minute, "the failed flatten", func(e event) bool { return e.Msg == "flatten failed" })
	objects(0, false)
	fin := pr.waitFor(t, 3*time.Minute, "the retried flatten", func(e event) bool { return e.Msg == "flatten finished" && e.Result == "flat" })
	cephtest.AssertFlatAndIntact(t, pctx, p, clone)
	if gap := fin.TS.Sub(failure.TS); gap < retryAfter {
		t.Errorf("retried %s after the failure, before flatten.retry_after (%s)", gap, retryAfter)
	}
	passes := 0
	for _, e := range pr.events(t) {
		if e.Msg == "discovered clones" && e.TS.After(failure.TS) && e.TS.Before(fin.TS) {
			passes++
		}
	}
	if passes < 2 { // the retrying pass, and at least one that skipped the clone before it
		t.Errorf("%d passes between the failure and the retry, want the clone skipped by at least one", passes)
	}
	if n := count(pr.events(t), "flatten failed"); n != 1 {
		t.Errorf("%d failed flattens, want 1", n)
	}
}

// poolFull reports whether the OSD map flags pool full (a quota reached), as the monitors say.
// objectQuota sets pool's object quota to n (0: none) and waits until the monitors flag the pool
// full, or not, as full says (they do it on their next tick, tens of seconds on a loaded machine).
func objectQuota(t *testing.T, conn *rados.Conn, pool string, n int, full bool) {
	t.Helper()
	cephtest.MonCommand(t, conn, map[string]any{"prefix": "osd pool set-quota", "pool": pool, "field": "max_objects", "val": fmt.Sprint(n)})
	for deadline := time.Now().Add(2 * time.Minute); poolFull(t, conn, pool) != full; time.Sleep(200 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("pool %s full: %v, want %v", pool, !full, full)
		}
	}
}

func poolFull(t *testing.T, conn *rados.Conn, pool string) bool {
	t.Helper()
	var d struct {
		Pools []struct {
			Name  string `json:"pool_name"`
			Flags string `json:"flags_names"`
		} `json:"pools"`
	}
	if err := json.Unmarshal(cephtest.MonCommand(t, conn, map[string]any{"prefix": "osd dump", "format": "json"}), &d); err != nil {
		t.Fatal(err)
	}
	for _, p := range d.Pools {
		if p.Name == pool {
			return strings.Contains(p.Flags, "full")
		}
	}
	t.Fatalf("pool %s not in the OSD map", pool)
	return false
}

// A flatten whose writes time out mid-copy (ceph.op_timeout; here its pool fills up: an object
// quota on a pool of the test's own) fails, and its retry after flatten.retry_after starts a new
// flatten once the pool has room. Before, the timed-out flatten left the clone's exclusive lock
// owned by the node's connection with no handle to release it, and every retry failed with
// EROFS while marking the clone. The quota is set once the flatten runs, and the test waits for
// the monitors to flag the pool full (about 30 s here): the flatten is paced to 64 s for that.
func TestTimedOutFlattenRetried(t *testing.T) {
	conn := cephtest.Connect(t)
	ioctx := cephtest.IOContext(t, conn)
	p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 64<<20, 16)
	pool, pctx, _ := quotaPool(t, conn)
	node := cephtest.Name(t, "n")
	clone := node + "-c"
	cephtest.CloneTo(t, ioctx, p, pctx, clone, node)
	objects := func(n int, full bool) { objectQuota(t, conn, pool, n, full) }
	t.Cleanup(func() { objects(0, false) })
	ceph := fmt.Sprintf("ceph: {conf: %s, user: %s, keyring: %q, connect_timeout: 20s, op_timeout: 5s}\n", cephtest.ConfPath(t), cephtest.DaemonUser(), cephtest.DaemonKeyring())
	extra := ceph + "gates: {health: false}\n" + fmt.Sprintf("discovery: {pools: [{pool: %s}], interval: 1s}\n", pool)
	conf := nodeConfig(t, node, cephtest.Name(t, "lock"), extra+"flatten: {concurrent_ops: 1, max_bytes_per_second: 1MiB, retry_after: 5s}\n")
	pr := start(t, "run", "--config", conf)
	pr.waitFor(t, time.Minute, "flatten progress", func(e event) bool { return e.Msg == "flatten progress" })
	objects(1, true)
	failure := pr.waitFor(t, 2*time.Minute, "the timed-out flatten", func(e event) bool { return e.Msg == "flatten failed" })
	if !strings.Contains(failure.Error, "timed out") {
		t.Fatalf("the flatten failed with %q, want a timeout (did it end before the pool was full?)", failure.Error)
	}
	objects(0, false)
	next := pr.waitFor(t, 2*time.Minute, "the retry", func(e event) bool {
		return (e.Msg == "flatten started" || e.Msg == "flatten failed") && e.TS.After(failure.TS)
	})
	if next.Msg != "flatten started" {
		t.Fatalf("the retry failed again: %s", next.Error)
	}
	if err := pr.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := pr.wait(t, time.Minute); code != 0 {
		t.Errorf("run exited %d on SIGTERM", code)
	}
	if code, out := runCmd(t, 3*time.Minute, "once", "--config", nodeConfig(t, node, cephtest.Name(t, "lock"), extra)); code != 0 {
		t.Fatalf("once after the retry: exit %d\n%s", code, out)
	}
	cephtest.AssertFlatAndIntact(t, pctx, p, clone)
}
