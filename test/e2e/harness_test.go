// Package e2e runs the real flattend binary as separate processes against the test cluster:
// several "nodes" at once, kill -9, signals, bad configs. What the processes log (JSON, with
// nanosecond timestamps) drives the tests; mutual exclusion and fencing are asserted from RADOS
// by an observer (witness_test.go, test/observer), never from those logs.
package e2e

import (
	"bufio"
	"bytes"
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

	"github.com/flattend/flattend/test/cephtest"
)

var binary string

func TestMain(m *testing.M) {
	bin, cleanup, err := cephtest.Binary()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = bin
	code := m.Run()
	cleanup()
	os.Exit(code)
}

// nodeConfig writes a config for node with the test cluster, a lock image of the test's own and
// JSON debug logs. extra is YAML whose top-level keys replace the defaults' lines.
func nodeConfig(t *testing.T, node, lockImage, extra string) string {
	t.Helper()
	lines := []string{
		"node: " + node,
		fmt.Sprintf("ceph: {conf: %s, user: %s, keyring: %q, connect_timeout: 20s}", cephtest.ConfPath(t), cephtest.DaemonUser(), cephtest.DaemonKeyring()),
		fmt.Sprintf("lock: {pool: %s, image: %s, check_interval: 1s}", cephtest.Pool, lockImage),
		`window: {schedule: "* * * * *", duration: 1h}`, // always open
		"backoff: {min: 200ms, max: 1s}",
		"log: {level: debug, format: json}",
		`metrics: {listen: "127.0.0.1:0"}`, // many daemons on one host: any free port
		fmt.Sprintf("discovery: {pools: [{pool: %s}]}", cephtest.Pool),
	}
	var body []string
	for _, l := range lines {
		key := l[:strings.IndexByte(l, ':')+1]
		if !strings.HasPrefix(extra, key) && !strings.Contains(extra, "\n"+key) {
			body = append(body, l)
		}
	}
	body = append(body, extra)
	p := filepath.Join(t.TempDir(), node+".yaml")
	if err := os.WriteFile(p, []byte(strings.Join(body, "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// slowNode is one node owning one clone of a parent of 64 KiB objects, flattened one object at a
// time (flatten.concurrent_ops 1): slow enough to act on the flatten while it runs.
type slowNode struct {
	ioctx                        *rados.IOContext
	parent                       cephtest.Parent
	node, clone, lockImage, conf string
}

func newSlowNode(t *testing.T, conn *rados.Conn, mib uint64) slowNode {
	t.Helper()
	n := slowNode{ioctx: cephtest.IOContext(t, conn), node: cephtest.Name(t, "n"), lockImage: cephtest.Name(t, "lock")}
	n.parent = cephtest.MakeParent(t, n.ioctx, cephtest.Name(t, "parent"), mib<<20, 16)
	n.clone = n.node + "-c"
	cephtest.Clone(t, n.ioctx, n.parent, n.clone, n.node)
	n.conf = nodeConfig(t, n.node, n.lockImage, "flatten: {concurrent_ops: 1}\n")
	return n
}

// proc is a running flattend.
type proc struct {
	cmd  *exec.Cmd
	log  string // its stderr
	done chan struct{}
	err  error
}

func start(t *testing.T, args ...string) *proc {
	t.Helper()
	return startCmd(t, exec.Command(binary, args...))
}

// startCmd starts cmd (flattend, maybe wrapped: ip netns exec …) with its output in a log file.
func startCmd(t *testing.T, cmd *exec.Cmd) *proc {
	t.Helper()
	args := cmd.Args
	logf, err := os.CreateTemp(t.TempDir(), "flattend-*.log")
	if err != nil {
		t.Fatal(err)
	}
	p := &proc{cmd: cmd, log: logf.Name(), done: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	dieWithTest(p.cmd)
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.err = p.cmd.Wait(); logf.Close(); close(p.done) }()
	t.Cleanup(func() {
		_ = p.cmd.Process.Kill()
		<-p.done
		if t.Failed() {
			b, _ := os.ReadFile(p.log)
			t.Logf("log of %v:\n%s", args, b)
		}
	})
	return p
}

// dieWithTest has the kernel kill cmd when this test binary dies: a test binary that crashes
// runs no cleanup, and a daemon it started would otherwise go on flattening (or holding a
// slot) on the next suite's cluster.
func dieWithTest(cmd *exec.Cmd) {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
}

// wait returns the exit code, failing the test after timeout.
func (p *proc) wait(t *testing.T, timeout time.Duration) int {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(timeout):
		t.Fatalf("%v still running after %s", p.cmd.Args, timeout)
	}
	var ee *exec.ExitError
	if errors.As(p.err, &ee) {
		// Shown here, next to the failure, because the full logs at cleanup may be cut short.
		t.Logf("%v exited %d; its warnings and errors:\n%s", p.cmd.Args, ee.ExitCode(), p.problems())
		return ee.ExitCode()
	}
	if p.err != nil {
		t.Fatalf("%v: %v", p.cmd.Args, p.err)
	}
	return 0
}

// problems returns the log lines of level warn or worse, and the lines that are not JSON.
func (p *proc) problems() string {
	b, _ := os.ReadFile(p.log)
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		var e event
		if json.Unmarshal([]byte(line), &e) == nil && (e.Level == "info" || e.Level == "debug") {
			continue
		}
		if line != "" && !strings.Contains(line, "% (") { // progress lines on stdout
			out = append(out, "\t"+line)
		}
	}
	return strings.Join(out, "\n")
}

// waitAllOK waits for every process to exit 0 and returns all their events.
func waitAllOK(t *testing.T, procs []*proc, timeout time.Duration) []event {
	t.Helper()
	var all []event
	for _, pr := range procs {
		if code := pr.wait(t, timeout); code != 0 {
			t.Fatalf("%v exited %d", pr.cmd.Args, code)
		}
		all = append(all, pr.events(t)...)
	}
	return all
}

// event is one JSON log line.
type event struct {
	TS       time.Time `json:"ts"`
	Level    string    `json:"level"`
	Msg      string    `json:"msg"`
	Node     string    `json:"node"`
	Image    string    `json:"image"`
	Result   string    `json:"result"`
	Percent  int       `json:"percent"`
	Error    string    `json:"error"`
	Duration float64   `json:"duration"`
	URL      string    `json:"url"`
}

func (p *proc) events(t *testing.T) []event {
	t.Helper()
	f, err := os.Open(p.log)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var evs []event
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var e event
		if json.Unmarshal(sc.Bytes(), &e) == nil && e.Msg != "" {
			evs = append(evs, e)
		}
	}
	return evs
}

// waitFor polls p's log until an event satisfies match.
func (p *proc) waitFor(t *testing.T, timeout time.Duration, what string, match func(event) bool) event {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		for _, e := range p.events(t) {
			if match(e) {
				return e
			}
		}
		select {
		case <-p.done:
			for _, e := range p.events(t) {
				if match(e) {
					return e
				}
			}
			t.Fatalf("%v exited before %s", p.cmd.Args, what)
		case <-time.After(100 * time.Millisecond):
		}
	}
	t.Fatalf("no %s within %s", what, timeout)
	return event{}
}

func count(evs []event, msg string) int {
	n := 0
	for _, e := range evs {
		if e.Msg == msg {
			n++
		}
	}
	return n
}

// interval is one flatten as a process recorded it: from "flatten started" to "flatten
// finished" (or to the process's death when it was killed).
type interval struct {
	node, image string
	from, to    time.Time
	result      string
}

func intervals(t *testing.T, evs []event, killedAt time.Time) []interval {
	t.Helper()
	var out []interval
	open := map[string]*interval{}
	for _, e := range evs {
		switch e.Msg {
		case "flatten started":
			open[e.Image] = &interval{node: e.Node, image: e.Image, from: e.TS}
		case "flatten finished":
			iv := open[e.Image]
			if iv == nil {
				t.Fatalf("finish without start: %+v", e)
			}
			iv.to, iv.result = e.TS, e.Result
			out = append(out, *iv)
			delete(open, e.Image)
		}
	}
	for _, iv := range open {
		if killedAt.IsZero() {
			t.Fatalf("flatten of %s started and never finished", iv.image)
		}
		iv.to, iv.result = killedAt, "killed"
		out = append(out, *iv)
	}
	return out
}

// runCmd runs flattend to completion and returns its exit code and output.
func runCmd(t *testing.T, timeout time.Duration, args ...string) (int, string) {
	t.Helper()
	var out bytes.Buffer
	cmd := exec.Command(binary, args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	dieWithTest(cmd)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var err error
	select {
	case err = <-done:
	case <-time.After(timeout):
		_ = cmd.Process.Kill()
		t.Fatalf("%v did not finish within %s:\n%s", args, timeout, out.String())
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode(), out.String()
	}
	if err != nil {
		t.Fatal(err)
	}
	return 0, out.String()
}

// waitHealth polls `ceph health detail` until ok accepts its JSON, failing after a minute.
func waitHealth(t *testing.T, conn *rados.Conn, ok func(health string) bool) {
	t.Helper()
	var h string
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(500 * time.Millisecond) {
		h = string(cephtest.MonCommand(t, conn, map[string]any{"prefix": "health", "detail": "detail", "format": "json"}))
		if ok(h) {
			return
		}
	}
	t.Fatalf("cluster health did not change as expected within a minute: %s", h)
}
