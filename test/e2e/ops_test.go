package e2e

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/flattend/flattend/test/cephtest"
)

// notifySocket is a stand-in for systemd's NOTIFY_SOCKET: it collects the datagrams sent to it.
type notifySocket struct {
	path string
	mu   sync.Mutex
	msgs []string
}

func newNotifySocket(t *testing.T) *notifySocket {
	t.Helper()
	n := &notifySocket{path: filepath.Join(t.TempDir(), "notify.sock")}
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: n.path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	go func() {
		buf := make([]byte, 4096)
		for {
			k, err := conn.Read(buf)
			if err != nil {
				return
			}
			n.mu.Lock()
			n.msgs = append(n.msgs, string(buf[:k]))
			n.mu.Unlock()
		}
	}()
	return n
}

func (n *notifySocket) waitFor(t *testing.T, msg string, timeout time.Duration) {
	t.Helper()
	for deadline := time.Now().Add(timeout); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		n.mu.Lock()
		for _, m := range n.msgs {
			if strings.Contains(m, msg) {
				n.mu.Unlock()
				return
			}
		}
		n.mu.Unlock()
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	t.Fatalf("no %q on the notify socket within %s; got %q", msg, timeout, n.msgs)
}

// startWithEnv is start with extra environment variables.
func startWithEnv(t *testing.T, env []string, args ...string) *proc {
	t.Helper()
	cmd := exec.Command(binary, args...)
	cmd.Env = append(os.Environ(), env...)
	return startCmd(t, cmd)
}

// The daemon as systemd runs it: READY once connected, watchdog pings, /metrics that count what
// happened, SIGHUP reloads (an invalid file is rejected and the old config stays; a valid one
// that closes the window ends it), SIGTERM: STOPPING and exit 0.
func TestDaemonUnderSystemd(t *testing.T) {
	conn := cephtest.Connect(t)
	ioctx := cephtest.IOContext(t, conn)
	p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 16<<20, 22)
	node := cephtest.Name(t, "n")
	cephtest.Clone(t, ioctx, p, node+"-c", node)
	conf := nodeConfig(t, node, cephtest.Name(t, "lock"), "metrics: {listen: \"127.0.0.1:0\"}\n")

	notify := newNotifySocket(t)
	pr := startWithEnv(t, []string{"NOTIFY_SOCKET=" + notify.path, "WATCHDOG_USEC=1500000"}, "run", "--config", conf)
	notify.waitFor(t, "READY=1", 30*time.Second)
	pr.waitFor(t, time.Minute, "a pass", func(e event) bool { return e.Msg == "pass done" })
	cephtest.AssertFlatAndIntact(t, ioctx, p, node+"-c")
	notify.waitFor(t, "WATCHDOG=1", 5*time.Second)
	notify.waitFor(t, "STATUS=pass done: 1 flattened, 0 failed, 0 skipped, 0 left; next pass ", 5*time.Second)

	served := pr.waitFor(t, time.Second, "metrics address", func(e event) bool { return e.Msg == "serving metrics" })
	resp, err := http.Get(served.URL)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{
		`flattend_flattens_ended_total{reason="done",result="flat"} 1`,
		`flattend_flattens_started_total 1`,
		`flattend_lock_wait_seconds_count 1`,
		`flattend_copied_bytes_total 1.6777216e+07`,
		`flattend_window_open 1`,
		`flattend_discovered_clones 1`,
		`flattend_lock_held 0`,
		`flattend_gate_closed_total{gate="space"} 0`,
		fmt.Sprintf(`flattend_node_info{node=%q} 1`, node),
		`flattend_backlog_clones 0`,
		`flattend_backlog_bytes 0`,
		`flattend_clone_consecutive_failures_max 0`,
	} {
		if !strings.Contains(string(body), "\n"+want+"\n") { // a whole line: not a HELP text
			t.Errorf("/metrics lacks %s", want)
		}
	}
	for _, series := range []string{"flattend_last_pass_success_timestamp_seconds", "flattend_next_window_open_timestamp_seconds"} {
		if v := regexp.MustCompile(`(?m)^` + series + ` (\S+)$`).FindStringSubmatch(string(body)); v == nil || v[1] == "0" {
			t.Errorf("/metrics: %s is %v, want a time", series, v)
		}
	}
	if t.Failed() {
		t.Logf("/metrics:\n%s", regexp.MustCompile(`(?m)^(#|go_|process_).*\n`).ReplaceAllString(string(body), ""))
	}
	// /healthz and /status on the same listener.
	base := strings.TrimSuffix(served.URL, "/metrics")
	if code, body := get(t, base+"/healthz"); code != http.StatusOK {
		t.Errorf("/healthz: %d %s", code, body)
	}
	var st struct {
		Node     string              `json:"node"`
		State    string              `json:"state"`
		Window   struct{ Open bool } `json:"window"`
		LastPass *struct {
			Result    string `json:"result"`
			Flattened int    `json:"flattened"`
		} `json:"last_pass"`
	}
	if code, body := get(t, base+"/status"); code != http.StatusOK || json.Unmarshal([]byte(body), &st) != nil ||
		st.Node != node || st.State != "idle" || !st.Window.Open || st.LastPass == nil || st.LastPass.Result != "ok" || st.LastPass.Flattened != 1 {
		t.Errorf("/status: %d %s", code, body)
	}

	// An invalid file: rejected, named file:line, the daemon goes on.
	good, _ := os.ReadFile(conf)
	if err := os.WriteFile(conf, append(good, []byte("flatten: {concurrent_ops: 0}\n")...), 0o644); err != nil {
		t.Fatal(err)
	}
	hup := func() {
		if err := pr.cmd.Process.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
	}
	hup()
	rej := pr.waitFor(t, 10*time.Second, "rejected reload", func(e event) bool { return e.Msg == "configuration reload rejected, keeping the running one" })
	if !strings.Contains(rej.Error, ".yaml:") || !strings.Contains(rej.Error, "flatten.concurrent_ops: 0 is out of range") {
		t.Errorf("rejection does not name file, line and field: %q", rej.Error)
	}

	// A valid file whose window is closed now: accepted, and the open window ends.
	past := time.Now().Add(-3 * time.Hour)
	closed := strings.Replace(string(good), `window: {schedule: "* * * * *", duration: 1h}`,
		fmt.Sprintf(`window: {schedule: "%d %d * * *", duration: 30m}`, past.Minute(), past.Hour()), 1)
	if closed == string(good) {
		t.Fatal("test bug: window line not found in the config")
	}
	if err := os.WriteFile(conf, []byte(closed), 0o644); err != nil {
		t.Fatal(err)
	}
	hup()
	pr.waitFor(t, 10*time.Second, "accepted reload", func(e event) bool { return e.Msg == "configuration reload accepted; it applies between two flattens" })
	pr.waitFor(t, 10*time.Second, "the window closed by the reload", func(e event) bool { return e.Msg == "window closed" })
	notify.waitFor(t, "RELOADING=1\nMONOTONIC_USEC=", time.Second) // as systemd ≥ 253 expects
	notify.waitFor(t, "STATUS=window closed; opens ", 5*time.Second)

	if err := pr.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := pr.wait(t, 20*time.Second); code != 0 {
		t.Errorf("run exited %d on SIGTERM, want 0", code)
	}
	notify.waitFor(t, "STOPPING=1", time.Second)
}

// unlock --force breaks a stuck holder's lock after confirmation, blocklisting it; without
// --force or without the right confirmation nothing happens.
func TestUnlockForce(t *testing.T) {
	conn := cephtest.Connect(t)
	ioctx := cephtest.IOContext(t, conn)
	node := cephtest.Name(t, "n")
	lockImage := cephtest.Name(t, "lock")
	conf := nodeConfig(t, node, lockImage, "")
	if code, out := runCmd(t, time.Minute, "check", "--config", conf); code != 0 {
		t.Fatalf("check: %d\n%s", code, out)
	}
	// The lock image exists once a daemon ran: `once` with nothing to do creates it.
	if code, out := runCmd(t, time.Minute, "once", "--config", conf); code != 0 {
		t.Fatalf("once: %d\n%s", code, out)
	}
	stuck := cephtest.Connect(t) // a holder that hangs: it holds the lock and does nothing
	stuckIO := cephtest.IOContext(t, stuck)
	cephtest.HoldLock(t, stuckIO, lockImage)

	if code, out := runCmd(t, time.Minute, "unlock", "--config", conf); code != 2 || !strings.Contains(out, "needs --force") {
		t.Errorf("unlock without --force: exit %d, want 2:\n%s", code, out)
	}
	// The stuck holder still watches the lock image and has no record: it looks alive, so each
	// break below needs --force-live.
	cmd := exec.Command(binary, "unlock", "--force", "--force-live", "--config", conf)
	cmd.Stdin = strings.NewReader("no\n")
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(string(out), "not confirmed: nothing broken") {
		t.Errorf("unlock with a wrong confirmation: %v, want exit 1:\n%s", err, out)
	}
	if code, out := runCmd(t, time.Minute, "status", "--config", conf, "--json"); code != 0 || !strings.Contains(out, `"owner"`) {
		t.Fatalf("after a refused unlock the lock must still be held: exit %d\n%s", code, out)
	}

	code, outS := runCmd(t, time.Minute, "unlock", "--force", "--force-live", "--yes", "--config", conf)
	if code != 0 || !strings.Contains(outS, "lock of slot 0 broken") {
		t.Fatalf("unlock --force --yes: exit %d\n%s", code, outS)
	}
	// The stuck client is fenced: it cannot write any more.
	deadline := time.Now().Add(10 * time.Second)
	for {
		if err := stuckIO.WriteFull(cephtest.Name(t, "probe"), []byte("x")); err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the broken holder can still write: not blocklisted")
		}
		time.Sleep(200 * time.Millisecond)
	}
	// And a node gets the lock at once.
	p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 4<<20, 22)
	cephtest.Clone(t, ioctx, p, node+"-c", node)
	if code, out := runCmd(t, time.Minute, "once", "--config", conf); code != 0 {
		t.Fatalf("once after unlock: exit %d\n%s", code, out)
	}
	cephtest.AssertFlatAndIntact(t, ioctx, p, node+"-c")
}

// once --image flattens one named clone, whoever owns it (first redoing copy-ups a killed flatten
// lost), and prints plain progress lines when stdout is not a terminal.
func TestOnceImage(t *testing.T) {
	conn := cephtest.Connect(t)
	ioctx := cephtest.IOContext(t, conn)
	p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 8<<20, 20)
	node := cephtest.Name(t, "n")
	theirs, mine := cephtest.Name(t, "theirs"), node+"-c"
	cephtest.Clone(t, ioctx, p, theirs, "someone-else")
	cephtest.Clone(t, ioctx, p, mine, node)
	cephtest.LoseCopyup(t, ioctx, theirs, 3) // as if an `rbd flatten` had been killed: once --image repairs it
	code, out := runCmd(t, time.Minute, "once", "--config", nodeConfig(t, node, cephtest.Name(t, "lock"), ""),
		"--image", cephtest.Pool+"/"+theirs)
	if code != 0 || !strings.Contains(out, cephtest.Pool+"/"+theirs+": 100% (8/8 objects)") {
		t.Fatalf("once --image: exit %d, want 0 and a 100%% line:\n%s", code, out)
	}
	cephtest.AssertFlatAndIntact(t, ioctx, p, theirs)
	if !cephtest.IsClone(t, ioctx, mine) {
		t.Error("once --image flattened another clone too")
	}
	code, out = runCmd(t, time.Minute, "once", "--config", nodeConfig(t, node, cephtest.Name(t, "lock"), ""), "--image", "nopool-image")
	if code != 2 || !strings.Contains(out, "--image: \"nopool-image\" is not pool/image") {
		t.Errorf("once --image with a bad name: exit %d\n%s", code, out)
	}
}

// A reload during a flatten (new log level, gates, a longer window) applies without dropping the
// lock: the flatten that was running finishes in one go.
func TestReloadKeepsRunningFlatten(t *testing.T) {
	n := newSlowNode(t, cephtest.Connect(t), 128)
	pr := start(t, "run", "--config", n.conf)
	pr.waitFor(t, time.Minute, "flatten progress", func(e event) bool { return e.Msg == "flatten progress" })
	b, err := os.ReadFile(n.conf)
	if err != nil {
		t.Fatal(err)
	}
	changed := strings.Replace(string(b), `duration: 1h}`, `duration: 2h}`, 1) + "gates: {check_interval: 2s}\n"
	changed = strings.Replace(changed, "level: debug", "level: info", 1)
	if err := os.WriteFile(n.conf, []byte(changed), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := pr.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	acc := pr.waitFor(t, 10*time.Second, "accepted reload", func(e event) bool { return e.Msg == "configuration reload accepted; it applies between two flattens" })
	fin := pr.waitFor(t, 2*time.Minute, "flatten finished", func(e event) bool { return e.Msg == "flatten finished" })
	if !acc.TS.Before(fin.TS) {
		t.Fatal("the flatten ended before the reload: make the clone slower")
	}
	if fin.Result != "flat" {
		t.Errorf("the flatten running during the reload ended %q (%s), want flat", fin.Result, fin.Error)
	}
	if got := count(pr.events(t), "flatten started"); got != 1 {
		t.Errorf("%d flattens started, want 1: the reload interrupted the running one", got)
	}
	if err := pr.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := pr.wait(t, 20*time.Second); code != 0 {
		t.Errorf("exit %d on SIGTERM", code)
	}
	cephtest.AssertFlatAndIntact(t, n.ioctx, n.parent, n.clone)
}

// get returns a GET's status code and body.
func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(body)
}
