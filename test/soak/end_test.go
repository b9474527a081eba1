package soak

import (
	"context"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ceph/go-ceph/rados"

	"github.com/flattend/flattend/test/cephtest"
	"github.com/flattend/flattend/test/netlab"
	"github.com/flattend/flattend/test/observer"
)

const (
	drainBound = 10 * time.Minute // for the clones left when the faults end
	stopBound  = 35 * time.Second // the documented 30 s stop grace, and some
)

type soak struct {
	t       *testing.T
	lab     *netlab.Lab
	conn    *rados.Conn
	ioctx   *rados.IOContext
	parents []cephtest.Parent
	clones  *cloneSet
	obs     *observer.Observer
	nodes   []*node
	faults  faults
	logDir  string
	began   time.Time
}

// report is the soak's outcome, in the test log and as JSON in FLATTEND_SOAK_RESULTS.
type report struct {
	DurationS       float64            `json:"duration_s"`
	FaultPhaseS     float64            `json:"fault_phase_s"`
	DrainS          float64            `json:"drain_s"`
	Nodes           int                `json:"nodes"`
	Slots           int                `json:"slots"`
	Clones          int                `json:"clones"`
	Faults          map[string]int     `json:"faults"`
	FaultsTotal     int                `json:"faults_total"`
	Restarts        map[string]int     `json:"restarts"`
	UnexpectedExits []string           `json:"unexpected_exits"`
	StopS           map[string]float64 `json:"stop_after_sigterm_s"`
	Observer        observer.Stats     `json:"observer"`
	Passed          bool               `json:"passed"`
}

// endPhase heals everything (the faults are undone already), lets the nodes finish, stops them
// with SIGTERM, and checks and reports the outcome.
func (s *soak) endPhase(obsDone <-chan struct{}, stopObserver context.CancelFunc) {
	t := s.t
	rep := report{Nodes: nodeCount, Slots: slots, Faults: s.faults.count, Restarts: map[string]int{}, StopS: map[string]float64{}}
	rep.FaultPhaseS = time.Since(s.began).Seconds()
	s.logf("faults over: %v; waiting for the %d clones to be flat", s.faults.count, s.clones.count())
	drained := time.Now()
	s.drain()
	rep.DrainS = time.Since(drained).Seconds()
	s.stopNodes(&rep)
	stopObserver()
	<-obsDone
	for _, c := range s.clones.list() {
		cephtest.AssertFlatAndIntact(t, s.ioctx, c.parent, c.name)
	}
	rep.Clones = s.clones.count()
	for _, n := range rep.Faults {
		rep.FaultsTotal += n
	}
	rep.Observer = s.obs.Stats()
	if rep.Observer.FailedRounds > 0 { // its calls wait out a pause: nothing should fail
		t.Errorf("the observer failed %d rounds: %q", rep.Observer.FailedRounds, rep.Observer.Errors)
	}
	if rep.Observer.MaxConcurrent == 0 {
		t.Errorf("the observer saw no flatten at all: it is broken")
	}
	rep.DurationS = time.Since(s.began).Seconds()
	rep.Passed = !t.Failed()
	t.Logf("soak report: %d faults %v, restarts %v, %d handovers, max %d flattens at once (%s), %d clones flat and intact, drain %.0f s, stops %v, observer %d rounds (%d torn, %d failed %q, longest gap %.1f s)",
		rep.FaultsTotal, rep.Faults, rep.Restarts, rep.Observer.Handovers, rep.Observer.MaxConcurrent, rep.Observer.MaxAt,
		rep.Clones, rep.DrainS, rep.StopS, rep.Observer.Rounds, rep.Observer.TornRounds, rep.Observer.FailedRounds, rep.Observer.Errors, rep.Observer.LongestGapS)
	writeJSON(t, rep)
}

// drain waits until every clone is flat, failing after drainBound.
func (s *soak) drain() {
	deadline := time.Now().Add(drainBound)
	for {
		left, err := s.clones.refresh()
		if err == nil && len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			s.t.Errorf("clones still not flat %s after the faults ended: %v (err %v)", drainBound, left, err)
			return
		}
		time.Sleep(2 * time.Second)
	}
}

// stopNodes sends SIGTERM to every node at once: each must exit 0 within stopBound and leave
// nothing running in its namespace.
func (s *soak) stopNodes(rep *report) {
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, n := range s.nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			took, status, err := n.stop(stopBound)
			mu.Lock()
			defer mu.Unlock()
			rep.StopS[n.name] = took.Round(10 * time.Millisecond).Seconds()
			rep.Restarts[n.name] = n.restarts()
			rep.UnexpectedExits = append(rep.UnexpectedExits, n.unexpected...)
			if err != nil {
				s.t.Error(err)
			} else if status != "exit status 0" {
				s.t.Errorf("%s ended with %s after SIGTERM, want exit status 0", n.name, status)
			}
		}()
	}
	wg.Wait()
	sort.Strings(rep.UnexpectedExits)
	for _, n := range s.nodes {
		if pids := s.lab.Pids(n.name); len(pids) > 0 {
			s.t.Errorf("processes left in %s's namespace after its stop: %s", n.name, strings.Join(pids, " "))
		}
	}
}
