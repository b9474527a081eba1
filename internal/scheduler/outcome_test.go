package scheduler

import (
	"errors"
	"fmt"
	"syscall"
	"testing"

	"github.com/flattend/flattend/internal/flattener"
	"github.com/flattend/flattend/internal/gate"
)

// The labels of flattend_flattens_ended_total: a flatten that fails because its client was
// blocklisted (another node broke the lock before this node's lease check noticed) is a lock
// loss, not the clone's error; the e2e TestLockLossCounted saw it counted as failed/error.
func TestFlattenResultLabels(t *testing.T) {
	live := &fakeLease{done: make(chan struct{})}
	gone := &fakeLease{done: make(chan struct{})}
	gone.lose()
	cancelled := fmt.Errorf("p/c: %w", flattener.ErrCancelled)
	for _, c := range []struct {
		name           string
		err            error
		lease          *fakeLease
		gate           error
		result, reason string
	}{
		{"flat", nil, live, nil, "flat", "done"},
		{"clone's error", errors.New("p/c: flatten: input/output error"), live, nil, "failed", "error"},
		{"blocklisted before the lease noticed", fmt.Errorf("p/c: flatten: %w", syscall.ESHUTDOWN), live, nil, "cancelled", "lock_lost"},
		{"lease lost", cancelled, gone, nil, "cancelled", "lock_lost"},
		{"lease lost, flatten failed", errors.New("p/c: flatten: timed out"), gone, nil, "cancelled", "lock_lost"},
		{"gate", cancelled, live, &gate.Closed{Gate: "space"}, "cancelled", "gate"},
		{"window", fmt.Errorf("%w: %w", cancelled, ErrWindowClosed), live, nil, "cancelled", "window"},
		{"signal or timeout", cancelled, live, nil, "cancelled", "stopped"},
	} {
		result, reason, _ := flattenResult(c.err, c.lease, c.gate)
		if result != c.result || reason != c.reason {
			t.Errorf("%s: %s/%s, want %s/%s", c.name, result, reason, c.result, c.reason)
		}
	}
}
