// Package scheduler is the only package that knows the order of things: when the window is open
// it asks discovery for this node's clones and walks them one at a time: take the cluster-wide
// lock (backing off while it is busy), flatten under it, release, next.
package scheduler

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ceph/go-ceph/rados"
	"go.uber.org/zap"

	"github.com/flattend/flattend/internal/backoff"
	"github.com/flattend/flattend/internal/cephconn"
	"github.com/flattend/flattend/internal/discovery"
	"github.com/flattend/flattend/internal/flattener"
	"github.com/flattend/flattend/internal/gate"
	"github.com/flattend/flattend/internal/lock"
	"github.com/flattend/flattend/internal/metrics"
	"github.com/flattend/flattend/internal/window"
)

// ErrWindowClosed is the cause of cancellation when the night window ends.
var ErrWindowClosed = errors.New("the flatten window closed")

// errTooLate stops a pass when the window has too little time left for a flatten to be worth
// its start.
var errTooLate = errors.New("too little of the window left to start a flatten")

// errInUse skips a clone another client has open, under flatten.in_use: skip.
var errInUse = errors.New("in use by another client")

// Config is what the scheduler needs, already validated.
type Config struct {
	Node           string
	Window         window.Window
	BackoffMin     time.Duration
	BackoffMax     time.Duration
	RescanInterval time.Duration // discovery again, inside an open window, after a pass
	Lock           lock.Options

	Gates        gate.Config
	GateInterval time.Duration // how often the gates are asked again during a flatten
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

	// CleanupSnapshots, if set, selects the parent snapshots to remove once their last clone is
	// flat (nil: never remove any).
	CleanupSnapshots *regexp.Regexp

	// Reconnect marks a configuration (given to Reload) whose connection settings changed: the
	// connection is made anew, between two flattens.
	Reconnect bool
	// Metrics receives what happens (nil: nothing is recorded).
	Metrics *metrics.Metrics
	// OnProgress, if set, is told the running flatten's progress (for a terminal progress bar).
	OnProgress func(image string, done, total uint64)
}

// maxRetryAfter caps the doubling of Config.RetryAfter.
const maxRetryAfter = 24 * time.Hour

// retry remembers a clone that failed, so it waits instead of failing every pass.
type retry struct {
	failures int
	next     time.Time
}

// budget is what one window has used so far on this node.
type budget struct {
	clones  int
	bytes   uint64
	stopped bool // logged that a cap was reached
}

// Dialer makes a fresh RADOS connection.
type Dialer func() (*rados.Conn, error)

// Scheduler runs passes over this node's clones. It owns one RADOS connection at a time, which
// carries both the lock and the flatten I/O; after a lock loss that connection is thrown away.
type Scheduler struct {
	cfg     Config
	dial    Dialer
	sources []discovery.Source
	log     *zap.Logger

	conn  *rados.Conn
	mutex *lock.Mutex
	// unclean lists clones whose flatten this process lost mid-way: their object map must be
	// rebuilt before they are resumed.
	unclean map[string]bool
	// checkFirst lists clones to check for lost copy-ups before their flatten although nothing
	// says they were interrupted (`once --image`: an operator resuming a flatten that may have
	// been killed outside flattend, e.g. an `rbd flatten`).
	checkFirst map[string]bool
	retries    map[string]retry
	budget     budget
	// windowEnd is the open window's end in Unix nanoseconds (0 for `once`: no window); a reload
	// may move it while a pass runs.
	windowEnd atomic.Int64
	// progressAt is when the running flatten last made progress (Unix ns; 0: none runs).
	progressAt atomic.Int64
	// state says what the scheduler is doing, and flatDone/flatTotal how far the running flatten
	// got, for State.
	state               atomic.Pointer[string]
	flatDone, flatTotal atomic.Uint64

	reloadMu sync.Mutex
	pending  *reload
	reloaded chan struct{} // a Reload arrived
}

type reload struct {
	cfg     Config
	sources []discovery.Source
}

// New returns a scheduler. Call Close when done.
func New(cfg Config, dial Dialer, sources []discovery.Source, log *zap.Logger) *Scheduler {
	return &Scheduler{cfg: cfg, dial: dial, sources: sources, log: log.With(zap.String("node", cfg.Node)),
		unclean: map[string]bool{}, checkFirst: map[string]bool{}, retries: map[string]retry{}, reloaded: make(chan struct{}, 1)}
}

// Summary counts what a pass did.
type Summary struct {
	Discovered int      `json:"discovered"`
	Flattened  int      `json:"flattened"`
	Failed     []string `json:"failed"`  // "pool/image: error"
	Skipped    []string `json:"skipped"` // "pool/image: reason" (in use, waiting to retry, over budget)
	Left       int      `json:"left"`    // not reached or cancelled
	// Stopped says why the pass ended early: a closed safety gate, the window's end near, a
	// budget reached. Empty when it went through every clone.
	Stopped string `json:"stopped,omitempty"`
	// GateClosed is set when the pass stopped on a closed gate: worth another try soon.
	GateClosed bool `json:"-"`
}

// State says in one line what the scheduler is doing now (systemd's STATUS=).
func (s *Scheduler) State() string {
	p := s.state.Load()
	if p == nil {
		return "starting"
	}
	if s.progressAt.Load() != 0 {
		if n := s.flatTotal.Load(); n > 0 {
			return fmt.Sprintf("%s: %d%%", *p, 100*min(s.flatDone.Load(), n)/n)
		}
	}
	return *p
}

func (s *Scheduler) setState(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	s.state.Store(&msg)
}

// Done reports whether every discovered clone is flat now.
func (s Summary) Done() bool { return len(s.Failed) == 0 && len(s.Skipped) == 0 && s.Left == 0 }

// Run works in every window until ctx ends; a daemon started inside a window works in what is
// left of it. It returns nil when ctx ends.
func (s *Scheduler) Run(ctx context.Context) error {
	for {
		s.applyReload()
		now := time.Now()
		open, end := s.cfg.Window.At(now)
		if !open {
			s.cfg.Metrics.WindowOpen(false)
			next := s.cfg.Window.NextOpen(now)
			if next.IsZero() {
				return fmt.Errorf("the window schedule never opens again")
			}
			s.log.Info("window closed", zap.Time("next_open", next))
			s.setState("window closed; opens %s", next.Format(time.RFC3339))
			t := time.NewTimer(time.Until(next))
			select {
			case <-t.C:
			case <-s.reloaded: // the schedule may have changed
			case <-ctx.Done():
				t.Stop()
				return nil
			}
			t.Stop()
			continue
		}
		s.log.Info("window open", zap.Time("until", end))
		s.cfg.Metrics.WindowOpen(true)
		s.budget = budget{}
		s.windowEnd.Store(end.UnixNano())
		wctx, cancel := context.WithCancelCause(ctx)
		closer := time.AfterFunc(time.Until(end), func() { cancel(ErrWindowClosed) })
		watched := make(chan struct{})
		go func() { // owned by this window: ends with it
			defer close(watched)
			s.followWindowReloads(wctx, closer, cancel)
		}()
		s.workWindow(wctx)
		closer.Stop()
		cancel(nil)
		<-watched
		s.windowEnd.Store(0)
		s.cfg.Metrics.WindowOpen(false)
		if ctx.Err() != nil {
			return nil
		}
		s.log.Info("window ended")
	}
}

// followWindowReloads moves the open window's end when a reload changes the schedule, so that a
// new config does not interrupt a flatten it still allows (and closes the window at once if it
// does not).
func (s *Scheduler) followWindowReloads(ctx context.Context, closer *time.Timer, closeWindow context.CancelCauseFunc) {
	var seen *reload
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.reloaded:
		}
		s.reloadMu.Lock()
		p := s.pending
		s.reloadMu.Unlock()
		if p == nil || p == seen {
			continue // applied already, or this one was followed before
		}
		seen = p
		open, end := p.cfg.Window.At(time.Now())
		if !open {
			closeWindow(ErrWindowClosed)
			return
		}
		s.windowEnd.Store(end.UnixNano())
		closer.Reset(time.Until(end))
		s.log.Info("window end moved by the new configuration", zap.Time("until", end))
	}
}

// Reload hands the scheduler a new configuration. It takes effect between two flattens: a held
// lock is not dropped for it, and a running flatten goes on (unless the new window is closed).
func (s *Scheduler) Reload(cfg Config, sources []discovery.Source) {
	s.reloadMu.Lock()
	s.pending = &reload{cfg: cfg, sources: sources}
	s.reloadMu.Unlock()
	select {
	case s.reloaded <- struct{}{}:
	default:
	}
}

// applyReload installs a pending configuration; call it only where no lease is held.
func (s *Scheduler) applyReload() {
	s.reloadMu.Lock()
	p := s.pending
	s.pending = nil
	s.reloadMu.Unlock()
	if p == nil {
		return
	}
	old := s.cfg
	s.cfg, s.sources = p.cfg, p.sources
	if p.cfg.Reconnect || old.Lock != p.cfg.Lock || old.Node != p.cfg.Node {
		s.log.Info("configuration reloaded: reconnecting for the new connection or lock settings")
		s.discard()
		return
	}
	s.log.Info("configuration reloaded")
}

func (s *Scheduler) workWindow(ctx context.Context) {
	retry := backoff.Backoff{Min: s.cfg.BackoffMin, Max: s.cfg.BackoffMax}
	for {
		sum, err := s.Pass(ctx)
		if ctx.Err() != nil {
			return
		}
		wait := s.cfg.RescanInterval
		switch {
		case err != nil:
			s.log.Error("pass failed", zap.Error(err))
			wait = min(wait, retry.Next())
		case sum.GateClosed:
			wait = min(wait, retry.Next())
			s.log.Info("pass stopped", zap.String("reason", sum.Stopped), zap.Duration("next_pass_in", wait))
		default:
			retry.Reset()
			s.log.Info("pass done", zap.Int("discovered", sum.Discovered), zap.Int("flattened", sum.Flattened),
				zap.Int("failed", len(sum.Failed)), zap.Duration("next_pass_in", wait))
		}
		next := time.Now().Add(wait).Format(time.RFC3339)
		switch {
		case err != nil:
			s.setState("pass failed: %v; next pass %s", err, next)
		case sum.Stopped != "":
			s.setState("pass stopped: %s; next pass %s", sum.Stopped, next)
		default:
			s.setState("pass done: %d flattened, %d failed, %d skipped, %d left; next pass %s",
				sum.Flattened, len(sum.Failed), len(sum.Skipped), sum.Left, next)
		}
		if sleep(ctx, wait) != nil {
			return
		}
	}
}

// Pass discovers this node's clones now and flattens them one at a time until all are done or
// ctx ends. A clone that fails is logged and counted; the pass goes on with the others.
func (s *Scheduler) Pass(ctx context.Context) (Summary, error) {
	var sum Summary
	conn, _, err := s.session()
	if err != nil {
		return sum, err
	}
	start := time.Now()
	s.setState("discovering clones")
	clones, err := discovery.Discover(ctx, conn, s.sources)
	s.cfg.Metrics.Discovered(len(clones), time.Since(start), err)
	if err != nil {
		return sum, err
	}
	sum.Discovered = len(clones)
	s.log.Info("discovered clones", zap.Int("count", len(clones)), zap.Duration("took", time.Since(start)))
	Order(clones, s.cfg.Order)
	return s.work(ctx, clones, sum), nil
}

// Flatten flattens the given clones (in this order) like a pass does, for `once --image`. Each is
// first checked for copy-ups lost by an earlier flatten that was killed (see RepairCopyups).
func (s *Scheduler) Flatten(ctx context.Context, clones []discovery.Clone) Summary {
	for _, c := range clones {
		s.checkFirst[c.String()] = true
	}
	return s.work(ctx, clones, Summary{Discovered: len(clones)})
}

func (s *Scheduler) work(ctx context.Context, clones []discovery.Clone, sum Summary) Summary {
	defer func() {
		s.cfg.Metrics.Pass(sum.Flattened, len(sum.Failed), len(sum.Skipped), sum.Left)
	}()
	for i, c := range clones {
		s.applyReload() // between two flattens: no lease is held
		if ctx.Err() != nil {
			sum.Left += len(clones) - i
			break
		}
		if reason := s.stopReason(); reason != "" {
			sum.Left += len(clones) - i
			sum.Stopped = reason
			break
		}
		if skip := s.skipReason(c); skip != "" {
			sum.Skipped = append(sum.Skipped, c.String()+": "+skip)
			continue
		}
		s.setState("clone %d of %d, %s: waiting for a slot", i+1, len(clones), c.String())
		err := s.flattenOne(ctx, c)
		var closed *gate.Closed
		switch {
		case err == nil:
			sum.Flattened++
			s.budget.clones++
			s.budget.bytes += c.Overlap
			delete(s.retries, c.String())
		case errors.As(err, &closed) && closed.Gate == "space":
			s.cfg.Metrics.GateClosed(closed.Gate)
			// Only this clone's pool is short of room: smaller clones or other pools may fit.
			s.log.Warn("safety gate closed, clone left for later", zap.String("image", c.String()), zap.Error(err))
			sum.Skipped = append(sum.Skipped, c.String()+": "+err.Error())
		case errors.As(err, &closed):
			s.cfg.Metrics.GateClosed(closed.Gate)
			s.log.Warn("safety gate closed, pass stopped", zap.String("image", c.String()), zap.Error(err))
			sum.Left += len(clones) - i
			sum.Stopped, sum.GateClosed = err.Error(), true
		case errors.Is(err, errTooLate):
			sum.Left += len(clones) - i
			sum.Stopped = err.Error()
		case errors.Is(err, errInUse):
			s.log.Info("clone in use, skipped (flatten.in_use: skip)", zap.String("image", c.String()), zap.Error(err))
			sum.Skipped = append(sum.Skipped, c.String()+": "+err.Error())
		case ctx.Err() != nil:
			sum.Left++
		default:
			r := s.retries[c.String()]
			r.failures++
			wait := s.retryAfter(r.failures)
			r.next = time.Now().Add(wait)
			s.retries[c.String()] = r
			s.log.Error("flatten failed", zap.String("image", c.String()), zap.Int("failures", r.failures),
				zap.Duration("retry_in", wait), zap.Error(err))
			sum.Failed = append(sum.Failed, c.String()+": "+err.Error())
		}
		if sum.Stopped != "" {
			break
		}
		s.setState("clone %d of %d handled: %d flattened, %d failed, %d skipped", i+1, len(clones),
			sum.Flattened, len(sum.Failed), len(sum.Skipped))
	}
	if s.mutex != nil {
		s.mutex.StopWaiting() // grants to a node with nothing left to do would be wasted
	}
	return sum
}

// stopReason says why no further flatten may start in this window: a cap reached, or too little
// of the window left (a flatten cancelled moments after its start would cost a lock round and
// a connection for little copying; it resumes next window anyway). Empty means go on.
func (s *Scheduler) stopReason() string {
	var reason string
	switch {
	case s.cfg.MaxPerWindow > 0 && s.budget.clones >= s.cfg.MaxPerWindow:
		reason = fmt.Sprintf("flatten.max_per_window (%d) reached", s.cfg.MaxPerWindow)
	case s.cfg.MaxBytesPerWindow > 0 && s.budget.bytes >= s.cfg.MaxBytesPerWindow:
		reason = fmt.Sprintf("flatten.max_bytes_per_window (%s) reached", gate.Bytes(s.cfg.MaxBytesPerWindow))
	case s.tooLate():
		reason = fmt.Sprintf("%s: %s left, flatten.min_time_left is %s", errTooLate,
			time.Until(time.Unix(0, s.windowEnd.Load())).Round(time.Second), s.cfg.MinTimeLeft)
	}
	if reason != "" && !s.budget.stopped {
		s.budget.stopped = true
		s.log.Info("no more flattens in this window", zap.String("reason", reason))
	}
	return reason
}

// retryAfter is the wait after a clone's nth consecutive failure: RetryAfter, doubled per
// further failure, at most a day.
func (s *Scheduler) retryAfter(failures int) time.Duration {
	return min(s.cfg.RetryAfter<<min(failures-1, 16), maxRetryAfter)
}

func (s *Scheduler) tooLate() bool {
	end := s.windowEnd.Load()
	return end != 0 && time.Until(time.Unix(0, end)) < s.cfg.MinTimeLeft
}

// skipReason says why c is not tried in this pass: it failed recently, or it alone would take
// the window over its byte budget. Empty means try it.
func (s *Scheduler) skipReason(c discovery.Clone) string {
	if r, ok := s.retries[c.String()]; ok && time.Now().Before(r.next) {
		return fmt.Sprintf("failed %d time(s), next try after %s", r.failures, r.next.Format(time.RFC3339))
	}
	if max := s.cfg.MaxBytesPerWindow; max > 0 && s.budget.bytes+c.Overlap > max {
		return fmt.Sprintf("%s to copy would exceed flatten.max_bytes_per_window (%s used of %s)",
			gate.Bytes(c.Overlap), gate.Bytes(s.budget.bytes), gate.Bytes(max))
	}
	return ""
}

// flattenOne takes the lock (backing off while it is busy), flattens c under it and releases it.
func (s *Scheduler) flattenOne(ctx context.Context, c discovery.Clone) error {
	bo := backoff.Backoff{Min: s.cfg.BackoffMin, Max: s.cfg.BackoffMax}
	waitStart := time.Now()
	checked := false
	for {
		conn, mutex, err := s.session()
		if err != nil {
			return err
		}
		if !checked {
			// No point queueing for the lock behind a closed gate.
			if err := gate.Check(conn, s.cfg.Gates, c.Pool, c.Overlap); err != nil {
				return err
			}
			checked = true
		}
		if mutex.HandedOver(ctx) {
			// Our last release went to a node that was waiting: wait our turn like everyone.
			mutex.Wait()
			d := bo.Next()
			s.log.Debug("slot handed over, waiting our turn", zap.String("image", c.String()), zap.Duration("wait", d))
			if err := waitForRelease(ctx, mutex.Wake(), d); err != nil {
				return err
			}
		}
		lease, err := mutex.TryLock(ctx)
		switch {
		case errors.Is(err, lock.ErrLocked):
			d := bo.Next()
			s.log.Debug("lock busy, backing off", zap.String("lock", mutex.Name()), zap.String("image", c.String()), zap.Duration("wait", d))
			if err := waitForRelease(ctx, mutex.Wake(), d); err != nil {
				return err
			}
			continue
		case errors.Is(err, lock.ErrLost):
			s.log.Warn("connection fenced, reconnecting", zap.Error(err))
			s.discard()
			if err := sleep(ctx, bo.Next()); err != nil {
				return err
			}
			continue
		case err != nil:
			return err
		}
		s.log.Debug("lock acquired", zap.String("lock", lease.Image()), zap.String("image", c.String()), zap.Duration("waited", time.Since(waitStart)))
		s.cfg.Metrics.LockAcquired(time.Since(waitStart))

		ferr := s.repairInterrupted(conn, lease, c)
		if ferr == nil {
			ferr = s.flattenUnder(ctx, conn, lease, c)
		}
		uerr := lease.Unlock()
		s.log.Debug("lock released", zap.String("lock", lease.Image()), zap.NamedError("unlock_error", uerr))
		lost := errors.Is(uerr, lock.ErrLost) || errors.Is(ferr, lock.ErrLost) || cephconn.IsBlocklisted(ferr)
		s.cfg.Metrics.LockReleased(lost)
		if lost || uerr != nil {
			// The lock was lost or the connection fenced: never reuse it.
			s.log.Warn("lock lost, reconnecting", zap.NamedError("lease", uerr), zap.NamedError("flatten", ferr))
			s.discard()
		}
		switch {
		case ferr == nil:
			// Even if the loss shows only now: librbd detaches the parent only after every object
			// is copied, and a fenced client cannot finish, so a finished flatten is complete.
			if !lost {
				s.cleanupParent(conn, c)
			}
			return nil
		case ctx.Err() == nil && lost:
			s.unclean[c.String()] = true
			// Losing the lock is not the clone's fault: take it again (on a new connection) and
			// resume where the copy stopped.
			if err := sleep(ctx, bo.Next()); err != nil {
				return err
			}
			continue
		}
		return ferr
	}
}

// cleanupParent removes c's parent snapshot when the configuration asks for it and no clone
// needs it any more. It never removes the parent of a clone whose flatten was interrupted: that
// clone must be checked first (docs/operations.md, "Known issues"). Failures are only logged.
func (s *Scheduler) cleanupParent(conn *rados.Conn, c discovery.Clone) {
	if s.cfg.CleanupSnapshots == nil || c.Parent.Image == "" {
		return
	}
	snap, err := flattener.ParseSnapshot(c.Parent.String())
	if err != nil || !s.cfg.CleanupSnapshots.MatchString(snap.Snap) {
		return
	}
	log := s.log.With(zap.String("image", c.String()), zap.String("snapshot", c.Parent.String()))
	t := flattener.Target{Pool: c.Pool, Namespace: c.Namespace, Image: c.Image}
	if note, err := flattener.Interrupted(conn, t); err != nil || note != "" {
		log.Warn("parent snapshot kept: this clone's flatten was interrupted; check the clone, then remove the snapshot by hand",
			zap.String(flattener.InterruptedKey, note), zap.Error(err))
		return
	}
	removed, why, err := flattener.RemoveIfUnused(conn, snap)
	switch {
	case err != nil:
		log.Error("removing the parent snapshot failed", zap.Error(err))
	case removed:
		log.Info("parent snapshot removed: its last clone is flat")
	default:
		log.Info("parent snapshot kept", zap.String("reason", why))
	}
}

// repairInterrupted repairs a clone whose flatten stopped uncleanly: one this process lost, or
// the one a previous holder of this slot was flattening when it was killed, cut off or fenced
// (its record is still on the lock image). The copy-up that was in flight may have left the
// clone's object map saying "exists" for an object that was never written, which a resumed
// flatten would skip and lose (see flattener.RepairCopyups). It runs under the lock, like a
// flatten. An error means c itself could not be repaired and must not be flattened now.
func (s *Scheduler) repairInterrupted(conn *rados.Conn, lease *lock.Lease, c discovery.Clone) error {
	var specs []string
	if r := lease.Interrupted(); r != nil && r.Clone != "" {
		s.log.Warn("previous holder stopped without releasing", zap.String("lock", lease.Image()),
			zap.String("holder", r.Node), zap.Int("pid", r.PID), zap.String("clone", r.Clone))
		specs = append(specs, r.Clone)
	}
	if (s.unclean[c.String()] || s.checkFirst[c.String()]) && !slices.Contains(specs, c.String()) {
		specs = append(specs, c.String())
	}
	var cErr error
	for _, spec := range specs {
		t, err := flattener.ParseTarget(spec)
		var repaired []uint64
		if err == nil {
			repaired, err = flattener.RepairCopyups(conn, t)
		}
		if err == nil && (!s.checkFirst[spec] || len(repaired) > 0 || s.unclean[spec]) {
			// Keeps cleanup from removing its parent snapshot, whichever node flattens it later.
			err = flattener.MarkInterrupted(conn, t, fmt.Sprintf("%s repaired by %s", time.Now().UTC().Format(time.RFC3339), s.cfg.Node))
		}
		switch {
		case err == nil, errors.Is(err, flattener.ErrNotFound):
			s.log.Info("interrupted flatten repaired: lost copy-ups redone before the resume", zap.String("image", spec),
				zap.Uint64s("objects_copied_up", repaired))
			delete(s.unclean, spec)
			delete(s.checkFirst, spec)
		default:
			s.log.Error("repairing an interrupted flatten failed", zap.String("image", spec), zap.Error(err))
			if spec == c.String() {
				cErr = fmt.Errorf("not resuming an interrupted flatten before it is repaired: %w", err)
			}
		}
	}
	return cErr
}

// flattenUnder flattens c while lease holds; losing the lease cancels the flatten.
func (s *Scheduler) flattenUnder(ctx context.Context, conn *rados.Conn, lease *lock.Lease, c discovery.Clone) error {
	t := flattener.Target{Pool: c.Pool, Namespace: c.Namespace, Image: c.Image}
	log := s.log.With(zap.String("image", t.String()))
	info, err := flattener.Inspect(conn, t)
	switch {
	case errors.Is(err, flattener.ErrNotFound):
		log.Info("image gone since discovery, skipped")
		return nil
	case err != nil:
		return err
	case info.Parent == "":
		log.Info("already flat")
		return nil
	}
	if s.tooLate() {
		return errTooLate // the wait for the lock took the window's rest
	}
	users, err := flattener.Users(conn, t)
	switch {
	case err != nil:
		return err
	case len(users) > 0 && !s.cfg.AllowInUse:
		return fmt.Errorf("%w: %s", errInUse, strings.Join(users, ", "))
	case len(users) > 0:
		log.Warn("clone in use: librbd may hand the flatten to that client, beyond our throttle and cancel (flatten.in_use: allow)",
			zap.Strings("users", users))
	}
	if err := gate.Check(conn, s.cfg.Gates, t.Pool, info.Overlap); err != nil {
		return err
	}

	done, total := &s.flatDone, &s.flatTotal // State reads them too
	done.Store(0)
	total.Store(1)
	gctx, stopGates := gate.Watch(ctx, conn, s.cfg.Gates, t.Pool, s.cfg.GateInterval, func() uint64 {
		d, n := done.Load(), total.Load()
		return info.Overlap / max(n, 1) * (n - min(d, n))
	})
	defer stopGates()
	fctx, cancel := lease.Context(gctx)
	defer cancel()
	if err := lease.Working(t.String()); err != nil {
		return err
	}
	log.Info("flatten started", zap.String("parent", info.Parent), zap.Uint64("bytes", info.Overlap), zap.String("lock", lease.Image()))
	start := time.Now()
	s.cfg.Metrics.FlattenStarted()
	s.setState("flattening %s under %s", t, lease.Image())
	s.progressAt.Store(start.UnixNano())
	defer s.progressAt.Store(0)
	var decile atomic.Int64
	err = flattener.FlattenPaced(fctx, conn, t, s.cfg.MaxBytesPerSecond, func(objDone, objTotal uint64) {
		s.progressAt.Store(time.Now().UnixNano())
		lease.Progress(objDone, objTotal)
		if s.cfg.OnProgress != nil {
			s.cfg.OnProgress(t.String(), objDone, objTotal)
		}
		if objTotal == 0 {
			return
		}
		if prev := done.Swap(objDone); objDone > prev {
			s.cfg.Metrics.Progress(float64(objDone)/float64(objTotal), info.Overlap/objTotal*(objDone-prev))
		}
		total.Store(objTotal)
		d := int64(objDone * 10 / objTotal)
		if old := decile.Load(); d > old && d < 10 && decile.CompareAndSwap(old, d) {
			log.Info("flatten progress", zap.Int64("percent", d*10), zap.Uint64("objects_done", objDone), zap.Uint64("objects", objTotal))
		}
	})
	result, reason := "flat", "done"
	switch {
	case err == nil:
	case errors.Is(err, flattener.ErrCancelled):
		result, reason = "cancelled", "stopped"
		if lerr := lease.Err(); lerr != nil {
			err, reason = lerr, "lock_lost" // the lease's loss is the story
		} else if gerr := context.Cause(gctx); errors.Is(gerr, gate.ErrClosed) {
			result, reason, err = "aborted by a safety gate", "gate", gerr
		} else if errors.Is(err, ErrWindowClosed) {
			reason = "window"
		}
	default:
		result, reason = "failed", "error"
	}
	s.cfg.Metrics.FlattenEnded(resultLabel(result), reason, time.Since(start))
	log.Info("flatten finished", zap.String("result", result), zap.Uint64("bytes", info.Overlap),
		zap.Duration("duration", time.Since(start)), zap.Error(err))
	return err
}

func resultLabel(result string) string {
	if result == "aborted by a safety gate" {
		return "cancelled"
	}
	return result
}

// Stalled reports how long the running flatten has gone without progress (0 when none runs or
// it moved recently): a librbd call that hangs (say, on a full cluster) shows here.
func (s *Scheduler) Stalled() time.Duration {
	at := s.progressAt.Load()
	if at == 0 {
		return 0
	}
	return time.Since(time.Unix(0, at))
}

// session returns the current connection and mutex, dialling and preparing the lock image first
// if there is none.
func (s *Scheduler) session() (*rados.Conn, *lock.Mutex, error) {
	if s.conn != nil {
		return s.conn, s.mutex, nil
	}
	conn, err := s.dial()
	if err != nil {
		return nil, nil, err
	}
	o := s.cfg.Lock
	o.Node = s.cfg.Node
	m := lock.New(conn, o)
	if err := m.Ensure(); err != nil {
		conn.Shutdown()
		return nil, nil, err
	}
	s.conn, s.mutex = conn, m
	return conn, m, nil
}

// discard drops the current connection after a loss. It is shut down once no librbd call runs on
// it (a LockAcquire blocked behind a dead holder returns within the watch timeout).
func (s *Scheduler) discard() {
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	defer cancel()
	s.Close(ctx)
}

// Close shuts the connection down, waiting until ctx ends for librbd calls still running on it;
// if they do not finish it is left open (the process is about to exit anyway).
func (s *Scheduler) Close(ctx context.Context) {
	if s.conn == nil {
		return
	}
	conn, m := s.conn, s.mutex
	s.conn, s.mutex = nil, nil
	if err := m.Close(ctx); err != nil {
		s.log.Warn("leaving a connection open", zap.Error(err))
		return
	}
	conn.Shutdown()
}

// waitForRelease waits d, or less when a holder grants this node a slot on wake (nil: never).
func waitForRelease(ctx context.Context, wake <-chan struct{}, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-wake:
		return nil
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}

func sleep(ctx context.Context, d time.Duration) error { return waitForRelease(ctx, nil, d) }

// Connect dials and prepares the lock image now, so that a daemon with a Ceph problem fails at
// start rather than at the first window.
func (s *Scheduler) Connect() error {
	_, _, err := s.session()
	return err
}
