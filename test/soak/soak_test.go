package soak

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/flattend/flattend/test/cephtest"
	"github.com/flattend/flattend/test/netlab"
	"github.com/flattend/flattend/test/observer"
)

const (
	nodeCount  = 4
	slots      = 2
	lockImage  = "soaklock"
	innerEnv   = "FLATTEND_SOAK_LAB" // set in the process that runs inside the lab
	cloneMiB   = 16                  // of 64 KiB objects: 256 objects…
	paceMiB    = 1                   // …paced at 1 MiB/s: a flatten lasts about 16 s
	firstEach  = 4                   // clones per node at the start
	pendingMin = 2                   // a node with fewer clones left to flatten gets new ones
)

var binary string

func TestMain(m *testing.M) {
	if os.Getenv("FLATTEND_SOAK") == "" {
		os.Exit(m.Run()) // TestSoak skips: nothing to build
	}
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

// TestSoak builds a network lab (a namespace for the cluster, one per node), starts a cluster
// inside it, and runs itself again inside the cluster's namespace (inner), where it can reach
// the cluster with go-ceph and drive the nodes in theirs.
func TestSoak(t *testing.T) {
	if os.Getenv("FLATTEND_SOAK") == "" {
		t.Skip("the soak runs only with FLATTEND_SOAK=1 (make soak)")
	}
	if enc := os.Getenv(innerEnv); enc != "" {
		inner(t, netlab.Attach(t, enc))
		return
	}
	if why := netlab.Available(); why != "" {
		t.Fatalf("the soak needs network namespaces (root and iproute2): %s", why)
	}
	lab := netlab.New(t, append([]string{"ceph"}, nodeNames()...)...)
	clusterDir := filepath.Join(t.TempDir(), "cluster")
	start := lab.In("ceph", nil, "bash", "../cluster.sh", "start", clusterDir, "--addr", lab.IP["ceph"],
		"--memstore-gib", "4", "--watch-timeout", "10")
	if out, err := start.CombinedOutput(); err != nil {
		t.Fatalf("starting the cluster inside its namespace: %v\n%s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("bash", "../cluster.sh", "stop", clusterDir).Run() })
	conf := filepath.Join(clusterDir, "ceph.conf")
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	// The inner run must end before this one times out: a timeout panic skips the cleanups.
	args := []string{exe, "-test.run", "^TestSoak$", "-test.count", "1", "-test.timeout", innerTimeout(t).String()}
	if testing.Verbose() {
		args = append(args, "-test.v")
	}
	env := []string{innerEnv + "=" + lab.Encode(), "FLATTEND_TEST_CEPH_CONF=" + conf, "CEPH_CONF=" + conf,
		"FLATTEND_TEST_WATCH_TIMEOUT=10", "FLATTEND_BIN=" + binary}
	cmd := lab.In("ceph", env, args...)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("the soak, run inside the lab: %v", err)
	}
}

func innerTimeout(t *testing.T) time.Duration {
	d, ok := t.Deadline()
	if !ok {
		return 0
	}
	return max(time.Until(d)-2*time.Minute, time.Minute)
}

func nodeNames() []string {
	var ns []string
	for i := 1; i <= nodeCount; i++ {
		ns = append(ns, fmt.Sprintf("h%d", i))
	}
	return ns
}

// soakDuration is FLATTEND_SOAK_DURATION (a Go duration), 10 minutes if unset.
func soakDuration(t *testing.T) time.Duration {
	s := os.Getenv("FLATTEND_SOAK_DURATION")
	if s == "" {
		return 10 * time.Minute
	}
	d, err := time.ParseDuration(s)
	if err != nil || d <= 0 {
		t.Fatalf("FLATTEND_SOAK_DURATION=%q: want a positive Go duration such as 3m", s)
	}
	return d
}

// inner is the soak itself, run inside the cluster's namespace.
func inner(t *testing.T, lab *netlab.Lab) {
	duration := soakDuration(t)
	conn := connect(t)
	ioctx := cephtest.IOContext(t, conn)
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 0))
	s := &soak{t: t, lab: lab, conn: conn, ioctx: ioctx, began: time.Now()}
	s.parents = []cephtest.Parent{
		cephtest.MakeParent(t, ioctx, "soak-parent-a", cloneMiB<<20, 16),
		cephtest.MakeParent(t, ioctx, "soak-parent-b", cloneMiB<<20, 16),
	}
	s.faults = faults{count: map[string]int{}, busy: map[string]bool{}}
	s.obs = observer.New(t, conn, ioctx, lockImage, slots)
	s.clones = &cloneSet{ioctx: ioctx, parents: s.parents, obs: s.obs}
	s.obs.SetIsFlat(s.clones.isFlat)
	for _, n := range nodeNames() {
		for range firstEach {
			if _, err := s.clones.add(n); err != nil {
				t.Fatal(err)
			}
		}
	}
	s.logDir = logDir(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	obsDone := s.obs.Run(ctx)
	s.startNodes(rng)
	t.Logf("soak: %d nodes, %d slots, %d clones of %d MiB, faults for %s; node logs in %s",
		nodeCount, slots, s.clones.count(), cloneMiB, duration, s.logDir)
	s.faultPhase(ctx, duration, rng)
	s.endPhase(obsDone, cancel)
}

// logDir keeps the nodes' logs: FLATTEND_SOAK_LOGS, or a temporary directory removed when the
// soak passes.
func logDir(t *testing.T) string {
	if d := os.Getenv("FLATTEND_SOAK_LOGS"); d != "" {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		return d
	}
	d, err := os.MkdirTemp("", "flattend-soak-logs")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if !t.Failed() {
			os.RemoveAll(d)
		}
	})
	return d
}

// writeJSON writes v to FLATTEND_SOAK_RESULTS if set.
func writeJSON(t *testing.T, v any) {
	p := os.Getenv("FLATTEND_SOAK_RESULTS")
	if p == "" {
		return
	}
	b, _ := json.MarshalIndent(v, "", "  ")
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Error(err)
	}
	if err := os.WriteFile(p, append(b, '\n'), 0o644); err != nil {
		t.Error(err)
	}
}
