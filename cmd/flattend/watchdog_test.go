package main

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	sd "github.com/coreos/go-systemd/v22/daemon"
	"go.uber.org/zap"
)

// The watchdog pings, on a NOTIFY_SOCKET the test owns, while the fake main loop moves; none
// once it stops moving; and again when it moves again. Pings are sent synchronously by the
// watchdog's goroutine, so counting its looks at stalled() orders them without timing.
func TestWatchdogPingsOnlyWhileTheLoopMoves(t *testing.T) {
	sock := notifySocket(t)
	const period = 30 * time.Millisecond
	var stall, looks atomic.Int64
	stalled := func() time.Duration { looks.Add(1); return time.Duration(stall.Load()) }
	ping := func() { _, _ = sd.SdNotify(false, sd.SdNotifyWatchdog) }
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); watchdog(ctx, period, stalled, ping, zap.NewNop()) }()
	defer func() { cancel(); <-done }()

	if n := pings(t, sock, 10*time.Second, 2); n < 2 {
		t.Fatalf("%d pings while the loop moves, want 2", n)
	}
	stall.Store(int64(period)) // the loop stops moving
	waitLooks(&looks, 1)       // any ping decided before the stop has been sent now
	pings(t, sock, 0, 1<<20)   // drain it
	waitLooks(&looks, 4)
	if n := pings(t, sock, 0, 1<<20); n != 0 {
		t.Errorf("%d pings while the loop was stalled for a whole period", n)
	}
	stall.Store(0)
	if n := pings(t, sock, 10*time.Second, 1); n != 1 {
		t.Errorf("no ping after the loop moved again")
	}
}

// waitLooks returns once the watchdog has looked at stalled() k more times.
func waitLooks(looks *atomic.Int64, k int64) {
	for from := looks.Load(); looks.Load() < from+k; {
		time.Sleep(time.Millisecond)
	}
}

// pings reads up to limit WATCHDOG=1 datagrams, waiting up to wait for each (0: only those queued).
func pings(t *testing.T, sock *net.UnixConn, wait time.Duration, limit int) int {
	t.Helper()
	buf := make([]byte, 256)
	n := 0
	for n < limit {
		// A deadline already past fails the read before it looks: give queued datagrams 1 ms.
		_ = sock.SetReadDeadline(time.Now().Add(max(wait, time.Millisecond)))
		k, err := sock.Read(buf)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return n
		}
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(buf[:k]), "WATCHDOG=1") {
			n++
		}
	}
	return n
}

// notifySocket listens where NOTIFY_SOCKET points for the test, as systemd does.
func notifySocket(t *testing.T) *net.UnixConn {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify.sock")
	sock, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sock.Close() })
	t.Setenv("NOTIFY_SOCKET", path)
	return sock
}
