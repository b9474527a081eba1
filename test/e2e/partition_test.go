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

	"github.com/flattend/flattend/test/netlab"
)

// Cut the holder's link in the middle of its flatten: the other node takes over after the watch
// timeout (breaking the lock blocklists the cut node), and once the link is back the cut node
// finds it lost the lock, reconnects without a restart and flattens its clone under a new lock.
// The cut node's flatten I/O ends at the cut (its packets are dropped, then it is fenced), so no
// two flattens overlap.
func TestPartitionedHolderIsFencedAndRecovers(t *testing.T) {
	if os.Getenv("FLATTEND_TEST_CEPH_AUTH") == "cephx" {
		t.Skip("runs its own cluster: once per `make test`, in the auth-none pass")
	}
	if why := netlab.Available(); why != "" {
		t.Skipf("network namespaces unavailable here (need root and iproute2): %s", why)
	}
	lab := netlab.New(t, "ceph", "h1", "h2")
	dir := t.TempDir()
	clusterDir := filepath.Join(dir, "cluster")
	start := lab.In("ceph", nil, "bash", "../cluster.sh", "start", clusterDir, "--addr", lab.IP["ceph"], "--memstore-gib", "2")
	out, err := start.Output()
	if err != nil {
		t.Fatalf("starting the cluster inside its namespace: %v\n%s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("bash", "../cluster.sh", "stop", clusterDir).Run() })
	conf := filepath.Join(clusterDir, "ceph.conf")
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
	for _, h := range hosts {
		cfg := filepath.Join(dir, h+".yaml")
		body := fmt.Sprintf(`node: %s
ceph: {conf: %s, user: admin, connect_timeout: 20s}
lock: {pool: rbd, image: plock, check_interval: 1s}
window: {schedule: "* * * * *", duration: 1h}
backoff: {min: 200ms, max: 1s}
flatten: {concurrent_ops: 1}
discovery: {pools: [{pool: rbd}], interval: 2s}
metrics: {listen: ""}
log: {level: debug, format: json}
`, h, conf)
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

	// No overlap: the cut node's interrupted flatten ends, as far as the cluster is concerned, at
	// the cut (then it was blocklisted); the logged end comes later, when it noticed.
	var ivs []interval
	for _, h := range hosts {
		for _, iv := range intervals(t, procs[h].events(t), time.Time{}) {
			if h == holder && iv.result != "flat" && iv.from.Before(cutAt) {
				iv.to = cutAt
			}
			ivs = append(ivs, iv)
		}
	}
	assertNoOverlap(t, ivs)

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
