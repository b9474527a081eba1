package scheduler

import (
	"context"
	"time"

	"go.uber.org/zap"

	"github.com/flattend/flattend/internal/discovery"
	"github.com/flattend/flattend/internal/fleet"
)

// The fleet summary (internal/fleet): this node's pass, backlog and next window, written beside
// the lock after each flatten and at the end of each pass, for `flattend status --nodes`.

// summaryWriter is the optional part of a Flattener that stores the fleet summary (the Ceph
// one does; test fakes need not).
type summaryWriter interface {
	WriteSummary(e fleet.Entry) error
}

// backlog is what a pass has left to flatten: its clones, less those flattened so far.
type backlog struct {
	start  time.Time
	clones int
	bytes  uint64
}

func newBacklog(start time.Time, clones []discovery.Clone) *backlog {
	b := &backlog{start: start, clones: len(clones)}
	for _, c := range clones {
		b.bytes += c.Overlap
	}
	return b
}

// reportFlatten updates the backlog with one clone's outcome and, if a flatten ran, writes the
// summary of the pass so far.
func (s *Scheduler) reportFlatten(ctx context.Context, b *backlog, sum Summary, c discovery.Clone, o outcome) {
	if b == nil {
		return
	}
	if o.kind == flat {
		b.clones--
		b.bytes -= min(b.bytes, c.Overlap)
	}
	if o.kind == flat || o.kind == failed {
		s.writeSummary(s.summaryEntry(ctx, b, sum, nil, true))
	}
}

// report writes the summary of a pass that ended (err: it failed before its clones).
func (s *Scheduler) report(ctx context.Context, b *backlog, sum Summary, err error) {
	if b != nil {
		s.writeSummary(s.summaryEntry(ctx, b, sum, err, false))
	}
}

func (s *Scheduler) summaryEntry(ctx context.Context, b *backlog, sum Summary, err error, running bool) fleet.Entry {
	now := time.Now()
	e := fleet.Entry{Version: s.cfg.Version, PassStarted: b.start.UTC(), Discovered: sum.Discovered,
		Flattened: sum.Flattened, Failed: len(sum.Failed), ClonesLeft: max(b.clones, 0), BytesLeft: b.bytes,
		Written: now.UTC()}
	switch {
	case err != nil:
		e.LastError = err.Error()
	case len(sum.Failed) > 0:
		e.LastError = sum.Failed[len(sum.Failed)-1]
	}
	if !running {
		e.PassEnded = now.UTC()
	}
	switch {
	case running:
		e.Result = fleet.Running
	case e.LastError != "":
		e.Result = fleet.Failed
	case b.clones <= 0:
		e.Result = fleet.OK
	case ctx.Err() != nil:
		e.Result = fleet.Cancelled
	default:
		e.Result = fleet.Partial
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
	return e
}

// writeSummary stores e on the current session's connection. A failure is logged: it never
// fails the pass.
func (s *Scheduler) writeSummary(e fleet.Entry) {
	if s.sess == nil {
		return // the session was lost: the next report goes on the next one
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
