package e2e

// Operations paths (issue 14): a reload's effects, metric values off the happy path, and flags
// and settings run for real. Each test asserts from evidence the daemon does not write itself
// where there is some: RADOS lock owners, the clone's parent and content, /metrics.

import (
	"fmt"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ceph/go-ceph/rados"

	"github.com/flattend/flattend/test/cephtest"
)

// alwaysOpen is the window line nodeConfig writes.
const alwaysOpen = `window: {schedule: "* * * * *", duration: 1h}`

// closedWindow is a window line whose window is closed now (it opened 3 h ago for 30 min).
func closedWindow() string {
	past := time.Now().Add(-3 * time.Hour)
	return fmt.Sprintf(`window: {schedule: "%d %d * * *", duration: 30m}`, past.Minute(), past.Hour())
}

// rewrite replaces old with new in the config file conf, failing if old is not there.
func rewrite(t *testing.T, conf string, pairs ...string) {
	t.Helper()
	b, err := os.ReadFile(conf)
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	for i := 0; i+1 < len(pairs); i += 2 {
		if !strings.Contains(s, pairs[i]) {
			t.Fatalf("test bug: %q not in %s:\n%s", pairs[i], conf, s)
		}
		s = strings.Replace(s, pairs[i], pairs[i+1], 1)
	}
	if err := os.WriteFile(conf, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
}

// reload sends SIGHUP and waits for the accepted reload, returning its event.
func (p *proc) reload(t *testing.T) event {
	t.Helper()
	before := count(p.events(t), "configuration reload accepted; it applies between two flattens")
	if err := p.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	var n int
	return p.waitFor(t, 20*time.Second, "accepted reload", func(e event) bool {
		if e.Msg == "configuration reload accepted; it applies between two flattens" {
			n++
			return n > before
		}
		return false
	})
}

// after matches the events of msg logged after ev.
func after(ev event, msg string) func(event) bool {
	return func(e event) bool { return e.Msg == msg && e.TS.After(ev.TS) }
}

// scrape returns p's /metrics body (p runs `run` with metrics on).
func (p *proc) scrape(t *testing.T) string {
	t.Helper()
	served := p.waitFor(t, 30*time.Second, "metrics address", func(e event) bool { return e.Msg == "serving metrics" })
	code, body := get(t, served.URL)
	if code != 200 {
		t.Fatalf("/metrics: %d", code)
	}
	return body
}

// metricValue is the value of the series line (name and labels, as exposed), -1 if absent.
func metricValue(body, series string) float64 {
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(series) + ` (\S+)$`).FindStringSubmatch(body)
	if m == nil {
		return -1
	}
	v, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		return -1
	}
	return v
}

// waitMetric polls /metrics until series satisfies ok, failing with the last body after timeout.
func (p *proc) waitMetric(t *testing.T, timeout time.Duration, series string, ok func(float64) bool) float64 {
	t.Helper()
	var body string
	for deadline := time.Now().Add(timeout); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		body = p.scrape(t)
		if v := metricValue(body, series); ok(v) {
			return v
		}
	}
	t.Fatalf("/metrics: %s is %v after %s:\n%s", series, metricValue(body, series), timeout,
		regexp.MustCompile(`(?m)^(#|go_|process_).*\n`).ReplaceAllString(body, ""))
	return 0
}

// waitUnlocked polls RADOS until image has no lock owner: the slot is free, whatever the
// daemon logged. The bound is liveness only.
func waitUnlocked(t *testing.T, ioctx *rados.IOContext, image string) {
	t.Helper()
	var owners []string
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if owners = cephtest.Lockers(t, ioctx, image); len(owners) == 0 {
			return
		}
	}
	t.Fatalf("lock image %s still owned by %v", image, owners)
}

// quotaPool makes a pool of the test's own whose byte quota the returned function sets (0: none).
func quotaPool(t *testing.T, conn *rados.Conn) (string, *rados.IOContext, func(bytes int)) {
	t.Helper()
	pool := cephtest.Name(t, "pool")
	ownPool(t, conn, pool)
	return pool, cephtest.PoolIOContext(t, conn, pool), func(bytes int) {
		cephtest.MonCommand(t, conn, map[string]any{"prefix": "osd pool set-quota", "pool": pool, "field": "max_bytes", "val": fmt.Sprint(bytes)})
	}
}

// ownPool creates pool for this test and removes it when the test ends, so that the suite's
// placement groups and memory stay bounded however many such tests it has.
func ownPool(t *testing.T, conn *rados.Conn, pool string) {
	t.Helper()
	cephtest.EnsurePool(t, conn, pool)
	t.Cleanup(func() {
		cephtest.MonCommand(t, conn, map[string]any{"prefix": "osd pool rm", "pool": pool, "pool2": pool, "yes_i_really_really_mean_it": true})
	})
}

// Each reloaded setting takes effect, seen by what it changes: a window opened by a reload
// starts a pass; a gate loosened by a reload lets the clone it refused be flattened (flat, with
// its parent's content); a level raised to debug makes debug lines appear, none before.
func TestReloadAppliesLevelGateWindow(t *testing.T) {
	conn := cephtest.Connect(t)
	ioctx := cephtest.IOContext(t, conn)
	p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 32<<20, 22)
	pool, pctx, quota := quotaPool(t, conn)
	node := cephtest.Name(t, "n")
	clone := node + "-c"
	cephtest.CloneTo(t, ioctx, p, pctx, clone, node)
	quota(60 << 20) // < 32 MiB × space_factor 2: closed; × 1: open

	conf := nodeConfig(t, node, cephtest.Name(t, "lock"), closedWindow()+"\n"+
		"log: {level: info, format: json}\n"+
		fmt.Sprintf("discovery: {pools: [{pool: %s}], interval: 1s}\n", pool)+
		"gates: {space_factor: 2, check_interval: 1s}\n")
	pr := start(t, "run", "--config", conf)
	pr.waitFor(t, time.Minute, "window closed", func(e event) bool { return e.Msg == "window closed" })
	if n := count(pr.events(t), "discovered clones"); n != 0 {
		t.Fatalf("%d passes with the window closed", n)
	}

	// The window: opened by the reload, a pass runs; the gate refuses the clone.
	rewrite(t, conf, closedWindow(), alwaysOpen)
	r1 := pr.reload(t)
	pr.waitFor(t, 30*time.Second, "window open after the reload", after(r1, "window open"))
	pr.waitFor(t, 30*time.Second, "the space gate refusing the clone", func(e event) bool {
		return e.Msg == "safety gate closed, clone left for later" && e.TS.After(r1.TS) && strings.Contains(e.Error, "× 2")
	})
	if !cephtest.IsClone(t, pctx, clone) {
		t.Fatal("flattened behind a closed space gate")
	}

	// The gate and the level: space_factor 1 lets the clone through, debug lines appear.
	rewrite(t, conf, "space_factor: 2", "space_factor: 1", "level: info", "level: debug")
	hup := time.Now()
	r2 := pr.reload(t)
	fin := pr.waitFor(t, 2*time.Minute, "the flatten after the reload", after(r2, "flatten finished"))
	if fin.Result != "flat" {
		t.Fatalf("flatten after the gate reload: %q %s", fin.Result, fin.Error)
	}
	cephtest.AssertFlatAndIntact(t, pctx, p, clone)
	debug := 0
	for _, e := range pr.events(t) {
		if e.Level != "debug" {
			continue
		}
		debug++
		if e.TS.Before(hup) {
			t.Errorf("debug line before the level was raised: %+v", e)
		}
	}
	if debug == 0 {
		t.Error("no debug line after log.level was reloaded to debug (the lock's grant and release log at debug)")
	}
}

// A reload that closes the window during a flatten stops that flatten: it ends cancelled for
// the window (/metrics counts it so), the clone keeps its parent, the slot's lock has no owner
// in RADOS, and the next run completes the clone intact.
func TestReloadClosingWindowStopsFlatten(t *testing.T) {
	conn := cephtest.Connect(t)
	n := newSlowNode(t, conn, 64)
	// 32 s of flatten by construction: the reload lands in it, however fast the machine.
	conf := nodeConfig(t, n.node, n.lockImage, "flatten: {concurrent_ops: 1, max_bytes_per_second: 2MiB}\n")
	pr := start(t, "run", "--config", conf)
	pr.waitFor(t, time.Minute, "flatten progress", func(e event) bool { return e.Msg == "flatten progress" })
	if owners := cephtest.Lockers(t, n.ioctx, n.lockImage); len(owners) != 1 {
		t.Fatalf("lock image owners while flattening: %v, want one", owners)
	}
	rewrite(t, conf, alwaysOpen, closedWindow())
	r := pr.reload(t)
	fin := pr.waitFor(t, time.Minute, "flatten finished", func(e event) bool { return e.Msg == "flatten finished" })
	if fin.Result != "cancelled" || !fin.TS.After(r.TS) {
		t.Fatalf("flatten finished %q at %s (reload at %s), want cancelled after the reload", fin.Result, fin.TS, r.TS)
	}
	pr.waitFor(t, 30*time.Second, "window closed", after(r, "window closed"))
	if !cephtest.IsClone(t, n.ioctx, n.clone) {
		t.Fatal("the flatten stopped by the window detached the parent")
	}
	waitUnlocked(t, n.ioctx, n.lockImage)
	pr.waitMetric(t, 10*time.Second, `flattend_flattens_ended_total{reason="window",result="cancelled"}`, func(v float64) bool { return v == 1 })
	pr.waitMetric(t, 10*time.Second, `flattend_lock_held`, func(v float64) bool { return v == 0 })
	if got := cephtest.Lockers(t, n.ioctx, n.lockImage); len(got) != 0 {
		t.Fatalf("slot owned again with the window closed: %v", got)
	}
	if err := pr.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := pr.wait(t, 30*time.Second); code != 0 {
		t.Errorf("run exited %d on SIGTERM", code)
	}
	if code, out := runCmd(t, 3*time.Minute, "once", "--config", n.conf); code != 0 {
		t.Fatalf("once after the window closed: exit %d\n%s", code, out)
	}
	cephtest.AssertFlatAndIntact(t, n.ioctx, n.parent, n.clone)
}

// flattening samples, from RADOS, which clones have an exclusive-lock owner (a flatten holds its
// clone's lock while it copies) until stop is called; it returns the samples.
func flattening(t *testing.T, ioctx *rados.IOContext, clones ...string) (stop func() []map[string]bool) {
	t.Helper()
	var (
		mu      sync.Mutex
		samples []map[string]bool
		done    = make(chan struct{})
		ended   = make(chan struct{})
	)
	go func() {
		defer close(ended)
		for {
			s := map[string]bool{}
			for _, c := range clones {
				s[c] = len(cephtest.Lockers(t, ioctx, c)) > 0
			}
			mu.Lock()
			samples = append(samples, s)
			mu.Unlock()
			select {
			case <-done:
				return
			case <-time.After(100 * time.Millisecond):
			}
		}
	}()
	var once sync.Once
	stop = func() []map[string]bool {
		once.Do(func() { close(done); <-ended })
		mu.Lock()
		defer mu.Unlock()
		return samples
	}
	t.Cleanup(func() { stop() })
	return stop
}

// A reload that moves a node to another lock image while it flattens under the old one does
// not let a second flatten run under the old lock (1 slot): node b, waiting on it, starts only
// once a's flatten has ended. The evidence is RADOS's: the clones' exclusive-lock owners.
func TestReloadChangingLockDuringFlatten(t *testing.T) {
	conn := cephtest.Connect(t)
	ioctx := cephtest.IOContext(t, conn)
	lockImage, otherLock := cephtest.Name(t, "lock"), cephtest.Name(t, "lock2")
	p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 32<<20, 16)
	a, b := cephtest.Name(t, "a"), cephtest.Name(t, "b")
	a1, a2, b1 := a+"-c1", a+"-c2", b+"-c1"
	for _, c := range []struct{ name, owner string }{{a1, a}, {a2, a}, {b1, b}} {
		cephtest.Clone(t, ioctx, p, c.name, c.owner)
	}
	// 16 s per clone by construction.
	paced := "flatten: {concurrent_ops: 1, max_bytes_per_second: 2MiB, order: [age]}\n"
	confA := nodeConfig(t, a, lockImage, paced)
	prA := start(t, "run", "--config", confA)
	first := prA.waitFor(t, time.Minute, "a's first flatten", func(e event) bool { return e.Msg == "flatten started" })
	if first.Image != cephtest.Pool+"/"+a1 {
		t.Fatalf("a started with %s, want %s (oldest first)", first.Image, a1)
	}
	stop := flattening(t, ioctx, a1, a2, b1)
	prB := start(t, "run", "--config", nodeConfig(t, b, lockImage, paced))
	prB.waitFor(t, time.Minute, "b's discovery", func(e event) bool { return e.Msg == "discovered clones" })
	rewrite(t, confA, "image: "+lockImage, "image: "+otherLock)
	r := prA.reload(t)
	finA := prA.waitFor(t, time.Minute, "a's first flatten finished", func(e event) bool { return e.Msg == "flatten finished" && e.Image == first.Image })
	if !finA.TS.After(r.TS) {
		t.Fatal("a's flatten ended before the reload: make it slower")
	}
	for _, pr := range []*proc{prA, prB} {
		pr.waitFor(t, 2*time.Minute, "the node's pass done", func(e event) bool { return e.Msg == "pass done" })
	}
	samples := stop()
	for _, c := range []string{a1, a2, b1} {
		cephtest.AssertFlatAndIntact(t, ioctx, p, c)
	}
	var sawA1, sawB1 bool
	for i, s := range samples {
		sawA1, sawB1 = sawA1 || s[a1], sawB1 || s[b1]
		if s[a1] && s[b1] {
			t.Errorf("sample %d: %s (a, old lock) and %s (b, same lock) both being flattened", i, a1, b1)
		}
	}
	if !sawA1 || !sawB1 {
		t.Errorf("the RADOS samples never saw a flatten of %s (%v) or of %s (%v): the evidence is missing", a1, sawA1, b1, sawB1)
	}
	if o := cephtest.Lockers(t, ioctx, otherLock); len(o) != 0 {
		t.Logf("new lock image owners at the end: %v", o)
	}
	t.Logf("%d RADOS samples", len(samples))
}

// after returns the datagrams received after mark (a message the test sent itself).
func (n *notifySocket) after(mark string) []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	for i, m := range n.msgs {
		if m == mark {
			return append([]string(nil), n.msgs[i+1:]...)
		}
	}
	return nil
}

// A reload, accepted or rejected, tells systemd RELOADING=1 and then READY=1 (Type=notify-reload
// waits for that READY=1 before it counts the reload done). Order comes from the notify socket:
// datagrams arrive in the order they were sent, and the test's own marks split them.
func TestReloadNotifiesReadyAfterReloading(t *testing.T) {
	cephtest.IOContext(t, cephtest.Connect(t)) // the test pool, for the lock image
	node := cephtest.Name(t, "n")
	conf := nodeConfig(t, node, cephtest.Name(t, "lock"), "")
	notify := newNotifySocket(t)
	pr := startWithEnv(t, []string{"NOTIFY_SOCKET=" + notify.path}, "run", "--config", conf)
	notify.waitFor(t, "READY=1", time.Minute)
	good, err := os.ReadFile(conf)
	if err != nil {
		t.Fatal(err)
	}
	for i, body := range []string{string(good), string(good) + "flatten: {concurrent_ops: 0}\n"} {
		if err := os.WriteFile(conf, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		mark := fmt.Sprintf("TEST=reload-%d", i)
		notify.mark(t, mark)
		if err := pr.cmd.Process.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		var got []string
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			got = notify.after(mark)
			reloading := slices.IndexFunc(got, func(m string) bool { return strings.HasPrefix(m, "RELOADING=1\nMONOTONIC_USEC=") })
			if reloading >= 0 && slices.Contains(got[reloading+1:], "READY=1") {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("reload %d: no RELOADING=1 then READY=1 on the notify socket; after the SIGHUP: %q", i, got)
			}
		}
	}
	if n := count(pr.events(t), "configuration reload rejected, keeping the running one"); n != 1 {
		t.Errorf("%d rejected reloads, want 1 (the second file is invalid)", n)
	}
}
