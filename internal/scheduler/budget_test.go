package scheduler

import (
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/flattend/flattend/internal/discovery"
	"github.com/flattend/flattend/internal/rbdimage"
)

func TestBudgetsAndWindowEnd(t *testing.T) {
	s := New(Config{MaxPerWindow: 2, MaxBytesPerWindow: 10 << 20, MinTimeLeft: 5 * time.Minute}, nil, nil, zap.NewNop())
	small := discovery.Clone{Spec: rbdimage.Spec{Pool: "p", Image: "small"}, Overlap: 4 << 20}
	big := discovery.Clone{Spec: rbdimage.Spec{Pool: "p", Image: "big"}, Overlap: 8 << 20}
	if r := s.stopReason(); r != "" {
		t.Fatalf("fresh window stopped: %s", r)
	}
	s.budget.clones, s.budget.bytes = 1, 4<<20
	if r := s.skipReason(big); !strings.Contains(r, "would exceed flatten.max_bytes_per_window") {
		t.Errorf("8 MiB more on 4 of 10 MiB: skip reason %q", r)
	}
	if r := s.skipReason(small); r != "" {
		t.Errorf("4 MiB more on 4 of 10 MiB: skipped (%s)", r)
	}
	s.budget.clones = 2
	if r := s.stopReason(); !strings.Contains(r, "max_per_window (2) reached") {
		t.Errorf("2 of 2 flattens: stop reason %q", r)
	}
	s.budget = budget{bytes: 10 << 20}
	if r := s.stopReason(); !strings.Contains(r, "max_bytes_per_window (10.0 MiB) reached") {
		t.Errorf("10 of 10 MiB: stop reason %q", r)
	}
	s.budget = budget{}
	s.windowEnd.Store(time.Now().Add(4 * time.Minute).UnixNano())
	if r := s.stopReason(); !strings.Contains(r, "too little of the window left") {
		t.Errorf("4 minutes left of a 5-minute minimum: stop reason %q", r)
	}
	s.windowEnd.Store(time.Now().Add(time.Hour).UnixNano())
	if r := s.stopReason(); r != "" {
		t.Errorf("an hour left: stopped (%s)", r)
	}
}

// A failed clone waits RetryAfter, doubled per failure up to a day, and does not hold up others.
func TestRetryBackoff(t *testing.T) {
	s := New(Config{RetryAfter: 30 * time.Minute}, nil, nil, zap.NewNop())
	c := discovery.Clone{Spec: rbdimage.Spec{Pool: "p", Image: "flaky"}}
	for failures, want := range map[int]time.Duration{1: 30 * time.Minute, 2: time.Hour, 3: 2 * time.Hour, 7: 24 * time.Hour, 40: 24 * time.Hour} {
		got := s.retryAfter(failures)
		if got != want {
			t.Errorf("after %d failures: wait %s, want %s", failures, got, want)
		}
	}
	// A long retry_after saturates at a day for any failure count; a shift overflowed int64
	// (48h << 16 is negative) and the clone was retried at once.
	for _, after := range []time.Duration{25 * time.Hour, 48 * time.Hour, 1 << 62, time.Duration(1<<63 - 1)} {
		long := New(Config{RetryAfter: after}, nil, nil, zap.NewNop())
		for _, failures := range []int{1, 2, 16, 17, 18, 40, 1 << 30} {
			if got := long.retryAfter(failures); got != 24*time.Hour {
				t.Errorf("retry_after %s, %d failures: wait %s, want 24h", after, failures, got)
			}
		}
	}
	tiny := New(Config{RetryAfter: time.Nanosecond}, nil, nil, zap.NewNop())
	if got := tiny.retryAfter(1 << 30); got != 24*time.Hour {
		t.Errorf("retry_after 1ns after 2^30 failures: wait %s, want 24h", got)
	}
	s.retries[c.String()] = retry{failures: 1, next: time.Now().Add(time.Minute)}
	if r := s.skipReason(c); !strings.Contains(r, "failed 1 time(s), next try after") {
		t.Errorf("skip reason %q", r)
	}
	if r := s.skipReason(discovery.Clone{Spec: rbdimage.Spec{Pool: "p", Image: "other"}}); r != "" {
		t.Errorf("another clone skipped: %s", r)
	}
	s.retries[c.String()] = retry{failures: 1, next: time.Now().Add(-time.Second)}
	if r := s.skipReason(c); r != "" {
		t.Errorf("retry time passed: still skipped (%s)", r)
	}
}
