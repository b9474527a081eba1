package e2e

import (
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ceph/go-ceph/rados"

	"github.com/flattend/flattend/test/cephtest"
)

// stopGrace is how long flattend waits, after SIGTERM or the end of `once --timeout`, for Ceph
// calls that do not return before it exits anyway (docs/operations.md, "Stopping").
const stopGrace = 30 * time.Second

// pauseOSDs sets pauserd,pausewr (`ceph osd pause`): every OSD op waits in its client from now
// on. The returned function unpauses; the test's cleanup does it too.
func pauseOSDs(t *testing.T, conn *rados.Conn) (unpause func()) {
	t.Helper()
	cephtest.MonCommand(t, conn, map[string]any{"prefix": "osd pause"})
	paused := true
	unpause = func() {
		if paused {
			cephtest.MonCommand(t, conn, map[string]any{"prefix": "osd unpause"})
			paused = false
		}
	}
	t.Cleanup(unpause)
	return unpause
}

// pacedNode is a slowNode whose flatten is paced to 1 MiB/s: 64 s for its 64 MiB by
// construction, so the OSDs are paused while it runs.
func pacedNode(t *testing.T, conn *rados.Conn) (slowNode, string) {
	t.Helper()
	n := newSlowNode(t, conn, 64)
	return n, nodeConfig(t, n.node, n.lockImage, "flatten: {concurrent_ops: 1, max_bytes_per_second: 1MiB}\n")
}

// With the OSDs paused right after a flatten starts, `once --timeout` still ends: it gives
// Ceph's calls the stop grace and exits 1 (work left). After unpause the next `once` completes
// the clone intact. The bound on the exit is a liveness check only, and generous: the timeout,
// the grace, and 30 s more (it is infinite without the fix).
func TestPausedOSDsCannotWedgeOnce(t *testing.T) {
	conn := cephtest.Connect(t)
	n, paced := pacedNode(t, conn)

	const timeout = 15 * time.Second
	pr := start(t, "once", "--config", paced, "--timeout", timeout.String())
	pr.waitFor(t, time.Minute, "flatten started", func(e event) bool { return e.Msg == "flatten started" })
	unpause := pauseOSDs(t, conn)
	if code := pr.wait(t, timeout+stopGrace+30*time.Second); code != 1 {
		t.Fatalf("once --timeout with the OSDs paused exited %d, want 1", code)
	}
	unpause()
	if !cephtest.IsClone(t, n.ioctx, n.clone) {
		t.Fatal("the paced flatten finished before the pause; make it slower")
	}
	code, out := runCmd(t, cephtest.WatchTimeout()+2*time.Minute, "once", "--config", n.conf)
	if code != 0 {
		t.Fatalf("once after unpause: exit %d\n%s", code, out)
	}
	cephtest.AssertFlatAndIntact(t, n.ioctx, n.parent, n.clone)
}

// SIGTERM ends `run` with the OSDs paused, within the stop grace (exit 1: it left without
// releasing). While the OSDs are paused the main loop makes no progress, and the watchdog pings
// stop. After unpause the next `once` completes the clone intact.
func TestPausedOSDsCannotWedgeRun(t *testing.T) {
	conn := cephtest.Connect(t)
	n, paced := pacedNode(t, conn)

	notify := newNotifySocket(t)
	const watchdog = 2 * time.Second
	pr := startWithEnv(t, []string{"NOTIFY_SOCKET=" + notify.path, "WATCHDOG_USEC=2000000"}, "run", "--config", paced)
	pr.waitFor(t, time.Minute, "flatten started", func(e event) bool { return e.Msg == "flatten started" })
	notify.waitFor(t, "WATCHDOG=1", 3*watchdog)
	served := pr.waitFor(t, time.Second, "metrics address", func(e event) bool { return e.Msg == "serving metrics" })
	base := strings.TrimSuffix(served.URL, "/metrics")
	flattening := `"image": "` + cephtest.Pool + "/" + n.clone + `"`
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) { // "flatten started" is logged just before
		code, body := get(t, base+"/status")
		if code == http.StatusOK && strings.Contains(body, flattening) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/status while flattening: %d, lacks %s:\n%s", code, flattening, body)
		}
	}
	unpause := pauseOSDs(t, conn)
	// Pings already on their way when the flatten stopped moving may still arrive: drop what
	// came within a watchdog period of the pause, then expect silence for several periods.
	time.Sleep(2 * watchdog)
	before := notify.count("WATCHDOG=1")
	time.Sleep(4 * watchdog)
	if after := notify.count("WATCHDOG=1"); after != before {
		t.Errorf("%d watchdog pings while the OSDs were paused and the flatten could not move", after-before)
	}
	// /healthz says so too (its limit is the watchdog period), and /status still answers.
	if code, body := get(t, base+"/healthz"); code != http.StatusServiceUnavailable {
		t.Errorf("/healthz with the main loop stalled: %d %s, want 503", code, body)
	}
	if code, body := get(t, base+"/status"); code != http.StatusOK || !strings.Contains(body, `"state": "flattening"`) {
		t.Errorf("/status with the main loop stalled: %d\n%s", code, body)
	}
	if err := pr.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := pr.wait(t, stopGrace+30*time.Second); code != 1 {
		t.Errorf("run on SIGTERM with the OSDs paused exited %d, want 1", code)
	}
	unpause()
	code, out := runCmd(t, cephtest.WatchTimeout()+2*time.Minute, "once", "--config", n.conf)
	if code != 0 {
		t.Fatalf("once after unpause: exit %d\n%s", code, out)
	}
	cephtest.AssertFlatAndIntact(t, n.ioctx, n.parent, n.clone)
}

// count is how many datagrams so far contain msg.
func (n *notifySocket) count(msg string) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	k := 0
	for _, m := range n.msgs {
		if strings.Contains(m, msg) {
			k++
		}
	}
	return k
}
