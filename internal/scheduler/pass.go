package scheduler

import (
	"context"
	"fmt"
	"time"

	"go.uber.org/zap"

	"github.com/flattend/flattend/internal/discovery"
)

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

// Done reports whether every discovered clone is flat now.
func (s Summary) Done() bool { return len(s.Failed) == 0 && len(s.Skipped) == 0 && s.Left == 0 }

// describe says in a few words how the pass ended, for the status line.
func (s Summary) describe(err error) string {
	switch {
	case err != nil:
		return fmt.Sprintf("pass failed: %v", err)
	case s.Stopped != "":
		return "pass stopped: " + s.Stopped
	}
	return fmt.Sprintf("pass done: %d flattened, %d failed, %d skipped, %d left", s.Flattened, len(s.Failed), len(s.Skipped), s.Left)
}

// Pass discovers this node's clones now and flattens them one at a time until all are done or
// ctx ends. A clone that fails is logged and counted; the pass goes on with the others.
func (s *Scheduler) Pass(ctx context.Context) (sum Summary, err error) {
	defer func() { s.passEnded(ctx, sum, err) }()
	sess, err := s.session()
	if err != nil {
		return Summary{}, err
	}
	start := time.Now()
	s.passStarted(start)
	s.setState(PhaseDiscovering, "discovering clones")
	clones, err := sess.Discover(ctx, s.sources)
	s.cfg.Metrics.Discovered(len(clones), time.Since(start), err)
	if err != nil {
		return Summary{}, err
	}
	s.discoveredBacklog(clones)
	s.log.Info("discovered clones", zap.Int("count", len(clones)), zap.Duration("took", time.Since(start)))
	Order(clones, s.cfg.Order)
	return s.work(ctx, clones), nil
}

// FlattenNamed flattens the clones an operator named (in this order) like a pass does, for
// `once --image`.
func (s *Scheduler) FlattenNamed(ctx context.Context, clones []discovery.Clone) Summary {
	return s.work(ctx, clones)
}

// work runs the job of each clone in turn, and tallies the outcomes.
func (s *Scheduler) work(ctx context.Context, clones []discovery.Clone) Summary {
	sum := Summary{Discovered: len(clones)}
	defer func() { s.cfg.Metrics.Pass(sum.Flattened, len(sum.Failed), len(sum.Skipped), sum.Left) }()
	for i, c := range clones {
		s.applyReload() // between two flattens: no lease is held
		name := c.Spec.String()
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
			sum.Skipped = append(sum.Skipped, name+": "+skip)
			continue
		}
		s.setState(PhaseWaitingForLock, "clone %d of %d, %s: waiting for a slot", i+1, len(clones), name)
		o := classify(ctx, s.flattenClone(ctx, c))
		s.tally(&sum, c, o)
		if o.kind == flat || o.kind == failed {
			s.writeSummary(sum, nil) // a flatten ran: the fleet sees the pass so far
		}
		if sum.Stopped != "" {
			sum.Left += len(clones) - i - 1
			break
		}
		s.setState(PhaseInPass, "clone %d of %d handled: %d flattened, %d failed, %d skipped", i+1, len(clones),
			sum.Flattened, len(sum.Failed), len(sum.Skipped))
	}
	if s.sess != nil {
		s.sess.StopWaiting() // grants to a node with nothing left to do would be wasted
	}
	return sum
}

// tally records one clone's outcome in sum, the budget, the retries, the log and the metrics.
func (s *Scheduler) tally(sum *Summary, c discovery.Clone, o outcome) {
	name := c.Spec.String()
	log := s.log.With(zap.String("image", name))
	if o.gate != "" {
		s.cfg.Metrics.GateClosed(o.gate)
	}
	switch o.kind {
	case flat:
		sum.Flattened++
		s.budget.clones++
		s.budget.bytes += c.Overlap
		delete(s.retries, name)
		s.flatNow(c)
	case skipped:
		sum.Skipped = append(sum.Skipped, name+": "+o.err.Error())
	case stopped:
		sum.Left++
		sum.Stopped, sum.GateClosed = o.err.Error(), o.gate != ""
	case left:
		sum.Left++
	case failed:
		r, wait := s.failed(name)
		log = log.With(zap.Int("failures", r.failures), zap.Duration("retry_in", wait))
		sum.Failed = append(sum.Failed, name+": "+o.err.Error())
		s.noteFailures()
	}
	switch {
	case o.logMsg == "":
	case o.kind == failed:
		log.Error(o.logMsg, zap.Error(o.err))
	case o.gate != "":
		log.Warn(o.logMsg, zap.Error(o.err))
	default:
		log.Info(o.logMsg, zap.Error(o.err))
	}
}
