package scheduler

import (
	"context"
	"errors"

	"github.com/flattend/flattend/internal/flattener"
	"github.com/flattend/flattend/internal/gate"
	"github.com/flattend/flattend/internal/lock"
)

// kind is what a job's end means for the pass.
type kind int

const (
	flat    kind = iota // flattened, or found flat or gone
	skipped             // left for a later pass: in use, or no room in its pool
	stopped             // no further flatten in this pass: a gate closed, too late in the window
	left                // not finished because the pass itself ends (window, signal)
	failed              // the clone's own failure: retried after flatten.retry_after
)

// outcome is one job's end, classified once: the pass summary, the logs and the metric labels
// all come from it.
type outcome struct {
	kind kind
	err  error
	gate string // the closed gate, if one closed
	// logMsg is the log line for it (empty: none beyond the job's own).
	logMsg string
}

// classify says what err, a job's result, means. ctx is the pass's context.
func classify(ctx context.Context, err error) outcome {
	var closed *gate.Closed
	switch {
	case err == nil:
		return outcome{kind: flat}
	case errors.As(err, &closed) && closed.Gate == "space":
		// Only this clone's pool is short of room: smaller clones or other pools may fit.
		return outcome{kind: skipped, err: err, gate: closed.Gate, logMsg: "safety gate closed, clone left for later"}
	case errors.As(err, &closed):
		return outcome{kind: stopped, err: err, gate: closed.Gate, logMsg: "safety gate closed, pass stopped"}
	case errors.Is(err, errTooLate):
		return outcome{kind: stopped, err: err}
	case errors.Is(err, ErrInUse):
		return outcome{kind: skipped, err: err, logMsg: "clone in use, skipped (flatten.in_use: skip)"}
	case ctx.Err() != nil:
		return outcome{kind: left, err: err}
	}
	return outcome{kind: failed, err: err, logMsg: "flatten failed"}
}

// flattenResult gives the metric labels (result, reason) of a flatten that ran and ended with
// err; lease and gates say whether the lock was lost or a gate closed meanwhile.
func flattenResult(err error, lease Lease, gateCause error) (result, reason string, cause error) {
	switch {
	case err == nil:
		return "flat", "done", nil
	case lease.Err() != nil:
		return "cancelled", "lock_lost", lease.Err() // the lease's loss is the story
	case lost(err):
		// Fenced before the lease noticed: the blocklisted flatten fails, it is not the clone's fault.
		return "cancelled", "lock_lost", err
	case !errors.Is(err, flattener.ErrCancelled):
		return "failed", "error", err
	case errors.Is(gateCause, gate.ErrClosed):
		return "cancelled", "gate", gateCause
	case errors.Is(err, ErrWindowClosed):
		return "cancelled", "window", err
	}
	return "cancelled", "stopped", err
}

// lost reports whether a job's errors mean its session is dead.
func lost(errs ...error) bool {
	for _, err := range errs {
		if lock.IsLoss(err) {
			return true
		}
	}
	return false
}
