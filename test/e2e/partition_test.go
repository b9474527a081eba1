package e2e

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/flattend/flattend/test/cephtest"
	"github.com/flattend/flattend/test/netlab"
)

// partitionEnv carries the lab to the copy of the test that runs inside the cluster's namespace.
const partitionEnv = "FLATTEND_E2E_PARTITION_LAB"

// Cut the holder's link in the middle of its flatten: the other node takes over after the watch
// timeout (breaking the lock blocklists the cut node), and once the link is back the cut node
// finds it lost the lock, reconnects without a restart and flattens its clone under a new lock.
// The proof of fencing is RADOS's, sampled by an observer that is never cut: the cut client is
// in the blocklist, it never owns a lock again once the other node flattens, and no two
// flattens ever ran at once. The test runs itself again inside the cluster's namespace
// (partitionInner), where go-ceph reaches the cluster and `ip netns exec` the nodes.
func TestPartitionedHolderIsFencedAndRecovers(t *testing.T) {
	inLab(t, "TestPartitionedHolderIsFencedAndRecovers", []string{"h1", "h2"}, partitionInner)
}

// inLab runs test name (the caller) in a network lab of a cluster namespace and hosts: the outer
// run starts a cephx cluster inside namespace "ceph" and runs the test binary again there, where
// inner gets the lab (go-ceph reaches the cluster, `ip netns exec` runs the nodes).
func inLab(t *testing.T, name string, hosts []string, inner func(*testing.T, *netlab.Lab)) {
	if enc := os.Getenv(partitionEnv); enc != "" {
		inner(t, netlab.Attach(t, enc))
		return
	}
	if os.Getenv("FLATTEND_TEST_CEPH_AUTH") == "cephx" {
		t.Skip("runs its own cephx cluster: once per `make test`, in the auth-none pass")
	}
	if why := netlab.Available(); why != "" {
		t.Skipf("network namespaces unavailable here (need root and iproute2): %s", why)
	}
	lab := netlab.New(t, append([]string{"ceph"}, hosts...)...)
	clusterDir := filepath.Join(t.TempDir(), "cluster")
	// cephx, the nodes with the least-privilege key: fencing (blocklist add, break lock) must
	// work with the caps flattend is given.
	start := lab.In("ceph", nil, "bash", "../cluster.sh", "start", clusterDir, "--addr", lab.IP["ceph"], "--memstore-gib", "2", "--auth", "cephx")
	out, err := start.Output()
	if err != nil {
		t.Fatalf("starting the cluster inside its namespace: %v\n%s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("bash", "../cluster.sh", "stop", clusterDir).Run() })
	conf := filepath.Join(clusterDir, "ceph.conf")
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	args := []string{exe, "-test.run", "^" + name + "$", "-test.count", "1"}
	if d, ok := t.Deadline(); ok { // the inner run must end first: a timeout panic skips cleanups
		args = append(args, "-test.timeout", max(time.Until(d)-time.Minute, time.Minute).String())
	}
	if testing.Verbose() {
		args = append(args, "-test.v")
	}
	cmd := lab.In("ceph", []string{partitionEnv + "=" + lab.Encode(), "FLATTEND_TEST_CEPH_CONF=" + conf, "CEPH_CONF=" + conf,
		"FLATTEND_TEST_CEPH_USER=", "FLATTEND_TEST_CEPH_KEYRING=", "FLATTEND_BIN=" + binary}, args...)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s, run inside the cluster's namespace: %v", name, err)
	}
}

// partitionInner is the partition test itself, inside the cluster's namespace.
func partitionInner(t *testing.T, lab *netlab.Lab) {
	dir := t.TempDir()
	conf := os.Getenv("FLATTEND_TEST_CEPH_CONF")
	env := []string{"CEPH_CONF=" + conf}
	ceph := func(args ...string) string {
		t.Helper()
		out, err := lab.In("ceph", env, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}

	// A parent of 64 KiB objects: slow to flatten one object at a time, so the cut lands mid-way.
	raw := filepath.Join(dir, "parent.raw")
	data := make([]byte, 96<<20)
	for i := range data {
		data[i] = byte(rand.Uint32())
	}
	if err := os.WriteFile(raw, data, 0o644); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(data)
	want := hex.EncodeToString(sum[:])
	ceph("rbd", "import", "--object-size", "64K", raw, "rbd/parent")
	ceph("rbd", "snap", "create", "rbd/parent@s")
	ceph("rbd", "snap", "protect", "rbd/parent@s")
	hosts := []string{"h1", "h2"}
	procs := map[string]*proc{}
	for _, h := range hosts {
		ceph("rbd", "clone", "rbd/parent@s", "rbd/"+h+"-c")
		ceph("rbd", "image-meta", "set", "rbd/"+h+"-c", "flattend.owner", h)
	}
	conn := cephtest.Connect(t)
	w := watchRADOS(t, conn, cephtest.PoolIOContext(t, conn, "rbd"), "plock", 1, "h1-c", "h2-c")
	for _, h := range hosts {
		cfg := filepath.Join(dir, h+".yaml")
		body := fmt.Sprintf(`node: %s
ceph: {conf: %s, user: flattend, keyring: %s, connect_timeout: 20s}
lock: {pool: rbd, image: plock, check_interval: 1s}
window: {schedule: "* * * * *", duration: 1h}
backoff: {min: 200ms, max: 1s}
flatten: {concurrent_ops: 1}
discovery: {pools: [{pool: rbd}], interval: 2s}
metrics: {listen: ""}
log: {level: debug, format: json}
`, h, conf, filepath.Join(filepath.Dir(conf), "flattend.keyring"))
		if err := os.WriteFile(cfg, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		procs[h] = startCmd(t, lab.In(h, nil, binary, "run", "--config", cfg))
	}

	// Whoever flattens first is the one we cut.
	var holder, other string
	deadline := time.Now().Add(time.Minute)
	for holder == "" {
		if time.Now().After(deadline) {
			t.Fatal("no node started flattening")
		}
		for _, h := range hosts {
			if count(procs[h].events(t), "flatten started") > 0 {
				holder = h
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	other = map[string]string{"h1": "h2", "h2": "h1"}[holder]
	procs[holder].waitFor(t, time.Minute, "progress", func(e event) bool { return e.Msg == "flatten progress" })
	cutAt := time.Now()
	lab.Cut(holder)
	t.Logf("cut %s at %s", holder, cutAt.Format(time.StampMilli))

	takeover := procs[other].waitFor(t, 2*time.Minute, "the takeover", func(e event) bool { return e.Msg == "flatten started" })
	t.Logf("%s took over %s after the cut", other, takeover.TS.Sub(cutAt).Round(time.Millisecond))
	// The cut node's client is fenced before the other node flattens.
	if bl := ceph("ceph", "osd", "blocklist", "ls"); !strings.Contains(bl, lab.IP[holder]+":0/") {
		t.Errorf("the cut node %s (%s) is not blocklisted after the takeover:\n%s", holder, lab.IP[holder], bl)
	}
	time.Sleep(2 * time.Second)
	lab.Heal(holder)
	healAt := time.Now()

	procs[holder].waitFor(t, 2*time.Minute, "the cut node noticing its loss", func(e event) bool { return e.Msg == "lock lost, reconnecting" })
	for _, h := range hosts {
		h := h
		procs[h].waitFor(t, 4*time.Minute, h+"'s clone flat", func(e event) bool {
			return e.Msg == "flatten finished" && e.Result == "flat" && strings.HasSuffix(e.Image, "/"+h+"-c")
		})
	}
	t.Logf("the cut node was healed at +%s and recovered without a restart", healAt.Sub(cutAt).Round(time.Millisecond))

	// RADOS's word, not the logs': never two flattens at once, and the cut client fenced.
	w.finish(t)
	if old := w.assertFenced(t, 0); !strings.HasPrefix(bareIP(old.Addr), lab.IP[holder]+":") {
		t.Errorf("the first holder RADOS saw is %s at %s, not the cut node %s (%s)", old, old.Addr, holder, lab.IP[holder])
	}

	for _, h := range hosts {
		var info struct {
			Parent any `json:"parent"`
		}
		if err := json.Unmarshal([]byte(ceph("rbd", "info", "--format", "json", "rbd/"+h+"-c")), &info); err != nil {
			t.Fatal(err)
		}
		if info.Parent != nil {
			t.Errorf("%s-c still has a parent", h)
		}
		exported := filepath.Join(dir, h+"-export.raw")
		ceph("rbd", "export", "rbd/"+h+"-c", exported)
		got, err := os.ReadFile(exported)
		if err != nil {
			t.Fatal(err)
		}
		gsum := sha256.Sum256(got)
		if hex.EncodeToString(gsum[:]) != want {
			t.Errorf("%s-c differs from its parent at object(s) %v", h, diffObjects(data, got))
		}
	}
}

// bareIP drops the messenger prefix of a Ceph address: "v1:10.0.0.2:0/123" → "10.0.0.2:0/123".
func bareIP(a string) string {
	for _, p := range []string{"v1:", "v2:", "any:"} {
		a = strings.TrimPrefix(a, p)
	}
	return a
}

// diffObjects lists the 64 KiB objects where a and b differ (at most 5).
func diffObjects(a, b []byte) []int {
	var objs []int
	for o := 0; o*65536 < len(a) && len(objs) < 5; o++ {
		end := min((o+1)*65536, len(a), len(b))
		if o*65536 >= len(b) || !bytes.Equal(a[o*65536:end], b[o*65536:end]) {
			objs = append(objs, o)
		}
	}
	return objs
}
