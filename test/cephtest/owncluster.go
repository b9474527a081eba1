package cephtest

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// OwnCluster starts a throwaway cluster for t alone (test/cluster.sh, in the auth mode of the
// shared one) and points this process's FLATTEND_TEST_* and CEPH_* at it until t ends. A test
// that changes something cluster-wide (a full ratio, a mon setting) uses it, so the packages
// that run in parallel on the shared cluster never see the change. It has the test pool. t must
// not be parallel.
func OwnCluster(t *testing.T, memstoreGiB string) {
	t.Helper()
	ConfPath(t) // like every integration test: skips without a test cluster
	_, self, _, _ := runtime.Caller(0)
	script := filepath.Join(filepath.Dir(self), "..", "cluster.sh")
	dir := t.TempDir()
	auth := os.Getenv("FLATTEND_TEST_CEPH_AUTH")
	if auth == "" {
		auth = "none"
	}
	cmd := exec.Command("bash", script, "start", dir, "--memstore-gib", memstoreGiB, "--auth", auth)
	for _, kv := range os.Environ() { // not the shared cluster's CEPH_CONF, CEPH_KEYRING…
		if !strings.HasPrefix(kv, "CEPH_") && !strings.HasPrefix(kv, "FLATTEND_TEST_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	t.Cleanup(func() { _ = exec.Command("bash", script, "stop", dir).Run() })
	if err != nil {
		t.Fatalf("starting a cluster of the test's own: %v\n%s%s", err, out, stderr.String())
	}
	for _, l := range strings.Split(string(out), "\n") {
		if k, v, ok := strings.Cut(strings.TrimPrefix(l, "export "), "="); ok && strings.HasPrefix(l, "export ") {
			t.Setenv(k, v)
		}
	}
	EnsurePool(t, Connect(t), Pool) // as the shared cluster has it
}
