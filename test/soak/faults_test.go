package soak

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"syscall"
	"time"
)

// The fault kinds. A "long" stop or cut outlasts the test cluster's watch timeout (10 s): the
// node's slot can be broken and the node fenced; a short one does not.
const (
	kill9       = "kill9"
	stopShort   = "sigstop_short"
	stopLong    = "sigstop_long"
	cutShort    = "netcut_short"
	cutLong     = "netcut_long"
	osdPause    = "osd_pause"
	injectors   = 2 // faults at once, on different nodes
	watchTimout = 10 * time.Second
)

var faultKinds = []string{kill9, stopShort, stopLong, cutShort, cutLong, osdPause}

// faults counts what was injected, and keeps two faults off one node (and two pauses apart).
type faults struct {
	mu     sync.Mutex
	count  map[string]int
	busy   map[string]bool // a node, or "osd", under a fault
	paused sync.RWMutex    // held for writing while the OSDs are paused: clone making waits
}

func (f *faults) claim(target string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.busy[target] {
		return false
	}
	f.busy[target] = true
	return true
}

func (f *faults) release(target, kind string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.busy, target)
	if kind != "" {
		f.count[kind]++
	}
}

// faultPhase injects faults and tops up clones for duration.
func (s *soak) faultPhase(ctx context.Context, duration time.Duration, rng *rand.Rand) {
	ctx, cancel := context.WithTimeout(ctx, duration)
	defer cancel()
	var wg sync.WaitGroup
	for i := range injectors {
		r := rand.New(rand.NewPCG(rng.Uint64(), uint64(i)))
		wg.Add(1)
		go func() { defer wg.Done(); s.inject(ctx, r) }()
	}
	wg.Add(1)
	go func() { defer wg.Done(); s.refill(ctx) }()
	wg.Wait()
}

// inject runs faults one after the other, a few seconds apart, until ctx ends; each fault is
// undone (SIGCONT, heal, unpause) before inject returns.
func (s *soak) inject(ctx context.Context, rng *rand.Rand) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Duration(2000+rng.IntN(6000)) * time.Millisecond):
		}
		kind := faultKinds[rng.IntN(len(faultKinds))]
		target := "osd"
		var n *node
		if kind != osdPause {
			n = s.nodes[rng.IntN(len(s.nodes))]
			target = n.name
		}
		if !s.faults.claim(target) {
			continue
		}
		if s.fault(kind, n, rng) {
			s.faults.release(target, kind)
		} else {
			s.faults.release(target, "")
		}
	}
}

// fault injects one fault and undoes it; false if it could not be injected (the node was
// being restarted).
func (s *soak) fault(kind string, n *node, rng *rand.Rand) bool {
	short := time.Duration(2000+rng.IntN(5000)) * time.Millisecond             // 2-7 s
	long := watchTimout + time.Duration(2000+rng.IntN(10000))*time.Millisecond // 12-22 s
	hold := map[string]time.Duration{stopShort: short, cutShort: short, stopLong: long, cutLong: long, osdPause: short}[kind]
	what := kind
	if n != nil {
		what += " " + n.name
	}
	if hold > 0 {
		what += fmt.Sprintf(" for %s", hold.Round(100*time.Millisecond))
	}
	s.logf("fault: %s", what)
	switch kind {
	case kill9:
		return n.signal(syscall.SIGKILL)
	case stopShort, stopLong:
		if !n.signal(syscall.SIGSTOP) {
			return false
		}
		time.Sleep(hold)
		if !n.signal(syscall.SIGCONT) {
			s.t.Errorf("%s died while stopped", n.name)
		}
	case cutShort, cutLong:
		s.lab.Cut(n.name)
		time.Sleep(hold)
		s.lab.Heal(n.name)
	case osdPause:
		s.faults.paused.Lock()
		defer s.faults.paused.Unlock()
		s.mon(`{"prefix": "osd pause"}`)
		time.Sleep(hold)
		s.mon(`{"prefix": "osd unpause"}`)
	}
	return true
}

func (s *soak) mon(cmd string) {
	if _, st, err := s.conn.MonCommand([]byte(cmd)); err != nil {
		s.t.Errorf("%s: %v (%s)", cmd, err, st)
	}
}

func (s *soak) logf(format string, args ...any) {
	s.t.Logf("+%s %s", time.Since(s.began).Round(time.Second), fmt.Sprintf(format, args...))
}

// refill gives a node new clones when it has fewer than pendingMin left, so that every node
// always wants a slot.
func (s *soak) refill(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(3 * time.Second):
		}
		s.faults.paused.RLock()
		left, err := s.clones.refresh()
		for _, name := range nodeNames() {
			for i := left[name]; err == nil && i < pendingMin; i++ {
				_, err = s.clones.add(name)
			}
		}
		s.faults.paused.RUnlock()
		if err != nil {
			s.t.Errorf("refill: %v", err)
			return
		}
	}
}
