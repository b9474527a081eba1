package lock

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/flattend/flattend/internal/backoff"
)

// While every slot is busy, Lock backs off (doubling, jittered) between tries and tells each
// wait; the first answer other than "busy" ends the loop.
func TestRetryBusyBacksOff(t *testing.T) {
	tries := 0
	try := func(context.Context) (*Lease, error) {
		if tries++; tries <= 4 {
			return nil, ErrLocked
		}
		return &Lease{}, nil
	}
	var slept, told []time.Duration
	sleep := func(_ context.Context, d time.Duration) error { slept = append(slept, d); return nil }
	bo := &backoff.Backoff{Min: 100 * time.Millisecond, Max: 300 * time.Millisecond}
	l, err := retryBusy(context.Background(), bo, try, sleep, func(d time.Duration) { told = append(told, d) })
	if err != nil || l == nil || tries != 5 {
		t.Fatalf("retryBusy = %v, %v after %d tries", l, err, tries)
	}
	bounds := []time.Duration{100, 200, 300, 300}
	if len(slept) != len(bounds) || len(told) != len(slept) {
		t.Fatalf("slept %v, told %v: want 4 waits", slept, told)
	}
	for i, hi := range bounds {
		if hi *= time.Millisecond; slept[i] < hi/2 || slept[i] > hi || told[i] != slept[i] {
			t.Errorf("wait %d = %s (told %s), want in [%s, %s]", i, slept[i], told[i], hi/2, hi)
		}
	}
}

// A loss or the end of ctx stops the loop at once.
func TestRetryBusyStops(t *testing.T) {
	lostErr := func(context.Context) (*Lease, error) { return nil, ErrLost }
	noSleep := func(context.Context, time.Duration) error { t.Fatal("slept after a loss"); return nil }
	if _, err := retryBusy(context.Background(), &backoff.Backoff{Min: 1, Max: 1}, lostErr, noSleep, nil); !errors.Is(err, ErrLost) {
		t.Fatalf("after a loss: %v", err)
	}
	busy := func(context.Context) (*Lease, error) { return nil, ErrLocked }
	stop := errors.New("window closed")
	ended := func(context.Context, time.Duration) error { return stop }
	if _, err := retryBusy(context.Background(), &backoff.Backoff{Min: 1, Max: 1}, busy, ended, nil); !errors.Is(err, stop) {
		t.Fatalf("ctx ended while busy: %v", err)
	}
}
