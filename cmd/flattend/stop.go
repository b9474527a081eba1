package main

import (
	"context"
	"errors"
	"time"

	"go.uber.org/zap"
)

// stopGrace is how long flattend waits, once told to stop (SIGTERM, SIGINT, the end of `once
// --timeout`), for the work in hand to end before it exits anyway. On a cluster that answers, a
// stop takes a second or two: librbd finishes the copy-ups in flight and the lock is released.
// With the OSDs paused or the link cut, librbd calls block until ceph.op_timeout and a cgo call
// cannot be interrupted; so after the grace the process exits without releasing its lock, which
// then frees like a killed holder's: when this client's watch times out. The unit's
// TimeoutStopSec leaves room for it (deploy/systemd/flattend.service).
const stopGrace = 30 * time.Second

// exitAfterGrace calls exit(exitFailure) if the process is still running grace after ctx ends
// with a cause that wraps only (any cause if only is nil). Call the returned function when the
// work is done: it stops the wait (the owner of its goroutine is the command).
func exitAfterGrace(ctx context.Context, only error, grace time.Duration, log *zap.Logger, exit func(int)) (stop func()) {
	stopped, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		select {
		case <-ctx.Done():
		case <-stopped:
			return
		}
		if only != nil && !errors.Is(context.Cause(ctx), only) {
			return
		}
		t := time.NewTimer(grace)
		defer t.Stop()
		select {
		case <-t.C:
		case <-stopped:
			return
		}
		log.Error("Ceph calls did not end within the stop grace: exiting without releasing the lock; the slot frees when this client's watch times out",
			zap.Duration("grace", grace), zap.NamedError("cause", context.Cause(ctx)))
		_ = log.Sync()
		exit(exitFailure)
	}()
	return func() { close(stopped); <-done }
}
