package e2e

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"

	"github.com/flattend/flattend/internal/lock"
	"github.com/flattend/flattend/test/cephtest"
	"github.com/flattend/flattend/test/observer"
)

// noFenceConf writes a copy of the test cluster's ceph.conf whose clients do not blocklist the
// holder whose lock they break: a node configured against fencing.
func noFenceConf(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(cephtest.ConfPath(t))
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "ceph.conf")
	b = append(b, "\n[client]\nrbd_blocklist_on_break_lock = false\n"...)
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// nodeConfigConf is nodeConfig with another ceph.conf.
func nodeConfigConf(t *testing.T, node, lockImage, cephConf, extra string) string {
	t.Helper()
	return nodeConfig(t, node, lockImage, fmt.Sprintf("ceph: {conf: %s, user: %s, keyring: %q, connect_timeout: 20s}\n%s",
		cephConf, cephtest.DaemonUser(), cephtest.DaemonKeyring(), extra))
}

// blocklisted reports whether addr is in the OSD map's blocklist, as the monitors list it.
func blocklisted(t *testing.T, conn *rados.Conn, addr string) bool {
	t.Helper()
	ok, err := observer.Blocklisted(conn, addr)
	if err != nil {
		t.Fatal(err)
	}
	return ok
}

// A node whose ceph.conf turns rbd_blocklist_on_break_lock off still fences the holder whose
// lock it breaks: the stopped holder's client is in the OSD map's blocklist afterwards.
func TestFencingIgnoresNodeConf(t *testing.T) {
	conn := cephtest.Connect(t)
	n := newSlowNode(t, conn, 64)
	conf := noFenceConf(t)
	// b's flatten lasts 4 s by construction (64 objects at 1 MiB/s): the observer sees it.
	small := cephtest.MakeParent(t, n.ioctx, cephtest.Name(t, "small"), 4<<20, 16)
	nodeB := cephtest.Name(t, "b")
	cephtest.Clone(t, n.ioctx, small, nodeB+"-c", nodeB)
	w := watchRADOS(t, conn, n.ioctx, n.lockImage, 1, n.clone, nodeB+"-c")
	// 16 s of flatten by construction: the holder is still flattening when it is stopped.
	a := start(t, "once", "--config", nodeConfigConf(t, n.node, n.lockImage, conf, "flatten: {concurrent_ops: 1, max_bytes_per_second: 4MiB}\n"))
	// Copying: librbd owns the clone's exclusive lock (the observer sees a's flatten).
	a.waitFor(t, time.Minute, "flatten progress", func(e event) bool { return e.Msg == "flatten progress" && e.Percent > 0 })
	st, err := lock.ReadStatus(conn, cephtest.Pool, n.lockImage, 1)
	if err != nil || st[0].Owner == "" {
		t.Fatalf("status while a holds the lock: %+v, %v", st, err)
	}
	owner := st[0].Owner
	if err := a.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = a.cmd.Process.Signal(syscall.SIGCONT) })
	b := start(t, "once", "--config", nodeConfigConf(t, nodeB, n.lockImage, conf, "flatten: {concurrent_ops: 1, max_bytes_per_second: 1MiB}\n"))
	if code := b.wait(t, cephtest.WatchTimeout()+time.Minute); code != 0 {
		t.Fatalf("node b exited %d", code)
	}
	cephtest.AssertFlatAndIntact(t, n.ioctx, small, nodeB+"-c")
	if !blocklisted(t, conn, owner) {
		t.Fatalf("b broke the lock of %s but that client is not in `ceph osd blocklist ls`", owner)
	}
	w.finish(t)
	w.assertFenced(t, 0)
}

// holdWithRecord takes a lock image's lock on a connection of its own and writes a holder record
// as a flattend holder does; it returns the lock's client id and address.
func holdWithRecord(t *testing.T, ioctx *rados.IOContext, image string, r lock.Record) (client, addr string, img *rbd.Image) {
	t.Helper()
	img, err := rbd.OpenImage(ioctx, image, rbd.NoSnapshot)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = img.Close() })
	if err := img.LockAcquire(rbd.LockModeExclusive); err != nil {
		t.Fatal(err)
	}
	// The holder's own handle does not list its own lock: read it on another connection.
	other, err := rbd.OpenImage(cephtest.IOContext(t, cephtest.Connect(t)), image, rbd.NoSnapshot)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	_, lockers, err := other.ListLockers()
	if err != nil || len(lockers) != 1 {
		t.Fatalf("lockers %+v, %v", lockers, err)
	}
	client, addr = lockers[0].Client, lockers[0].Addr
	r.Client = addr
	writeRecord(t, img, r)
	return client, addr, img
}

func writeRecord(t *testing.T, img *rbd.Image, r lock.Record) {
	t.Helper()
	b, _ := json.Marshal(r)
	if err := img.SetMetadata(lock.RecordKey, string(b)); err != nil {
		t.Fatal(err)
	}
}

// runStdin runs flattend with stdin (nil: closed at once) and returns its exit code and output.
func runStdin(t *testing.T, stdin string, args ...string) (int, string) {
	t.Helper()
	cmd := exec.Command(binary, args...)
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode(), string(out)
	}
	if err != nil {
		t.Fatal(err)
	}
	return 0, string(out)
}

// unlock --force names the client it breaks, takes only that client's id as confirmation, never
// an empty answer or a closed stdin, wants --force-live for a holder that looks alive, prints
// record fields escaped, and checks the blocklist afterwards (on a node whose ceph.conf turns
// blocklisting off).
func TestUnlockConfirmsClient(t *testing.T) {
	conn := cephtest.Connect(t)
	node, lockImage := cephtest.Name(t, "n"), cephtest.Name(t, "lock")
	conf := nodeConfigConf(t, node, lockImage, noFenceConf(t), "")
	if code, out := runCmd(t, time.Minute, "once", "--config", conf); code != 0 {
		t.Fatalf("once: %d\n%s", code, out)
	}
	stuckIO := cephtest.IOContext(t, cephtest.Connect(t))
	hostile := lock.Record{Node: "evil\x1b[2J\nslot 0 is not held", PID: 1, Clone: "vms/x\x1b]0;pwned\x07",
		Since: time.Now().UTC(), Updated: time.Now().UTC()}
	client, addr, img := holdWithRecord(t, stuckIO, lockImage, hostile)
	held := func() bool {
		owners, err := img.LockGetOwners()
		return err == nil && len(owners) == 1 && owners[0].Owner == addr
	}
	check := func(what string, wantCode int, out string, code int) {
		t.Helper()
		if code != wantCode {
			t.Errorf("%s: exit %d, want %d:\n%s", what, code, wantCode, out)
		}
		if strings.ContainsAny(out, "\x1b\x07") || strings.Contains(out, "\nslot 0 is not held") {
			t.Errorf("%s: the record's bytes reach the terminal unescaped:\n%q", what, out)
		}
		if !strings.Contains(out, client) || !strings.Contains(out, addr) {
			t.Errorf("%s: the output does not name the client %s at %s:\n%s", what, client, addr, out)
		}
	}
	// A fresh record of a live holder: --force (even with --yes) is not enough.
	code, out := runStdin(t, client+"\n", "unlock", "--force", "--yes", "--config", conf)
	check("live holder, --yes", 1, out, code)
	if !strings.Contains(out, "--force-live") || !held() {
		t.Fatalf("a live holder's lock must need --force-live:\n%s", out)
	}
	for _, in := range []string{"", "\n", "evil\n", node + "\n"} {
		code, out = runStdin(t, in, "unlock", "--force", "--force-live", "--config", conf)
		check(fmt.Sprintf("answer %q", in), 1, out, code)
		if !held() {
			t.Fatalf("answer %q broke the lock:\n%s", in, out)
		}
	}
	// The holder hangs: its record is not refreshed any more. --force and its client id break it.
	hostile.Updated = time.Now().Add(-time.Hour).UTC()
	writeRecord(t, img, lock.Record{Node: hostile.Node, PID: 1, Client: addr, Clone: hostile.Clone, Since: hostile.Since, Updated: hostile.Updated})
	code, out = runStdin(t, client+"\n", "unlock", "--force", "--config", conf)
	check("stuck holder, confirmed", 0, out, code)
	if held() {
		t.Fatalf("the lock is still held:\n%s", out)
	}
	if !blocklisted(t, conn, addr) {
		t.Fatalf("unlock broke %s but it is not in `ceph osd blocklist ls`:\n%s", addr, out)
	}
	if !strings.Contains(out, "blocklist verified") {
		t.Errorf("unlock does not say it verified the blocklist:\n%s", out)
	}
}

// check warns when the monitors blocklist a fenced holder for less time than a flatten may last
// (window.duration, 1 h in these configs), and stays quiet when they do not. The monitors'
// setting is changed on a cluster of the test's own: on the shared one, every test running
// meanwhile would fence for 10 minutes only.
func TestCheckWarnsShortBlocklistExpiry(t *testing.T) {
	cephtest.OwnCluster(t, "1")
	conn := cephtest.Connect(t)
	conf := nodeConfig(t, cephtest.Name(t, "n"), cephtest.Name(t, "lock"), "")
	code, out := runCmd(t, time.Minute, "check", "--config", conf)
	if code != 0 || strings.Contains(out, "mon_osd_blocklist_default_expire") && strings.Contains(out, "warning") {
		t.Fatalf("check with the default expiry (1 h): exit %d\n%s", code, out)
	}
	cephtest.MonCommand(t, conn, map[string]any{"prefix": "config set", "who": "mon", "name": "mon_osd_blocklist_default_expire", "value": "600"})
	t.Cleanup(func() {
		cephtest.MonCommand(t, conn, map[string]any{"prefix": "config rm", "who": "mon", "name": "mon_osd_blocklist_default_expire"})
	})
	code, out = runCmd(t, time.Minute, "check", "--config", conf)
	if code != 0 || !strings.Contains(out, "warning") || !strings.Contains(out, "mon_osd_blocklist_default_expire is 10m0s") {
		t.Fatalf("check with a 10 min expiry: exit %d, want 0 and a warning:\n%s", code, out)
	}
	t.Logf("check:\n%s", out)
}
