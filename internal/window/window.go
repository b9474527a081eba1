// Package window is the night window: a cron schedule that opens it and a duration that keeps it
// open. Windows that overlap or touch merge into one.
package window

import (
	"fmt"
	"time"

	"github.com/robfig/cron/v3"
)

// Window is a recurring period: it opens at every activation of a cron schedule and stays open
// for a fixed duration. Windows that overlap or touch merge into one.
type Window struct {
	schedule cron.Schedule
	duration time.Duration
}

// New parses a standard 5-field cron spec (a CRON_TZ= prefix is allowed).
func New(spec string, duration time.Duration) (Window, error) {
	if duration <= 0 {
		return Window{}, fmt.Errorf("window duration must be positive, got %s", duration)
	}
	s, err := cron.ParseStandard(spec)
	if err != nil {
		return Window{}, fmt.Errorf("window schedule %q: %w", spec, err)
	}
	return Window{schedule: s, duration: duration}, nil
}

// maxMerge bounds how many back-to-back activations At follows to find a window's end (a schedule
// that fires every minute with a longer duration never closes; a day's worth is plenty).
const maxMerge = 24 * 60

// At reports whether the window is open at t and, if so, when it closes.
func (w Window) At(t time.Time) (open bool, end time.Time) {
	// The first activation after t-duration is the earliest one whose window may still be open.
	start := w.schedule.Next(t.Add(-w.duration))
	if start.IsZero() || start.After(t) {
		return false, time.Time{}
	}
	end = start.Add(w.duration)
	// Later activations before the end extend the window.
	for i := 0; i < maxMerge; i++ {
		next := w.schedule.Next(start)
		if next.IsZero() || next.After(end) {
			break
		}
		start = next
		end = next.Add(w.duration)
	}
	return true, end
}

// NextOpen returns when the window next opens after t (zero if never).
func (w Window) NextOpen(t time.Time) time.Time { return w.schedule.Next(t) }
