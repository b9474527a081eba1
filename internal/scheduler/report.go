package scheduler

import (
	"cmp"
	"context"
	"slices"
	"sync"
	"time"

	"github.com/flattend/flattend/internal/discovery"
	"github.com/flattend/flattend/internal/fleet"
	"github.com/flattend/flattend/internal/metrics"
)

// Phase is what the scheduler is doing, in one word (/status's state).
type Phase string

// The phases, in the order a window sees them.
const (
	PhaseStarting         Phase = "starting"           // before the main loop's first step
	PhaseWaitingForWindow Phase = "waiting_for_window" // the window is closed
	PhaseDiscovering      Phase = "discovering"        // a pass asks discovery for this node's clones
	PhaseWaitingForLock   Phase = "waiting_for_lock"   // a clone's turn: gates asked, waiting for a slot
	PhaseVerifying        Phase = "verifying_copyups"  // a slot held, copy-ups verified before the flatten
	PhaseFlattening       Phase = "flattening"         // a slot held, the flatten runs
	PhaseInPass           Phase = "in_pass"            // a clone handled, the next one not started yet
	PhaseIdle             Phase = "idle"               // the window is open, the pass done; the next one later
)

// Report is what /status serves. Its JSON form is documented in docs/operations.md: add fields,
// never rename or remove one.
type Report struct {
	Node   string       `json:"node"`
	State  Phase        `json:"state"`
	Detail string       `json:"detail"` // the systemd status line
	Window WindowReport `json:"window"`
	// Flatten is the running flatten (nil: none runs).
	Flatten *FlattenReport `json:"flatten"`
	// Backlog is what is left to flatten (nil: no discovery yet).
	Backlog *BacklogReport `json:"backlog"`
	// LastPass is the last pass's end (nil: none ended yet).
	LastPass *PassReport `json:"last_pass"`
	// FailingClones are the clones of the last discovery whose last flatten failed, most
	// failures first.
	FailingClones []FailingClone `json:"failing_clones"`
}

// WindowReport is the flatten window now.
type WindowReport struct {
	Open bool `json:"open"`
	// OpensAt is the next opening (after the open window if it is open); nil: never again.
	OpensAt *time.Time `json:"opens_at"`
	// ClosesAt is the end of the open window, or of the next one when closed; nil: never opens.
	ClosesAt *time.Time `json:"closes_at"`
}

// FlattenReport is the running flatten.
type FlattenReport struct {
	Image     string    `json:"image"`
	Lock      string    `json:"lock"`
	StartedAt time.Time `json:"started_at"`
	// Bytes is its parent overlap: what it copies at most.
	Bytes        uint64  `json:"bytes"`
	ObjectsDone  uint64  `json:"objects_done"`
	ObjectsTotal uint64  `json:"objects_total"`
	Progress     float64 `json:"progress_ratio"`
}

// BacklogReport is what is left: the last discovery's clones less those flattened since.
type BacklogReport struct {
	Clones       int       `json:"clones"`
	Bytes        uint64    `json:"bytes"`
	DiscoveredAt time.Time `json:"discovered_at"`
}

// PassReport is how the last pass ended.
type PassReport struct {
	EndedAt time.Time `json:"ended_at"`
	// Result, in the words of `status --nodes` (internal/fleet): ok (every clone it found is
	// flat), partial (clones left: skipped, a gate, a budget), cancelled (the window closed or
	// the daemon stopped, clones left), failed (discovery or a clone's flatten failed).
	Result string `json:"result"`
	// Error is the pass's own error, else the last clone's failure, else why it stopped early.
	Error     string `json:"error,omitempty"`
	Flattened int    `json:"flattened"`
	Failed    int    `json:"failed"`
	Skipped   int    `json:"skipped"`
	Left      int    `json:"left"`
	// LastSuccessAt is when the last pass without a failure ended (nil: none yet).
	LastSuccessAt *time.Time `json:"last_success_at"`
}

// FailingClone is a clone whose flattens failed in a row.
type FailingClone struct {
	Image    string    `json:"image"`
	Failures int       `json:"consecutive_failures"`
	NextTry  time.Time `json:"next_try"`
}

// reportState is what Report reads and the main loop writes.
type reportState struct {
	mu          sync.Mutex
	node        string
	window      WindowReport
	running     *FlattenReport
	backlog     map[string]uint64 // clone → overlap, of the last discovery, less those flat since
	discovered  time.Time
	passStart   time.Time // of the pass that runs (zero: none, or `once --image`), for the fleet summary
	lastPass    *PassReport
	lastSuccess *time.Time
	failing     []FailingClone
}

// Report says what the scheduler is doing now; it is safe to call from any goroutine.
func (s *Scheduler) Report() Report {
	r := Report{State: PhaseStarting, Detail: s.State(), FailingClones: []FailingClone{}}
	if st := s.progress.state.Load(); st != nil {
		r.State = st.phase
	}
	s.rep.mu.Lock()
	defer s.rep.mu.Unlock()
	r.Node, r.Window = s.rep.node, s.rep.window
	if f := s.rep.running; f != nil {
		run := *f
		run.ObjectsDone, run.ObjectsTotal = s.progress.done.Load(), s.progress.total.Load()
		if run.ObjectsTotal > 0 {
			run.Progress = float64(min(run.ObjectsDone, run.ObjectsTotal)) / float64(run.ObjectsTotal)
		}
		r.Flatten = &run
	}
	if s.rep.backlog != nil {
		clones, bytes := backlogSize(s.rep.backlog)
		r.Backlog = &BacklogReport{Clones: clones, Bytes: bytes, DiscoveredAt: s.rep.discovered}
	}
	if p := s.rep.lastPass; p != nil {
		pass := *p
		pass.LastSuccessAt = s.rep.lastSuccess
		r.LastPass = &pass
	}
	r.FailingClones = append(r.FailingClones, s.rep.failing...)
	return r
}

// windowClosed records a closed window of cfg that opens next at next (zero: never).
func (s *Scheduler) windowClosed(cfg Config, next time.Time) {
	wr := WindowReport{OpensAt: timePtr(next)}
	if _, end := cfg.Window.At(next); !next.IsZero() {
		wr.ClosesAt = timePtr(end)
	}
	s.setWindow(cfg.Metrics, wr, next)
}

// windowOpened records an open window of cfg that closes at end. cfg is passed, not read from
// s: a reload calls this outside the main loop.
func (s *Scheduler) windowOpened(cfg Config, end time.Time) {
	next := cfg.Window.NextOpen(end)
	s.setWindow(cfg.Metrics, WindowReport{Open: true, OpensAt: timePtr(next), ClosesAt: timePtr(end)}, next)
}

func (s *Scheduler) setWindow(m *metrics.Metrics, wr WindowReport, next time.Time) {
	s.rep.mu.Lock()
	s.rep.window = wr
	s.rep.mu.Unlock()
	m.NextWindowOpen(next)
}

// setRunning records the flatten that starts (nil: it ended).
func (s *Scheduler) setRunning(f *FlattenReport) {
	s.rep.mu.Lock()
	s.rep.running = f
	s.rep.mu.Unlock()
}

// passStarted records the start of a pass (not `once --image`, which names clones that are not
// the node's backlog).
func (s *Scheduler) passStarted(start time.Time) {
	s.rep.mu.Lock()
	s.rep.passStart = start
	s.rep.mu.Unlock()
}

// discoveredBacklog makes clones the backlog.
func (s *Scheduler) discoveredBacklog(clones []discovery.Clone) {
	b := make(map[string]uint64, len(clones))
	for _, c := range clones {
		b[c.Spec.String()] = c.Overlap
	}
	s.rep.mu.Lock()
	s.rep.backlog, s.rep.discovered = b, time.Now()
	s.rep.mu.Unlock()
	s.cfg.Metrics.Backlog(backlogSize(b))
}

// flatNow takes c off the backlog: flattened, or found flat or gone.
func (s *Scheduler) flatNow(c discovery.Clone) {
	s.rep.mu.Lock()
	delete(s.rep.backlog, c.Spec.String())
	clones, bytes := backlogSize(s.rep.backlog)
	known := s.rep.backlog != nil
	s.rep.mu.Unlock()
	if known {
		s.cfg.Metrics.Backlog(clones, bytes)
	}
	s.noteFailures()
}

// noteFailures records the clones of the backlog that are failing, from the retries. Clones
// that left the backlog (flat, deleted, no longer this node's) are not counted: their failures
// would otherwise alert forever.
func (s *Scheduler) noteFailures() {
	s.rep.mu.Lock()
	var failing []FailingClone
	worst := 0
	for name, r := range s.retries {
		if _, ok := s.rep.backlog[name]; ok && r.failures > 0 {
			failing = append(failing, FailingClone{Image: name, Failures: r.failures, NextTry: r.next})
			worst = max(worst, r.failures)
		}
	}
	slices.SortFunc(failing, func(a, b FailingClone) int {
		return cmp.Or(cmp.Compare(b.Failures, a.Failures), cmp.Compare(a.Image, b.Image))
	})
	s.rep.failing = failing
	s.rep.mu.Unlock()
	s.cfg.Metrics.CloneFailures(len(failing), worst)
}

// passEnded records how a pass ended: sum, or err for a pass that failed as a whole; ctx is the
// pass's. It also writes the fleet summary of the pass.
func (s *Scheduler) passEnded(ctx context.Context, sum Summary, err error) {
	now := time.Now()
	p := &PassReport{EndedAt: now, Flattened: sum.Flattened, Failed: len(sum.Failed), Skipped: len(sum.Skipped), Left: sum.Left}
	p.Error = passError(sum, err)
	if p.Error == "" {
		p.Error = sum.Stopped
	}
	s.rep.mu.Lock()
	switch {
	case err != nil || len(sum.Failed) > 0:
		p.Result = fleet.Failed
	case len(s.rep.backlog) == 0:
		p.Result = fleet.OK
	case ctx.Err() != nil:
		p.Result = fleet.Cancelled
	default:
		p.Result = fleet.Partial
	}
	ok := err == nil && len(sum.Failed) == 0
	s.rep.lastPass = p
	if ok {
		s.rep.lastSuccess = &now
	}
	s.rep.mu.Unlock()
	s.noteFailures()
	s.cfg.Metrics.PassEnded(now, ok)
	s.writeSummary(sum, p)
}

// passError is the pass's own error, else its last clone's failure ("" if none).
func passError(sum Summary, err error) string {
	switch {
	case err != nil:
		return err.Error()
	case len(sum.Failed) > 0:
		return sum.Failed[len(sum.Failed)-1]
	}
	return ""
}

func backlogSize(b map[string]uint64) (clones int, bytes uint64) {
	for _, n := range b {
		bytes += n
	}
	return len(b), bytes
}

func timePtr(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	return &t
}
