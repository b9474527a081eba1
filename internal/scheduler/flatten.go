package scheduler

import (
	"context"
	"errors"
	"fmt"
	"os"
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
	gctx, stopGates := sess.WatchGates(ctx, s.cfg.Gates, dataPool(c, info), s.cfg.GateInterval, func() uint64 {
		d, n := done.Load(), total.Load()
		return info.Overlap / max(n, 1) * (n - min(d, n))
	})
	defer stopGates()
	fctx, cancel := lease.Context(gctx)
	defer cancel()
	if err := lease.Working(spec.String()); err != nil {
		return err
	}
	if err := s.markAndVerify(fctx, sess, spec, log); err != nil {
		return err
	}
	log.Info("flatten started", zap.Stringer("parent", info.Parent), zap.Uint64("bytes", info.Overlap), zap.String("lock", lease.Image()))
	start := time.Now()
	s.cfg.Metrics.FlattenStarted()
	s.setState(PhaseFlattening, "flattening %s under %s", spec, lease.Image())
	s.progress.at.Store(start.UnixNano())
	defer s.progress.at.Store(0)
	s.setRunning(&FlattenReport{Image: spec.String(), Lock: lease.Image(), StartedAt: start, Bytes: info.Overlap})
	defer s.setRunning(nil)
	err := sess.Flatten(fctx, spec, s.cfg.MaxBytesPerSecond, s.onProgress(lease, spec, info, log))
	result, reason, err := flattenResult(err, lease, context.Cause(gctx))
	s.cfg.Metrics.FlattenEnded(result, reason, time.Since(start))
	if reason == "gate" {
		result = "aborted by a safety gate"
	}
	log.Info("flatten finished", zap.String("result", result), zap.Uint64("bytes", info.Overlap),
		zap.Duration("duration", time.Since(start)), zap.Error(err))
	if err == nil {
		if cerr := sess.ClearFlattening(spec); cerr != nil {
			log.Warn("clearing the flattening mark failed: its parent snapshot is kept", zap.Error(cerr))
		}
	}
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

// markAndVerify marks spec as being flattened, then, where librbd needs it, verifies its
// copy-ups. A clone that cannot be marked or verified is not flattened now.
func (s *Scheduler) markAndVerify(ctx context.Context, sess *session, spec rbdimage.Spec, log *zap.Logger) error {
	note := fmt.Sprintf("%s pid %d since %s", s.cfg.Node, os.Getpid(), time.Now().UTC().Format(time.RFC3339))
	prev, err := sess.MarkFlattening(spec, note)
	if err != nil {
		return err
	}
	if prev != "" {
		log.Warn("resuming an interrupted flatten", zap.String("mark", prev))
	}
	if !s.cfg.VerifyCopyups {
		return nil
	}
	start := time.Now()
	s.setState(PhaseVerifying, "verifying the copy-ups of %s", spec)
	v, err := sess.VerifyCopyups(ctx, spec)
	s.cfg.Metrics.CopyupsVerified(v.Checked, len(v.CopiedUp))
	if err != nil {
		return fmt.Errorf("not flattened before its copy-ups are verified: %w", err)
	}
	fields := []zap.Field{zap.Int("objects_checked", v.Checked), zap.Uint64s("objects_missing", v.Missing),
		zap.Uint64s("objects_copied_up", v.CopiedUp), zap.Duration("took", time.Since(start))}
	if len(v.Missing) > 0 {
		log.Warn("lost copy-ups found and redone before the flatten", fields...)
	} else {
		log.Info("copy-ups verified", fields...)
	}
	return nil
}

// markForOwner marks the clone a previous holder of this slot was flattening when it lost the
// slot, unless that flatten marked it itself. It is not repaired here: it may belong to another
// node, may be in use, and its owner verifies it before its flatten resumes anyway.
func (s *Scheduler) markForOwner(sess *session, lease Lease, c discovery.Clone) {
	r := lease.Interrupted()
	if r == nil || r.Clone == "" {
		return
	}
	s.log.Warn("previous holder stopped without releasing", zap.String("lock", lease.Image()),
		zap.String("holder", r.Node), zap.Int("pid", r.PID), zap.String("clone", r.Clone))
	spec, err := rbdimage.Parse(r.Clone)
	if err == nil && spec != c.Spec {
		note := fmt.Sprintf("%s pid %d lost its slot (seen by %s at %s)", r.Node, r.PID, s.cfg.Node, time.Now().UTC().Format(time.RFC3339))
		err = sess.MarkInterrupted(spec, note)
	}
	if err != nil && !errors.Is(err, rbdimage.ErrNotFound) {
		s.log.Warn("marking the interrupted clone failed", zap.String("clone", r.Clone), zap.Error(err))
	}
}

// cleanupParent removes c's parent snapshot when the configuration asks for it and no clone
// needs it any more. It never removes it while c still carries the flattening mark (clearing it
// failed after the flatten, or the flatten was not flattend's). Failures are only logged.
func (s *Scheduler) cleanupParent(sess *session, c discovery.Clone) {
	snap := c.Parent
	if s.cfg.CleanupSnapshots == nil || snap.Snap == "" || !s.cfg.CleanupSnapshots.MatchString(snap.Snap) {
		return
	}
	log := s.log.With(zap.String("image", c.Spec.String()), zap.Stringer("snapshot", snap))
	if note, err := sess.Interrupted(c.Spec); err != nil || note != "" {
		log.Warn("parent snapshot kept: the clone still carries the flattening mark; check the clone, then remove the snapshot by hand",
			zap.String(flattener.FlatteningKey, note), zap.Error(err))
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
