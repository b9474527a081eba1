package scheduler

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/flattend/flattend/internal/discovery"
	"github.com/flattend/flattend/internal/flattener"
	"github.com/flattend/flattend/internal/rbdimage"
)

// flattenUnder flattens c while lease holds; losing the lease, a closing gate or ctx's end
// cancels the flatten (it resumes later from where the copy stopped).
func (s *Scheduler) flattenUnder(ctx context.Context, sess *session, lease Lease, c discovery.Clone, info rbdimage.Info) error {
	spec := c.Spec
	log := s.log.With(zap.String("image", spec.String()))
	done, total := &s.progress.done, &s.progress.total // State reads them too
	done.Store(0)
	total.Store(1)
	gctx, stopGates := sess.WatchGates(ctx, s.cfg.Gates, spec.Pool, s.cfg.GateInterval, func() uint64 {
		d, n := done.Load(), total.Load()
		return info.Overlap / max(n, 1) * (n - min(d, n))
	})
	defer stopGates()
	fctx, cancel := lease.Context(gctx)
	defer cancel()
	if err := lease.Working(spec.String()); err != nil {
		return err
	}
	log.Info("flatten started", zap.Stringer("parent", info.Parent), zap.Uint64("bytes", info.Overlap), zap.String("lock", lease.Image()))
	start := time.Now()
	s.cfg.Metrics.FlattenStarted()
	s.setState("flattening %s under %s", spec, lease.Image())
	s.progress.at.Store(start.UnixNano())
	defer s.progress.at.Store(0)
	err := sess.Flatten(fctx, spec, s.cfg.MaxBytesPerSecond, s.onProgress(lease, spec, info, log))
	result, reason, err := flattenResult(err, lease, context.Cause(gctx))
	s.cfg.Metrics.FlattenEnded(result, reason, time.Since(start))
	if reason == "gate" {
		result = "aborted by a safety gate"
	}
	log.Info("flatten finished", zap.String("result", result), zap.Uint64("bytes", info.Overlap),
		zap.Duration("duration", time.Since(start)), zap.Error(err))
	return err
}

// onProgress returns the flatten's progress callback: the lease's record, the status line, the
// metrics, a log line per tenth and the terminal's progress bar. It runs on a librbd thread.
func (s *Scheduler) onProgress(lease Lease, spec rbdimage.Spec, info rbdimage.Info, log *zap.Logger) func(objDone, objTotal uint64) {
	var decile atomic.Int64
	done, total := &s.progress.done, &s.progress.total
	return func(objDone, objTotal uint64) {
		s.progress.at.Store(time.Now().UnixNano())
		lease.Progress(objDone, objTotal)
		if s.cfg.OnProgress != nil {
			s.cfg.OnProgress(spec.String(), objDone, objTotal)
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
	}
}

// repairInterrupted repairs a clone whose flatten stopped uncleanly: one this process lost, or
// the one a previous holder of this slot was flattening when it was killed, cut off or fenced
// (its record is still on the lock image). The copy-up that was in flight may have left the
// clone's object map saying "exists" for an object that was never written, which a resumed
// flatten would skip and lose (see flattener.RepairCopyups). It runs under the lock, like a
// flatten. An error means c itself could not be repaired and must not be flattened now.
func (s *Scheduler) repairInterrupted(sess *session, lease Lease, c discovery.Clone) error {
	name := c.Spec.String()
	var specs []string
	if r := lease.Interrupted(); r != nil && r.Clone != "" {
		s.log.Warn("previous holder stopped without releasing", zap.String("lock", lease.Image()),
			zap.String("holder", r.Node), zap.Int("pid", r.PID), zap.String("clone", r.Clone))
		specs = append(specs, r.Clone)
	}
	if (s.unclean[name] || s.checkFirst[name]) && !slices.Contains(specs, name) {
		specs = append(specs, name)
	}
	var cErr error
	for _, spec := range specs {
		repaired, err := s.repairOne(sess, spec)
		switch {
		case err == nil, errors.Is(err, rbdimage.ErrNotFound):
			s.log.Info("interrupted flatten repaired: lost copy-ups redone before the resume", zap.String("image", spec),
				zap.Uint64s("objects_copied_up", repaired))
			delete(s.unclean, spec)
			delete(s.checkFirst, spec)
		default:
			s.log.Error("repairing an interrupted flatten failed", zap.String("image", spec), zap.Error(err))
			if spec == name {
				cErr = fmt.Errorf("not resuming an interrupted flatten before it is repaired: %w", err)
			}
		}
	}
	return cErr
}

// repairOne repairs one clone and marks it interrupted, which keeps cleanup from removing its
// parent snapshot whichever node flattens it later.
func (s *Scheduler) repairOne(sess *session, name string) ([]uint64, error) {
	spec, err := rbdimage.Parse(name)
	if err != nil {
		return nil, err
	}
	repaired, err := sess.Repair(spec)
	if err == nil && (!s.checkFirst[name] || len(repaired) > 0 || s.unclean[name]) {
		err = sess.MarkInterrupted(spec, fmt.Sprintf("%s repaired by %s", time.Now().UTC().Format(time.RFC3339), s.cfg.Node))
	}
	return repaired, err
}

// cleanupParent removes c's parent snapshot when the configuration asks for it and no clone
// needs it any more. It never removes the parent of a clone whose flatten was interrupted: that
// clone must be checked first (docs/operations.md, "Known issues"). Failures are only logged.
func (s *Scheduler) cleanupParent(sess *session, c discovery.Clone) {
	snap := c.Parent
	if s.cfg.CleanupSnapshots == nil || snap.Snap == "" || !s.cfg.CleanupSnapshots.MatchString(snap.Snap) {
		return
	}
	log := s.log.With(zap.String("image", c.Spec.String()), zap.Stringer("snapshot", snap))
	if note, err := sess.Interrupted(c.Spec); err != nil || note != "" {
		log.Warn("parent snapshot kept: this clone's flatten was interrupted; check the clone, then remove the snapshot by hand",
			zap.String(flattener.InterruptedKey, note), zap.Error(err))
		return
	}
	removed, why, err := sess.RemoveSnapshotIfUnused(snap)
	switch {
	case err != nil:
		log.Error("removing the parent snapshot failed", zap.Error(err))
	case removed:
		log.Info("parent snapshot removed: its last clone is flat")
	default:
		log.Info("parent snapshot kept", zap.String("reason", why))
	}
}
