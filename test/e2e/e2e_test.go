package e2e

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/flattend/flattend/internal/cephconn"
	"github.com/flattend/flattend/internal/lock"
	"github.com/flattend/flattend/test/cephtest"
)

// Two nodes, three clones each, started together: all six end flat with their parent's content,
// each node flattened only its own, and no two flattens overlapped in time.
func TestTwoNodesTakeTurns(t *testing.T) {
	conn := cephtest.Connect(t)
	ioctx := cephtest.IOContext(t, conn)
	lockImage := cephtest.Name(t, "lock")
	p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 64<<20, 22)
	nodes := []string{cephtest.Name(t, "a"), cephtest.Name(t, "b")}
	owner := map[string]string{}
	for _, n := range nodes {
		for i := range 3 {
			c := fmt.Sprintf("%s-c%d", n, i)
			cephtest.Clone(t, ioctx, p, c, n)
			owner[c] = n
		}
	}
	var clones []string
	for c := range owner {
		clones = append(clones, c)
	}
	w := watchRADOS(t, conn, ioctx, lockImage, 1, clones...)
	var procs []*proc
	for _, n := range nodes {
		procs = append(procs, start(t, "once", "--config", nodeConfig(t, n, lockImage, "")))
	}
	all := waitAllOK(t, procs, 3*time.Minute)
	w.finish(t) // never two flattens at once, as RADOS saw it
	for c := range owner {
		cephtest.AssertFlatAndIntact(t, ioctx, p, c)
	}
	ivs := intervals(t, all, time.Time{})
	if len(ivs) != 6 {
		t.Fatalf("%d flattens recorded, want 6", len(ivs))
	}
	for _, iv := range ivs {
		if owner[strings.TrimPrefix(iv.image, cephtest.Pool+"/")] != iv.node || iv.result != "flat" {
			t.Errorf("%s flattened by %s with result %s", iv.image, iv.node, iv.result)
		}
	}
	t.Logf("lock busy back-offs: %d; flattens: %d", count(all, "lock busy, backing off"), len(ivs))
}

// With the lock held by another client, once backs off and only flattens after the release.
func TestWaitsForHeldLock(t *testing.T) {
	conn := cephtest.Connect(t)
	ioctx := cephtest.IOContext(t, conn)
	lockImage := cephtest.Name(t, "lock")
	m := cephtest.Mutex(t, conn, lock.Options{Pool: cephtest.Pool, Image: lockImage, CheckInterval: time.Second})
	if err := m.Ensure(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Close(context.Background()) })
	release := cephtest.HoldLock(t, ioctx, lockImage)
	node := cephtest.Name(t, "n")
	p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 16<<20, 22)
	clone := node + "-c"
	cephtest.Clone(t, ioctx, p, clone, node)

	pr := start(t, "once", "--config", nodeConfig(t, node, lockImage, ""))
	deadline := time.Now().Add(30 * time.Second)
	for count(pr.events(t), "lock busy, backing off") < 3 {
		if time.Now().After(deadline) {
			t.Fatal("no repeated back-off while the lock is held")
		}
		time.Sleep(100 * time.Millisecond)
	}
	if !cephtest.IsClone(t, ioctx, clone) {
		t.Fatal("flattened while another client held the lock")
	}
	// The session's two connections, as the kernel shows their threads: the lock's with librados'
	// two completion threads, the reader (discovery) with one (librbd's open race).
	if got, want := cephtest.ThreadsNamed(t, pr.cmd.Process.Pid, "io_context_pool"), 2+cephconn.ReaderThreads; got != want {
		t.Errorf("once runs %d io_context_pool threads while it waits, want %d (lock's connection 2, reader %d)", got, want, cephconn.ReaderThreads)
	}
	releasedAt := time.Now()
	release()
	if code := pr.wait(t, time.Minute); code != 0 {
		t.Fatalf("once exited %d", code)
	}
	cephtest.AssertFlatAndIntact(t, ioctx, p, clone)
	ivs := intervals(t, pr.events(t), time.Time{})
	if len(ivs) != 1 || ivs[0].from.Before(releasedAt) {
		t.Fatalf("flatten %+v did not start after the release at %s", ivs, releasedAt)
	}
}

// once --timeout stops a flatten about half way: the clone is still a clone with intact content,
// the exit code says work is left, and the next run completes it.
func TestTimeoutCancelsAndNextRunResumes(t *testing.T) {
	conn := cephtest.Connect(t)
	n := newSlowNode(t, conn, 64) // 1024 small objects
	ioctx, p, clone, lockImage, cfg := n.ioctx, n.parent, n.clone, n.lockImage, n.conf

	pr := start(t, "once", "--config", cfg)
	pr.waitFor(t, time.Minute, "progress to 40%", func(e event) bool { return e.Msg == "flatten progress" && e.Percent >= 40 })
	if err := pr.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := pr.wait(t, 30*time.Second); code != 0 {
		t.Fatalf("once after SIGTERM exited %d, want 0", code)
	}
	ivs := intervals(t, pr.events(t), time.Time{})
	if len(ivs) != 1 || ivs[0].result != "cancelled" {
		t.Fatalf("flattens %+v, want one cancelled", ivs)
	}
	if !cephtest.IsClone(t, ioctx, clone) {
		t.Fatal("cancelled flatten detached the parent")
	}
	// The lock was released: another client takes it at once.
	m := cephtest.Mutex(t, conn, lock.Options{Pool: cephtest.Pool, Image: lockImage, CheckInterval: time.Second})
	l, err := m.TryLock(context.Background())
	if err != nil {
		t.Fatalf("lock not released on SIGTERM: %v", err)
	}
	_ = l.Unlock()
	_ = m.Close(context.Background())

	// --timeout: the run stops at the timeout with the clone left, exit 1. Paced at 1 MiB/s, the
	// rest of the walk (more than half of 1024 objects of 64 KiB: over 30 s) cannot finish
	// within the 5 s, however fast the machine; on a machine so slow that the flatten had not
	// started, the timeout stops the run before it, which is no less right.
	paced := nodeConfig(t, n.node, lockImage, "flatten: {concurrent_ops: 1, max_bytes_per_second: 1MiB}\n")
	code, out := runCmd(t, 2*time.Minute, "once", "--config", paced, "--timeout", "5s")
	if code != 1 || !strings.Contains(out, "once --timeout 5s reached") || strings.Contains(out, `"result":"flat"`) {
		t.Fatalf("once --timeout 5s: exit %d, want 1, the timeout, no flat clone; output:\n%s", code, out)
	}
	if strings.Contains(out, `"msg":"flatten started"`) != strings.Contains(out, `"result":"cancelled"`) {
		t.Fatalf("once --timeout 5s: a flatten started and was not cancelled, or the reverse:\n%s", out)
	}
	if !cephtest.IsClone(t, ioctx, clone) {
		t.Fatal("the flatten stopped by --timeout detached the parent")
	}
	if got := cephtest.Digest(t, ioctx, clone, p.Size); got != p.Digest {
		t.Fatal("content damaged by cancelled flattens")
	}
	// The resume skips what was copied: RADOS shows the objects there before it unwritten.
	copied := cephtest.DataObjects(t, conn, cephtest.Pool, clone)
	if len(copied) == 0 || len(copied) >= 1024 {
		t.Fatalf("%d of 1024 objects copied before the resume, want some but not all", len(copied))
	}
	code, out = runCmd(t, 2*time.Minute, "once", "--config", cfg)
	if code != 0 {
		t.Fatalf("resuming once: exit %d\n%s", code, out)
	}
	cephtest.AssertFlatAndIntact(t, ioctx, p, clone)
	cephtest.AssertResumeSkipped(t, copied, cephtest.DataObjects(t, conn, cephtest.Pool, clone))
}

// A holder killed with -9 mid-flatten: the next node gets the lock once the dead client's watch
// times out (breaking and blocklisting it), and the half-flattened clone ends flat and correct.
// RADOS, not the logs, shows the dead holder blocklisted and never two flattens at once.
func TestKill9HolderIsTakenOver(t *testing.T) {
	conn := cephtest.Connect(t)
	n := newSlowNode(t, conn, 128)
	ioctx, p, clone, cfg := n.ioctx, n.parent, n.clone, n.conf
	w := watchRADOS(t, conn, n.ioctx, n.lockImage, 1, clone)

	a := start(t, "once", "--config", cfg)
	a.waitFor(t, time.Minute, "progress to 20%", func(e event) bool { return e.Msg == "flatten progress" && e.Percent >= 20 })
	if err := a.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	a.wait(t, 10*time.Second)
	killedAt := time.Now()
	if !cephtest.IsClone(t, ioctx, clone) {
		t.Fatal("clone flat before the kill; make it slower")
	}

	b := start(t, "once", "--config", cfg)
	if code := b.wait(t, cephtest.WatchTimeout()+2*time.Minute); code != 0 {
		t.Fatalf("taking-over once exited %d", code)
	}
	if cephtest.IsClone(t, ioctx, clone) {
		t.Fatalf("%s still has a parent after the takeover", clone)
	}
	// The copy-up in flight when the holder died left the object map saying "exists" for an
	// object never written; without the repair before the resume it reads as zeros (about one
	// run in three here before the fix).
	cephtest.AssertFlatAndIntact(t, ioctx, p, clone)
	w.finish(t)
	w.assertFenced(t, 0)
	bev := b.events(t)
	ivs := append(intervals(t, a.events(t), killedAt), intervals(t, bev, time.Time{})...)
	if len(ivs) != 2 || ivs[1].result != "flat" {
		t.Fatalf("flattens %+v", ivs)
	}
	t.Logf("takeover: second flatten started %s after the kill (watch timeout %s)",
		ivs[1].from.Sub(killedAt).Round(time.Millisecond), cephtest.WatchTimeout())
}

// run works while the window is open and stops cleanly on SIGTERM; with the window closed it
// waits and touches nothing.
func TestRunWindow(t *testing.T) {
	conn := cephtest.Connect(t)
	ioctx := cephtest.IOContext(t, conn)
	p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 16<<20, 22)

	closedNode := cephtest.Name(t, "closed")
	cephtest.Clone(t, ioctx, p, closedNode+"-c", closedNode)
	next := time.Now().Add(-2 * time.Hour)
	closed := start(t, "run", "--config", nodeConfig(t, closedNode, cephtest.Name(t, "lock"),
		fmt.Sprintf("window: {schedule: \"%d %d * * *\", duration: 30m}\n", next.Minute(), next.Hour())))
	closed.waitFor(t, 30*time.Second, "window closed", func(e event) bool { return e.Msg == "window closed" })

	openNode := cephtest.Name(t, "open")
	clones := []string{openNode + "-c0", openNode + "-c1"}
	for _, c := range clones {
		cephtest.Clone(t, ioctx, p, c, openNode)
	}
	open := start(t, "run", "--config", nodeConfig(t, openNode, cephtest.Name(t, "lock"), ""))
	open.waitFor(t, time.Minute, "a pass", func(e event) bool { return e.Msg == "pass done" })
	for _, c := range clones {
		cephtest.AssertFlatAndIntact(t, ioctx, p, c)
	}
	if !cephtest.IsClone(t, ioctx, closedNode+"-c") {
		t.Error("flattened outside the window")
	}
	for _, pr := range []*proc{open, closed} {
		if err := pr.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		if code := pr.wait(t, 20*time.Second); code != 0 {
			t.Errorf("run exited %d on SIGTERM, want 0", code)
		}
	}
}

// Malformed configs: exit 2 and a file:line: field message, never a panic.
func TestBadConfigsExit2(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	cases := []struct{ name, body, want string }{
		{"bad-yaml", "node: a\n\tlock: x\n", ":2: found a tab character"},
		{"unknown-key", "node: a\nwindw: {}\n", `:2: windw: unknown key "windw"`},
		{"bad-duration", "discovery: {pools: [{pool: vms}]}\nwindow:\n  duration: 5x\n", `:3: window.duration: "5x" is not a duration`},
		{"bad-cron", "discovery: {pools: [{pool: vms}]}\nwindow:\n  schedule: \"every night\"\n", `:3: window.schedule:`},
		{"empty-pool", "discovery:\n  pools:\n    - pool: \"\"\n", `:3: discovery.pools[0].pool:`},
		{"negative", "discovery: {pools: [{pool: vms}]}\nflatten: {concurrent_ops: -1}\n", `:2: flatten.concurrent_ops: -1 is out of range`},
		{"negative-backoff", "discovery: {pools: [{pool: vms}]}\nbackoff: {min: -1s}\n", `:2: backoff.min: must be positive`},
		{"wrong-type", "discovery: {pools: [{pool: vms}]}\nflatten: {concurrent_ops: [1]}\n", `:2: flatten.concurrent_ops:`},
		{"wrong-type-str", "discovery:\n  pools: vms\n", `:2: discovery.pools: "vms" is a string, expected a list`},
	}
	for _, tc := range cases {
		path := filepath.Join(dir, tc.name+".yaml")
		if err := os.WriteFile(path, []byte(tc.body), 0o644); err != nil {
			t.Fatal(err)
		}
		for _, cmd := range []string{"check", "once", "run"} {
			code, out := runCmd(t, 10*time.Second, cmd, "--config", path)
			if code != 2 || !strings.Contains(out, path+tc.want) || strings.Contains(out, "panic") {
				t.Errorf("%s %s: exit %d, output %q; want 2 and %q", cmd, tc.name, code, out, path+tc.want)
			}
		}
	}
	missing := filepath.Join(dir, "missing.yaml")
	if code, out := runCmd(t, 10*time.Second, "check", "--config", missing); code != 2 || !strings.Contains(out, missing+": no such file") {
		t.Errorf("missing file: exit %d, %q", code, out)
	}
	if code, _ := runCmd(t, 10*time.Second, "frobnicate"); code != 2 {
		t.Errorf("unknown command: exit %d", code)
	}
	if code, _ := runCmd(t, 10*time.Second, "once", "--bogus"); code != 2 {
		t.Errorf("unknown flag: exit %d", code)
	}
}

// A cluster nobody listens for: exit 3 with a message that says what to check.
func TestUnreachableCephExit3(t *testing.T) {
	t.Parallel()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	dir := t.TempDir()
	conf := filepath.Join(dir, "ceph.conf")
	if err := os.WriteFile(conf, []byte(fmt.Sprintf("[global]\nmon host = 127.0.0.1:%d\nauth_client_required = none\n", port)), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(dir, "c.yaml")
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf("node: x\nceph: {conf: %s, user: admin, connect_timeout: 2s}\ndiscovery: {pools: [{pool: vms}]}\n", conf)), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, cmd := range []string{"check", "once"} {
		code, out := runCmd(t, time.Minute, cmd, "--config", cfg)
		if code != 3 || !strings.Contains(out, "cannot reach or authenticate to Ceph") {
			t.Errorf("%s: exit %d, output %q; want 3", cmd, code, out)
		}
	}
}

// check reports a missing pool and a lock image without exclusive-lock, and exits 1.
func TestCheckExplainsCephProblems(t *testing.T) {
	conn := cephtest.Connect(t)
	cephtest.IOContext(t, conn)
	node := cephtest.Name(t, "n")
	cfg := nodeConfig(t, node, cephtest.Name(t, "lock"), "")
	code, out := runCmd(t, time.Minute, "check", "--config", cfg)
	if code != 0 || !strings.Contains(out, "does not exist yet; the first run creates it") {
		t.Fatalf("check on a good config: exit %d\n%s", code, out)
	}
	bad := strings.Replace(string(must(os.ReadFile(cfg))), "[{pool: "+cephtest.Pool+"}]", "[{pool: no-such-pool}]", 1)
	if err := os.WriteFile(cfg, []byte(bad), 0o644); err != nil {
		t.Fatal(err)
	}
	code, out = runCmd(t, time.Minute, "check", "--config", cfg)
	if code != 1 || !strings.Contains(out, `pool "no-such-pool" does not exist`) {
		t.Fatalf("check with a missing pool: exit %d\n%s", code, out)
	}
	bad = strings.Replace(bad, "[{pool: no-such-pool}]", "[{pool: "+cephtest.Pool+", namespace: no-such-ns}]", 1)
	if err := os.WriteFile(cfg, []byte(bad), 0o644); err != nil {
		t.Fatal(err)
	}
	code, out = runCmd(t, time.Minute, "check", "--config", cfg)
	if code != 1 || !strings.Contains(out, `namespace "no-such-ns" of pool "`+cephtest.Pool+`": no such namespace`) {
		t.Fatalf("check with a missing namespace: exit %d\n%s", code, out)
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}
