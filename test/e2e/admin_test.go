package e2e

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/flattend/flattend/internal/config"
	"github.com/flattend/flattend/test/cephtest"
)

// runAdmin runs flattend with no config file and the environment env instead of the test's
// CEPH_CONF and CEPH_ARGS, as an admin would on a node without flattend's config.
func runAdmin(t *testing.T, env []string, args ...string) (int, string) {
	t.Helper()
	if _, err := os.Stat(config.DefaultPath); err == nil {
		t.Fatalf("%s exists on this machine: these tests need a machine without a flattend config", config.DefaultPath)
	}
	var out strings.Builder
	cmd := exec.Command(binary, args...)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "CEPH_CONF=") && !strings.HasPrefix(kv, "CEPH_ARGS=") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, env...)
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.WaitDelay = time.Second
	done := make(chan error, 1)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { done <- cmd.Wait() }()
	select {
	case <-done:
	case <-time.After(2 * time.Minute):
		_ = cmd.Process.Kill()
		t.Fatalf("%v did not finish:\n%s", args, out.String())
	}
	return cmd.ProcessState.ExitCode(), out.String()
}

// cephFlags are the rbd-style flags that name the test cluster and flattend's test key.
func cephFlags(t *testing.T, conf, id string) []string {
	f := []string{conf, cephtest.ConfPath(t), id, cephtest.DaemonUser()}
	if id == "--name" || id == "-n" {
		f[3] = "client." + f[3]
	}
	if k := cephtest.DaemonKeyring(); k != "" {
		f = append(f, "--keyring", k)
	}
	return f
}

// status and unlock run from an admin node with no config file, named to the cluster as rbd is
// (--conf/-c, --id/--name, --keyring, or CEPH_CONF and CEPH_ARGS), with the lock's place as
// flags; the lock's slots are found from its images.
func TestAdminCommandsWithoutConfig(t *testing.T) {
	cephtest.IOContext(t, cephtest.Connect(t)) // the test pool
	node := cephtest.Name(t, "n")
	lockImage := cephtest.Name(t, "lock")
	conf := nodeConfig(t, node, lockImage, "lock: {pool: "+cephtest.Pool+", image: "+lockImage+", slots: 2, check_interval: 1s}")
	if code, out := runCmd(t, time.Minute, "once", "--config", conf); code != 0 { // creates both slots' images
		t.Fatalf("once: %d\n%s", code, out)
	}
	stuck := cephtest.Connect(t) // a holder of slot 1 that hangs
	cephtest.HoldLock(t, cephtest.IOContext(t, stuck), lockImage+".1")
	lockPlace := []string{"--lock-pool", cephtest.Pool, "--lock-image", lockImage}

	var st struct {
		Slots []struct {
			Slot  int    `json:"slot"`
			Owner string `json:"owner"`
		} `json:"slots"`
	}
	status := func(env []string, args ...string) {
		t.Helper()
		code, out := runAdmin(t, env, append(append([]string{"status", "--json"}, args...), lockPlace...)...)
		if code != 0 {
			t.Fatalf("status %v: exit %d\n%s", args, code, out)
		}
		st.Slots = nil
		if err := json.Unmarshal([]byte(out[strings.IndexByte(out, '{'):]), &st); err != nil {
			t.Fatalf("status %v: %v\n%s", args, err, out)
		}
		if len(st.Slots) != 2 || st.Slots[0].Owner != "" || st.Slots[1].Owner == "" {
			t.Errorf("status %v: want slot 1 of 2 held:\n%s", args, out)
		}
	}
	status(nil, cephFlags(t, "--conf", "--id")...)
	status(nil, cephFlags(t, "-c", "--name")...)
	status(nil, cephFlags(t, "--conf", "-n")...)
	args := "--id " + cephtest.DaemonUser()
	if k := cephtest.DaemonKeyring(); k != "" {
		args += " --keyring " + k
	}
	status([]string{"CEPH_CONF=" + cephtest.ConfPath(t), "CEPH_ARGS=" + args})
	status([]string{"CEPH_ARGS=--conf " + cephtest.ConfPath(t) + " " + args})
	// librados applies the other options of CEPH_ARGS over ceph.conf: here the monitors' address.
	var monHost string
	var noMon []string
	for _, l := range strings.Split(string(must(os.ReadFile(cephtest.ConfPath(t)))), "\n") {
		if k, v, ok := strings.Cut(l, "="); ok && strings.TrimSpace(k) == "mon host" {
			monHost = strings.TrimSpace(v)
			continue
		}
		noMon = append(noMon, l)
	}
	noMonConf := filepath.Join(t.TempDir(), "ceph.conf")
	if err := os.WriteFile(noMonConf, []byte(strings.Join(noMon, "\n")), 0o644); err != nil || monHost == "" {
		t.Fatalf("no mon host in %s (%v)", cephtest.ConfPath(t), err)
	}
	status([]string{"CEPH_ARGS=--conf " + noMonConf + " --mon_host " + monHost + " " + args})

	if cephtest.DaemonKeyring() != "" { // cephx: the key named is the key used
		empty := filepath.Join(t.TempDir(), "empty.keyring")
		if err := os.WriteFile(empty, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		code, out := runAdmin(t, nil, append([]string{"status", "--conf", cephtest.ConfPath(t), "--id", cephtest.DaemonUser(), "--keyring", empty}, lockPlace...)...)
		if code != 3 || !strings.Contains(out, "connecting as client."+cephtest.DaemonUser()) {
			t.Errorf("status with an empty keyring: exit %d, want 3 (not authenticated)\n%s", code, out)
		}
	}

	// The flags override the environment, as rbd's do.
	if code, out := runAdmin(t, []string{"CEPH_ARGS=--name osd.0"}, "status"); code != 2 || !strings.Contains(out, "CEPH_ARGS: --name \"osd.0\": give a client's name") {
		t.Errorf("CEPH_ARGS with a daemon's name: exit %d, want 2\n%s", code, out)
	}
	status([]string{"CEPH_CONF=/nonexistent/ceph.conf"}, cephFlags(t, "--conf", "--id")...)

	if code, out := runAdmin(t, nil, append(append([]string{"unlock", "--force", "--yes", "--slot", "2"}, cephFlags(t, "--conf", "--id")...), lockPlace...)...); code != 2 ||
		!strings.Contains(out, "--slot 2: the lock "+cephtest.Pool+"/"+lockImage+" has slots 0..1") {
		t.Errorf("unlock of a slot the lock does not have: exit %d, want 2\n%s", code, out)
	}
	code, out := runAdmin(t, nil, append(append([]string{"unlock", "--force", "--force-live", "--yes", "--slot", "1"}, cephFlags(t, "--conf", "--id")...), lockPlace...)...)
	if code != 0 || !strings.Contains(out, "lock of slot 1 broken") {
		t.Fatalf("unlock: exit %d\n%s", code, out)
	}
	code, out = runAdmin(t, nil, append(append([]string{"status", "--json"}, cephFlags(t, "--conf", "--id")...), lockPlace...)...)
	if code != 0 || strings.Contains(out, `"owner"`) {
		t.Errorf("status after unlock: exit %d, want no owner\n%s", code, out)
	}
}

// plan from an admin node: the node and the pools are flags; without a pool it says what to give.
func TestAdminPlanWithoutConfig(t *testing.T) {
	conn := cephtest.Connect(t)
	ioctx := cephtest.IOContext(t, conn)
	p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 4<<20, 22)
	node := cephtest.Name(t, "n")
	cephtest.Clone(t, ioctx, p, node+"-c", node)
	cephtest.Clone(t, ioctx, p, cephtest.Name(t, "theirs"), "someone-else")

	code, out := runAdmin(t, nil, append([]string{"plan", "--json", "--node", node, "--pool", cephtest.Pool}, cephFlags(t, "--conf", "--id")...)...)
	if code != 0 {
		t.Fatalf("plan: exit %d\n%s", code, out)
	}
	var plan struct {
		Node   string `json:"node"`
		Clones []struct {
			Image string `json:"image"`
		} `json:"clones"`
	}
	if err := json.Unmarshal([]byte(out[strings.IndexByte(out, '{'):]), &plan); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if plan.Node != node || len(plan.Clones) != 1 || plan.Clones[0].Image != cephtest.Pool+"/"+node+"-c" {
		t.Errorf("plan for %s: want its one clone:\n%s", node, out)
	}

	code, out = runAdmin(t, nil, append([]string{"plan", "--node", node}, cephFlags(t, "--conf", "--id")...)...)
	if code != 2 || !strings.Contains(out, "no --pool") {
		t.Errorf("plan without a pool or a config: exit %d, want 2\n%s", code, out)
	}
}

// check names the lock pool that is missing (lock.pool defaults to rbd, which OpenStack clusters
// often lack) with the commands that create it; once they ran, check passes.
func TestCheckSaysHowToCreateLockPool(t *testing.T) {
	conn := cephtest.Connect(t)
	cephtest.IOContext(t, conn)
	pool := cephtest.Name(t, "lockpool")
	conf := nodeConfig(t, cephtest.Name(t, "n"), "flattend-lock", "lock: {pool: "+pool+", check_interval: 1s}")
	code, out := runCmd(t, time.Minute, "check", "--config", conf)
	create := "ceph osd pool create " + pool + " 32 && rbd pool init " + pool
	caps := "ceph auth caps client." + cephtest.DaemonUser() + " mon 'profile rbd' osd 'profile rbd pool=" + pool + ", profile rbd pool=" + cephtest.Pool + "'"
	if code != 1 || !strings.Contains(out, "lock: pool \""+pool+"\" (lock.pool) does not exist") ||
		!strings.Contains(out, "\n    "+create+"\n") || !strings.Contains(out, "\n    "+caps+"\n") {
		t.Fatalf("check without the lock pool: exit %d, want 1 and\n%s\n%s\ngot:\n%s", code, create, caps, out)
	}
	// What it says to run works (as an admin; the test key's caps cover every pool already).
	if b, err := exec.Command("sh", "-c", create).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", create, err, b)
	}
	if code, out := runCmd(t, time.Minute, "check", "--config", conf); code != 0 {
		t.Errorf("check after creating the lock pool: exit %d\n%s", code, out)
	}
}
