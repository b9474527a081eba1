// Package scheduler is the only package that knows the order of things. When the window is open
// (run.go) a pass (pass.go) asks discovery for this node's clones, orders them and applies the
// policy (policy.go); each clone is then one job (job.go): gates → lock → mark and verify → flatten
// under the lease → unlock → cleanup, over two small interfaces (Locker, Flattener) so that its rules
// have fast tests with fakes. outcome.go turns each job's error into one outcome that feeds the
// logs, the pass Summary and the metrics.
package scheduler

import (
	"context"
	"fmt"
	"regexp"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/flattend/flattend/internal/discovery"
	"github.com/flattend/flattend/internal/gate"
	"github.com/flattend/flattend/internal/lock"
	"github.com/flattend/flattend/internal/metrics"
	"github.com/flattend/flattend/internal/window"
)

// Config is what the scheduler needs, already validated.
type Config struct {
	Node           string
	Version        string // this build's, in the fleet summary
	Window         window.Window
	BackoffMin     time.Duration
	BackoffMax     time.Duration
	RescanInterval time.Duration // discovery again, inside an open window, after a pass
	Lock           lock.Options

	Gates gate.Config
	// GateInterval is how often the gates are asked again during a flatten, and how old their
	// answer (asked while waiting for the lock) may be when the lock is granted.
	GateInterval time.Duration
	// MinTimeLeft: no flatten starts with less of the window left.
	MinTimeLeft time.Duration
	// AllowInUse flattens clones another client has open (librbd then proxies the flatten to
	// that client); false skips them.
	AllowInUse bool
	Order      []string // sort keys, see Order
	// MaxPerWindow and MaxBytesPerWindow cap one window's flattens on this node (0: no cap).
	MaxPerWindow      int
	MaxBytesPerWindow uint64
	// MaxBytesPerSecond paces each flatten (0: librbd's own pace).
	MaxBytesPerSecond uint64
	// RetryAfter is how long a failed clone waits before its next try, doubled per failure.
	RetryAfter time.Duration
	// VerifyCopyups looks up every object a clone's object map says exists before its flatten,
	// and copies up the missing ones (flattener.VerifyCopyups): for a librbd without the fix of
	// Ceph tracker 68998.
	VerifyCopyups bool

	// CleanupSnapshots, if set, selects the parent snapshots to remove once their last clone is
	// flat (nil: never remove any).
	CleanupSnapshots *regexp.Regexp

	// Connect makes a session on the cluster: the lock's slots and the clone operations, on one
	// connection.
	Connect Connector
	// Reconnect marks a configuration (given to Reload) whose connection settings changed: the
	// session is made anew, between two flattens.
	Reconnect bool
	// Metrics receives what happens (nil: nothing is recorded).
	Metrics *metrics.Metrics
	// OnProgress, if set, is told the running flatten's progress (for a terminal progress bar).
	OnProgress func(image string, done, total uint64)
}

// Scheduler runs passes over this node's clones. It holds one session at a time, which carries
// both the lock and the flatten I/O; after a loss that session is closed and a new one made.
type Scheduler struct {
	cfg     Config
	sources []discovery.Source
	log     *zap.Logger

	sess *session // nil until the first connect and after a loss
	// draining are discarded sessions whose Close outlasted closeWait: a librbd call still ran.
	draining  []*session
	closeWait time.Duration
	retries   map[string]retry
	budget    budget
	// windowEnd is the open window's end in Unix nanoseconds (0 for `once`: no window); a reload
	// may move it while a pass runs.
	windowEnd atomic.Int64

	progress progress
	live     liveness
	rep      reportState // what /status reads (report.go)

	reloadMu sync.Mutex
	pending  *reload
	reloaded chan struct{} // a Reload arrived
}

// New returns a scheduler whose sessions come from connect (cfg.Connect is used when nil). Call
// Close when done.
func New(cfg Config, connect Connector, sources []discovery.Source, log *zap.Logger) *Scheduler {
	if connect != nil {
		cfg.Connect = connect
	}
	s := &Scheduler{cfg: cfg, sources: sources, log: log.With(zap.String("node", cfg.Node)),
		retries: map[string]retry{}, reloaded: make(chan struct{}, 1), closeWait: 45 * time.Second}
	s.rep.node = cfg.Node
	return s
}

// Connect makes the first session now, so that a daemon with a Ceph problem fails at start
// rather than at the first window.
func (s *Scheduler) Connect() error {
	_, err := s.session()
	return err
}

// session returns the current session, making one if there is none.
func (s *Scheduler) session() (*session, error) {
	if s.sess != nil {
		return s.sess, nil
	}
	locker, fl, err := s.cfg.Connect(s.lockOptions())
	if err != nil {
		return nil, err
	}
	if b, ok := locker.(busyHook); ok {
		b.onBusy(s.live.sleeping)
	}
	s.sess = &session{Locker: locker, Flattener: fl, live: &s.live}
	return s.sess, nil
}

// lockOptions are the lock's options with this node's name.
func (s *Scheduler) lockOptions() lock.Options {
	o := s.cfg.Lock
	o.Node = s.cfg.Node
	return o
}

// discard closes the current session after a loss. It waits for librbd calls still running on
// it (a LockAcquire blocked behind a dead holder returns within the watch timeout); if they
// outlast closeWait, the session is left draining: its connection is shut down when they
// return, and Close waits for that.
func (s *Scheduler) discard() {
	ctx, cancel := context.WithTimeout(context.Background(), s.closeWait)
	defer cancel()
	s.closeSession(ctx)
}

func (s *Scheduler) closeSession(ctx context.Context) {
	if s.sess == nil {
		return
	}
	sess := s.sess
	s.sess = nil
	if err := sess.Close(ctx); err != nil {
		s.log.Warn("connection still busy: it is shut down when its last librbd call returns", zap.Error(err))
		s.draining = append(s.draining, sess)
	}
}

// Close closes the session, and waits until ctx ends for it and for the sessions still draining
// to shut their connections down. What outlasts ctx is left open (the process is about to exit).
func (s *Scheduler) Close(ctx context.Context) {
	s.closeSession(ctx)
	for _, d := range s.draining {
		if err := d.Close(ctx); err != nil {
			s.log.Warn("leaving a connection open", zap.Error(err))
		}
	}
	s.draining = nil
}

// session is the Locker and the Flattener of one connection. Its calls tick live (live.go).
type session struct {
	Locker
	Flattener
	live *liveness
}

// progress is what State and Stalled read about the running flatten.
type progress struct {
	// at is when the running flatten last made progress (Unix ns; 0: none runs).
	at atomic.Int64
	// state says what the scheduler is doing, done/total how far the running flatten got.
	state       atomic.Pointer[stateLine]
	done, total atomic.Uint64
}

// State says in one line what the scheduler is doing now (systemd's STATUS=).
func (s *Scheduler) State() string {
	p := s.progress.state.Load()
	if p == nil {
		return "starting"
	}
	if s.progress.at.Load() != 0 {
		if n := s.progress.total.Load(); n > 0 {
			return fmt.Sprintf("%s: %d%%", p.msg, 100*min(s.progress.done.Load(), n)/n)
		}
	}
	return p.msg
}

// stateLine is the phase (for /status) and the status line.
type stateLine struct {
	phase Phase
	msg   string
}

func (s *Scheduler) setState(phase Phase, format string, args ...any) {
	s.progress.state.Store(&stateLine{phase: phase, msg: fmt.Sprintf(format, args...)})
}
