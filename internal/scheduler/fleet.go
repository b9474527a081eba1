package scheduler

import (
	"time"

	"go.uber.org/zap"

	"github.com/flattend/flattend/internal/fleet"
)

// The fleet summary (internal/fleet): this node's pass, backlog and next window, written beside
// the lock after each flatten and at the end of each pass, for `flattend status --nodes`. The
// backlog and the pass's result are /status's (report.go): one account of both.

// summaryWriter is the optional part of a Flattener that stores the fleet summary (the Ceph
// one does; test fakes need not).
type summaryWriter interface {
	WriteSummary(e fleet.Entry) error
}

// writeSummary stores the summary of the pass that runs (p nil: after one of its flattens) or
// ended (p), on the current session's connection. Nothing is written outside a pass (`once
// --image` names clones that are not the node's backlog). A failure is logged: it never fails
// the pass.
func (s *Scheduler) writeSummary(sum Summary, p *PassReport) {
	e, ok := s.summaryEntry(sum, p)
	if !ok || s.sess == nil { // no session: it was lost, the next report goes on the next one
		return
	}
	w, ok := s.sess.Flattener.(summaryWriter)
	if !ok {
		return
	}
	defer s.live.tick() // a call into Ceph returned (bounded by ceph.op_timeout)
	if err := w.WriteSummary(e); err != nil {
		s.log.Warn("writing this node's fleet summary failed: flattend status --nodes shows an older one",
			zap.Error(err))
	}
}

// summaryEntry is the fleet summary of the pass that runs (p nil) or ended (p); false outside a
// pass. The end of a pass clears the pass.
func (s *Scheduler) summaryEntry(sum Summary, p *PassReport) (fleet.Entry, bool) {
	now := time.Now()
	s.rep.mu.Lock()
	start := s.rep.passStart
	clones, bytes := backlogSize(s.rep.backlog)
	if p != nil {
		s.rep.passStart = time.Time{}
	}
	s.rep.mu.Unlock()
	if start.IsZero() {
		return fleet.Entry{}, false
	}
	e := fleet.Entry{Version: s.cfg.Version, PassStarted: start.UTC(), Discovered: sum.Discovered,
		Flattened: sum.Flattened, Failed: len(sum.Failed), ClonesLeft: clones, BytesLeft: bytes,
		Result: fleet.Running, Written: now.UTC()}
	if p != nil {
		e.Result, e.PassEnded = p.Result, p.EndedAt.UTC()
	}
	switch {
	case p == nil:
		e.LastError = passError(sum, nil)
	case p.Result == fleet.Failed:
		e.LastError = p.Error
	}
	if next := s.cfg.Window.NextOpen(now); !next.IsZero() {
		e.NextWindow = next.UTC()
		if after := s.cfg.Window.NextOpen(next); !after.IsZero() {
			e.PeriodSec = int64(after.Sub(next).Seconds())
		}
		if open, end := s.cfg.Window.At(next); open {
			e.WindowSec = int64(end.Sub(next).Seconds())
		}
	}
	return e, true
}
