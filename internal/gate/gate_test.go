package gate_test

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flattend/flattend/internal/gate"
	"github.com/flattend/flattend/test/cephtest"
)

// The space gate compares what a pool can still take (MAX AVAIL, or its byte quota) with the
// bytes a flatten will copy times the safety factor. A quota on a pool of its own closes it
// without touching the rest of the shared test cluster.
func TestSpaceGateAndQuota(t *testing.T) {
	admin := cephtest.Connect(t)
	conn := cephtest.DaemonConnect(t) // the gates run with flattend's own caps
	pool := cephtest.Name(t, "pool")
	cephtest.EnsurePool(t, admin, pool)
	cfg := gate.Config{Health: true, Recovery: true, SpaceFactor: 2}
	if err := gate.Check(conn, cfg, pool, 64<<20); err != nil {
		t.Fatalf("healthy cluster, 64 MiB to copy: %v", err)
	}
	cephtest.MonCommand(t, admin, map[string]any{"prefix": "osd pool set-quota", "pool": pool, "field": "max_bytes", "val": "100000000"})
	// "Empty": rbd pool init wrote a few bytes (rbd_info), which the quota room counts once the
	// pool's stats catch up.
	avail, err := gate.Avail(conn, pool)
	if err != nil || avail > 100000000 || avail < 100000000-4096 {
		t.Fatalf("Avail with a 100 MB quota on a new pool = %d, %v; want just under 100000000", avail, err)
	}
	if err := gate.Check(conn, cfg, pool, 40<<20); err != nil {
		t.Errorf("40 MiB × 2 under a 100 MB quota: %v", err)
	}
	err = gate.Check(conn, cfg, pool, 64<<20)
	var closed *gate.Closed
	if !errors.As(err, &closed) || closed.Gate != "space" || !strings.Contains(err.Error(), "needs 64.0 MiB × 2") {
		t.Errorf("64 MiB × 2 over a 100 MB quota: got %v, want the space gate closed", err)
	}
	if _, err := gate.Avail(conn, "no-such-pool"); err == nil || !strings.Contains(err.Error(), "does it exist") {
		t.Errorf("missing pool: %v", err)
	}

	// Watch cancels its context, with the refusal as cause, once need grows past the quota.
	var need atomic.Uint64
	need.Store(1 << 20)
	ctx, stop := gate.Watch(context.Background(), conn, cfg, pool, 50*time.Millisecond, need.Load)
	defer stop()
	select {
	case <-ctx.Done():
		t.Fatalf("closed while open: %v", context.Cause(ctx))
	case <-time.After(300 * time.Millisecond):
	}
	need.Store(1 << 30)
	select {
	case <-ctx.Done():
		if !errors.Is(context.Cause(ctx), gate.ErrClosed) {
			t.Errorf("cause = %v, want a closed gate", context.Cause(ctx))
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Watch did not notice the closed gate")
	}
}
