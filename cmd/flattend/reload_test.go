package main

import (
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/flattend/flattend/internal/config"
)

// A reload tells systemd RELOADING=1 with MONOTONIC_USEC (the time the reload started, as
// Type=notify-reload in systemd ≥ 253 requires) in one datagram, then READY=1; also when the new
// file is rejected.
func TestReloadNotifiesMonotonicUsec(t *testing.T) {
	sock := notifySocket(t)
	cfg := config.Defaults()
	cfg.Path = filepath.Join(t.TempDir(), "gone.yaml") // the reload is rejected: nothing else to set up
	e := &env{cfg: &cfg, current: new(atomic.Pointer[config.Config]), log: zap.NewNop()}
	e.current.Store(&cfg)
	before := monotonicUsec(t)
	reloadConfig(e, nil, nil)
	after := monotonicUsec(t)

	var msgs []string
	buf := make([]byte, 256)
	for len(msgs) < 2 {
		_ = sock.SetReadDeadline(time.Now().Add(10 * time.Second))
		n, err := sock.Read(buf)
		if err != nil {
			t.Fatalf("after %q: %v", msgs, err)
		}
		msgs = append(msgs, string(buf[:n]))
	}
	fields := map[string]string{}
	for _, l := range strings.Split(strings.TrimSpace(msgs[0]), "\n") {
		k, v, _ := strings.Cut(l, "=")
		fields[k] = v
	}
	if fields["RELOADING"] != "1" {
		t.Fatalf("first datagram %q, want RELOADING=1", msgs[0])
	}
	usec, err := strconv.ParseInt(fields["MONOTONIC_USEC"], 10, 64)
	if err != nil || usec < before || usec > after {
		t.Errorf("MONOTONIC_USEC in %q is not between the test's CLOCK_MONOTONIC readings %d and %d", msgs[0], before, after)
	}
	if msgs[1] != "READY=1" {
		t.Errorf("second datagram %q, want READY=1", msgs[1])
	}
}

func monotonicUsec(t *testing.T) int64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		t.Fatal(err)
	}
	return ts.Nano() / 1000
}
