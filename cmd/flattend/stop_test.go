package main

import (
	"context"
	"errors"
	"testing"
	"time"

	"go.uber.org/zap"
)

// A stop that outlasts the grace exits 1; one that ends in time, or a cancellation with another
// cause, exits nothing.
func TestExitAfterGrace(t *testing.T) {
	other := errors.New("other")
	for _, tc := range []struct {
		name         string
		cause, only  error
		grace        time.Duration
		wantExit     bool
		stopFirstToo bool
	}{
		{name: "outlasted", cause: errSignal, only: errSignal, grace: time.Millisecond, wantExit: true},
		{name: "any cause", cause: other, grace: time.Millisecond, wantExit: true},
		{name: "other cause", cause: other, only: errSignal, grace: time.Millisecond},
		{name: "done in time", cause: errSignal, only: errSignal, grace: time.Hour},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithCancelCause(context.Background())
			exited := make(chan int, 1)
			stop := exitAfterGrace(ctx, tc.only, tc.grace, zap.NewNop(), func(code int) { exited <- code })
			cancel(tc.cause)
			if tc.wantExit {
				if code := <-exited; code != exitFailure {
					t.Errorf("exit %d, want %d", code, exitFailure)
				}
			}
			stop() // returns once the guard's goroutine has ended
			select {
			case code := <-exited:
				t.Errorf("exit(%d) called; want none", code)
			default:
			}
		})
	}
	// Never cancelled: stop ends the guard.
	stop := exitAfterGrace(context.Background(), nil, time.Millisecond, zap.NewNop(), func(int) { t.Error("exit called") })
	stop()
}
