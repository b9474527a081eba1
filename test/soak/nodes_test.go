package soak

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"
)

// node is one hypervisor: flattend run in the node's namespace, restarted as systemd would
// (Restart=on-failure) after a short delay when it dies.
type node struct {
	s          *soak
	name, conf string
	rng        *rand.Rand
	mu         sync.Mutex
	cmd        *exec.Cmd
	done       chan struct{} // closes when cmd exits
	starts     int
	expectKill bool // the soak killed it: not an unexpected exit
	stopping   bool
	unexpected []string
	stopped    chan struct{} // closes when the supervisor returns
}

func (s *soak) startNodes(rng *rand.Rand) {
	for _, name := range nodeNames() {
		n := &node{s: s, name: name, conf: s.nodeConfig(name), rng: rand.New(rand.NewPCG(rng.Uint64(), 0)), stopped: make(chan struct{})}
		s.nodes = append(s.nodes, n)
		if err := n.start(); err != nil {
			s.t.Fatal(err)
		}
		go n.supervise()
	}
}

func (s *soak) nodeConfig(name string) string {
	body := fmt.Sprintf(`node: %s
ceph: {conf: %s, user: admin, connect_timeout: 20s}
lock: {pool: flattend-test, image: %s, slots: %d, check_interval: 1s}
window: {schedule: "* * * * *", duration: 1h}
backoff: {min: 200ms, max: 2s}
flatten: {concurrent_ops: 1, max_bytes_per_second: %dMiB}
discovery: {pools: [{pool: flattend-test}], interval: 2s}
metrics: {listen: ""}
log: {level: debug, format: json}
`, name, os.Getenv("FLATTEND_TEST_CEPH_CONF"), lockImage, nodeSlots(s.t), paceMiB)
	p := filepath.Join(s.logDir, name+".yaml")
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		s.t.Fatal(err)
	}
	return p
}

// nodeSlots is the nodes' lock.slots: slots, or FLATTEND_SOAK_NODE_SLOTS to check the observer
// itself (with 3 the soak must fail: the observer still allows 2).
func nodeSlots(t *testing.T) int {
	n := slots
	if v := os.Getenv("FLATTEND_SOAK_NODE_SLOTS"); v != "" {
		if _, err := fmt.Sscan(v, &n); err != nil {
			t.Fatalf("FLATTEND_SOAK_NODE_SLOTS=%q: %v", v, err)
		}
	}
	return n
}

// start starts a new process of the node, its log in the soak's log directory.
func (n *node) start() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.startLocked()
}

func (n *node) startLocked() error {
	n.starts++
	logf, err := os.Create(filepath.Join(n.s.logDir, fmt.Sprintf("%s.%02d.log", n.name, n.starts)))
	if err != nil {
		return err
	}
	cmd := n.s.lab.In(n.name, nil, binary, "run", "--config", n.conf)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		return err
	}
	done := make(chan struct{})
	n.cmd, n.done = cmd, done
	go func() { _ = cmd.Wait(); logf.Close(); close(done) }()
	return nil
}

// supervise restarts the node each time it dies, until stop.
func (n *node) supervise() {
	defer close(n.stopped)
	for {
		n.mu.Lock()
		done := n.done
		n.mu.Unlock()
		<-done
		n.mu.Lock()
		if n.stopping {
			n.mu.Unlock()
			return
		}
		if !n.expectKill {
			n.unexpected = append(n.unexpected, fmt.Sprintf("%s process %d exited by itself: %s", n.name, n.starts, n.cmd.ProcessState))
			n.s.t.Errorf("%s exited by itself: %s (log %s.%02d.log)", n.name, n.cmd.ProcessState, n.name, n.starts)
		}
		n.expectKill = false
		n.mu.Unlock()
		time.Sleep(time.Duration(1000+n.rng.IntN(2000)) * time.Millisecond)
		n.mu.Lock()
		err := error(nil)
		if !n.stopping {
			err = n.startLocked()
		}
		stopping := n.stopping
		n.mu.Unlock()
		if err != nil {
			n.s.t.Errorf("restarting %s: %v", n.name, err)
		}
		if err != nil || stopping {
			return
		}
	}
}

// signal sends sig to the running process; false if none runs (it is being restarted).
func (n *node) signal(sig syscall.Signal) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	select {
	case <-n.done:
		return false
	default:
	}
	if sig == syscall.SIGKILL {
		n.expectKill = true
	}
	return n.cmd.Process.Signal(sig) == nil
}

// restarts is how many times the node was started again.
func (n *node) restarts() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.starts - 1
}

// stop sends SIGTERM and waits for the exit, at most bound; it returns how long that took and
// the exit status.
func (n *node) stop(bound time.Duration) (time.Duration, string, error) {
	n.mu.Lock()
	n.stopping = true
	cmd, done := n.cmd, n.done
	n.mu.Unlock()
	t0 := time.Now()
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return 0, "", err
	}
	select {
	case <-done:
	case <-time.After(bound):
		_ = cmd.Process.Kill()
		<-done
		return time.Since(t0), "", fmt.Errorf("%s still running %s after SIGTERM (killed)", n.name, bound)
	}
	<-n.stopped
	return time.Since(t0), cmd.ProcessState.String(), nil
}
