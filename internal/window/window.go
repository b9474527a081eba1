// Package window is the night window: a cron schedule that opens it and a duration that keeps it
// open. Windows that overlap or touch merge into one.
package window

import (
	"errors"
	"fmt"
	"strings"
	"time"
	"unicode"

	"github.com/robfig/cron/v3"
)

// Window is a recurring period: it opens at every activation of a cron schedule and stays open
// for a fixed duration. Windows that overlap or touch merge into one.
type Window struct {
	schedule cron.Schedule
	duration time.Duration
}

// ErrNeverOpens is a schedule that parses but has no activation (0 0 30 2 *: 30 February).
var ErrNeverOpens = errors.New("never opens")

// horizon is how far ahead New looks for an activation: five years hold a 29 February. It is
// also as far as cron's own Next looks.
const horizon = 5 * 365 * 24 * time.Hour

// New parses a standard 5-field cron spec (a CRON_TZ= prefix is allowed). A spec that parses but
// never fires within the horizon is an error wrapping ErrNeverOpens.
func New(spec string, duration time.Duration) (Window, error) {
	if duration <= 0 {
		return Window{}, fmt.Errorf("window duration must be positive, got %s", duration)
	}
	s, err := parse(spec)
	if err != nil {
		return Window{}, fmt.Errorf("window schedule %q: %w", spec, err)
	}
	now := time.Now()
	if next := s.Next(now); next.IsZero() || next.After(now.Add(horizon)) {
		return Window{}, fmt.Errorf("window schedule %q: %w: no activation in the next 5 years", spec, ErrNeverOpens)
	}
	return Window{schedule: s, duration: duration}, nil
}

// cronParse is the cron parser, a variable so that a test can make it panic.
var cronParse = cron.ParseStandard

// parse is cronParse made safe: robfig/cron v3.0.1 slices the spec up to the first space after
// a CRON_TZ= or TZ= prefix and panics when there is none, so the shape is checked first, and any
// other panic of the parser is an error too (a config reload must not kill the daemon).
func parse(spec string) (s cron.Schedule, err error) {
	if err := checkZone(spec); err != nil {
		return nil, err
	}
	defer func() {
		if r := recover(); r != nil {
			s, err = nil, fmt.Errorf("the cron parser failed on it: %v", r)
		}
	}()
	return cronParse(spec)
}

// checkZone checks that a CRON_TZ= or TZ= prefix names a zone and is followed by a space and
// the fields.
func checkZone(spec string) error {
	for _, prefix := range []string{"CRON_TZ=", "TZ="} {
		rest, ok := strings.CutPrefix(spec, prefix)
		if !ok {
			continue
		}
		zone, fields, _ := strings.Cut(rest, " ")
		switch {
		case zone == "" || strings.ContainsFunc(zone, unicode.IsSpace):
			return fmt.Errorf("%s must be followed by a time zone name and a space, e.g. \"%sEurope/Paris 0 1 * * *\"", prefix, prefix)
		case strings.TrimSpace(fields) == "":
			return fmt.Errorf("no schedule after %s%s: want 5 fields after the zone, e.g. \"%s%s 0 1 * * *\"", prefix, zone, prefix, zone)
		}
		return nil
	}
	return nil
}

// maxMerge bounds how many back-to-back activations At follows to find a window's end (a schedule
// that fires every minute with a longer duration never closes; a day's worth is plenty).
const maxMerge = 24 * 60

// At reports whether the window is open at t and, if so, when it closes.
func (w Window) At(t time.Time) (open bool, end time.Time) {
	if w.schedule == nil { // the zero Window never opens
		return false, time.Time{}
	}
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
func (w Window) NextOpen(t time.Time) time.Time {
	if w.schedule == nil {
		return time.Time{}
	}
	return w.schedule.Next(t)
}
