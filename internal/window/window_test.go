package window

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/robfig/cron/v3"
)

func mustTime(t *testing.T, s string) time.Time {
	t.Helper()
	v, err := time.Parse(time.RFC3339, s)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func TestWindowAt(t *testing.T) {
	w, err := New("0 1 * * *", 5*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		now      string
		open     bool
		end      string
		nextOpen string
	}{
		{"2026-11-24T00:59:59Z", false, "", "2026-11-24T01:00:00Z"},
		{"2026-11-24T01:00:00Z", true, "2026-11-24T06:00:00Z", ""},
		{"2026-11-24T03:30:00Z", true, "2026-11-24T06:00:00Z", ""}, // started mid-window
		{"2026-11-24T05:59:59Z", true, "2026-11-24T06:00:00Z", ""},
		{"2026-11-24T06:00:00Z", false, "", "2026-11-25T01:00:00Z"}, // end is exclusive
		{"2026-11-24T23:00:00Z", false, "", "2026-11-25T01:00:00Z"},
	} {
		now := mustTime(t, tc.now)
		open, end := w.At(now)
		if open != tc.open {
			t.Errorf("%s: open = %v, want %v", tc.now, open, tc.open)
			continue
		}
		if open && !end.Equal(mustTime(t, tc.end)) {
			t.Errorf("%s: end = %s, want %s", tc.now, end, tc.end)
		}
		if !open && !w.NextOpen(now).Equal(mustTime(t, tc.nextOpen)) {
			t.Errorf("%s: next open = %s, want %s", tc.now, w.NextOpen(now), tc.nextOpen)
		}
	}
}

// A window longer than the schedule's period stays open: consecutive windows merge.
func TestWindowMerges(t *testing.T) {
	w, err := New("0 * * * *", 90*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	open, end := w.At(mustTime(t, "2026-11-24T10:20:00Z"))
	if !open {
		t.Fatal("closed")
	}
	// Activations at 10:00 and 11:00 ... keep extending: never closes inside a day's merge bound.
	if end.Before(mustTime(t, "2026-11-25T00:00:00Z")) {
		t.Errorf("end = %s, want windows merged far ahead", end)
	}
	w2, _ := New("0 1,3 * * *", 2*time.Hour+30*time.Minute)
	open, end = w2.At(mustTime(t, "2026-11-24T02:00:00Z"))
	if !open || !end.Equal(mustTime(t, "2026-11-24T05:30:00Z")) {
		t.Errorf("01:00+2h30 and 03:00+2h30 should merge to end 05:30, got %v %s", open, end)
	}
}

func TestWindowTimeZone(t *testing.T) {
	w, err := New("CRON_TZ=Europe/Paris 0 1 * * *", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	// 01:00 in Paris in November is 00:00 UTC.
	if open, _ := w.At(mustTime(t, "2026-11-24T00:30:00Z")); !open {
		t.Error("window in Europe/Paris not open at 00:30 UTC")
	}
	if open, _ := w.At(mustTime(t, "2026-11-24T01:30:00Z")); open {
		t.Error("window in Europe/Paris open at 01:30 UTC")
	}
}

func TestNewWindowErrors(t *testing.T) {
	if _, err := New("61 * * * *", time.Hour); err == nil {
		t.Error("bad minute accepted")
	}
	if _, err := New("0 1 * * *", 0); err == nil {
		t.Error("zero duration accepted")
	}
}

// A time zone with nothing after it made robfig/cron panic (slice out of range): an error now.
func TestNewZoneWithoutFields(t *testing.T) {
	for _, spec := range []string{"CRON_TZ=Europe/Paris", "TZ=UTC", "CRON_TZ=Europe/Paris ", "TZ=UTC\t0 1 * * *",
		"CRON_TZ= 0 1 * * *", "CRON_TZ="} {
		if _, err := New(spec, time.Hour); err == nil {
			t.Errorf("%q accepted", spec)
		}
	}
	if _, err := New("TZ=UTC 0 1 * * *", time.Hour); err != nil {
		t.Errorf("TZ= prefix: %v", err)
	}
}

// Whatever else makes the parser panic is an error too.
func TestNewParserPanic(t *testing.T) {
	defer func(p func(string) (cron.Schedule, error)) { cronParse = p }(cronParse)
	cronParse = func(string) (cron.Schedule, error) { panic("boom") }
	if _, err := New("0 1 * * *", time.Hour); err == nil || !strings.Contains(err.Error(), "boom") {
		t.Errorf("err = %v", err)
	}
}

// A schedule that parses but never fires is refused; one that fires once in four years is not.
func TestNewNeverOpens(t *testing.T) {
	for _, spec := range []string{"0 0 30 2 *", "0 0 31 4 *", "CRON_TZ=UTC 0 0 31 11 *"} {
		if _, err := New(spec, time.Hour); !errors.Is(err, ErrNeverOpens) {
			t.Errorf("%q: err = %v, want ErrNeverOpens", spec, err)
		}
	}
	if _, err := New("0 0 29 2 *", time.Hour); err != nil {
		t.Errorf("29 February: %v", err)
	}
}

// The zero Window (a config built by hand) never opens, and does not panic.
func TestZeroWindow(t *testing.T) {
	var w Window
	if open, _ := w.At(time.Now()); open || !w.NextOpen(time.Now()).IsZero() {
		t.Error("zero window opens")
	}
}
