// Package fleet is the fleet view: each node keeps a small summary of its last pass (version,
// result, backlog, next window, last error) in one RADOS object beside the lock, one omap entry per
// node, and `flattend status --nodes` reads them all and says who is behind, who fails, who runs
// which version and who has gone silent.
package fleet

import (
	"encoding/json"
	"errors"
	"fmt"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/flattend/flattend/internal/lock"
)

// Results of a pass, as a summary records them.
const (
	Running   = "running"   // written after a flatten: the pass goes on
	OK        = "ok"        // every clone it found is flat
	Partial   = "partial"   // it ended with clones left: skipped (in use, retry later), a gate, a budget
	Failed    = "failed"    // discovery failed, or a clone's flatten failed
	Cancelled = "cancelled" // the window closed, or the daemon stopped, with clones left
)

// Bounds on what a summary holds, so that the object stays small for 1,000 nodes (at most
// 1,000 × (253 + MaxValue) bytes, about 1.3 MB; a typical entry is ~350 bytes).
const (
	// MaxValue bounds an entry's value; a bigger one was not written by flattend.
	MaxValue   = 1024
	maxError   = 300 // bytes of the last error kept (truncated, on a character boundary)
	maxVersion = 64
	maxResult  = 16
	// maxSpan bounds the window's period and length a reader believes (ten years).
	maxSpan = 10 * 365 * 24 * 3600
)

// Entry is one node's summary: the value of its omap key (compact JSON). Its JSON names are
// part of the documented `status --nodes --json` schema (docs/operations.md).
type Entry struct {
	Version     string    `json:"version"`
	PassStarted time.Time `json:"pass_started,omitzero"`
	PassEnded   time.Time `json:"pass_ended,omitzero"` // zero while the pass runs
	Result      string    `json:"result"`
	Discovered  int       `json:"discovered"`
	Flattened   int       `json:"flattened"`
	Failed      int       `json:"failed"`
	ClonesLeft  int       `json:"clones_left"`
	BytesLeft   uint64    `json:"bytes_left"`
	// NextWindow is when the node's window opens next after Written; PeriodSec is the time from
	// that opening to the one after, WindowSec how long the window stays open. They tell a
	// reader when the node should have reported again (StaleAt).
	NextWindow time.Time `json:"next_window,omitzero"`
	PeriodSec  int64     `json:"window_period_s"`
	WindowSec  int64     `json:"window_s"`
	LastError  string    `json:"last_error,omitempty"`
	Written    time.Time `json:"written"`
}

// Encode is the value a node writes: e with its strings cut to their bounds.
func Encode(e Entry) ([]byte, error) {
	e.LastError = truncate(e.LastError, maxError)
	e.Version = truncate(e.Version, maxVersion)
	b, err := json.Marshal(e)
	if err == nil && len(b) > MaxValue {
		err = fmt.Errorf("fleet summary of %d bytes exceeds %d", len(b), MaxValue)
	}
	return b, err
}

// Decode checks one omap entry: a node name for key, a small value that decodes to a summary
// flattend could have written. Anything else is someone else's: the error says why it is ignored.
func Decode(key string, value []byte) (Entry, error) {
	var e Entry
	switch {
	case !lock.ValidNode(key):
		return e, errors.New("not a node name")
	case len(value) > MaxValue:
		return e, fmt.Errorf("value of %d bytes, more than %d", len(value), MaxValue)
	}
	if err := json.Unmarshal(value, &e); err != nil {
		return Entry{}, fmt.Errorf("value does not decode: %w", err)
	}
	switch {
	case !text(e.Version, maxVersion) || !text(e.Result, maxResult) || !text(e.LastError, maxError+len("…")):
		return Entry{}, errors.New("version, result or last error too long or not printable")
	case e.Discovered < 0 || e.Flattened < 0 || e.Failed < 0 || e.ClonesLeft < 0:
		return Entry{}, errors.New("negative count")
	case e.PeriodSec < 0 || e.PeriodSec > maxSpan || e.WindowSec < 0 || e.WindowSec > maxSpan:
		return Entry{}, errors.New("window period or length out of range")
	case !sane(e.Written) || e.Written.IsZero() || !sane(e.NextWindow) || !sane(e.PassStarted) || !sane(e.PassEnded):
		return Entry{}, errors.New("time missing or out of range")
	}
	return e, nil
}

// sane bounds the times a reader does arithmetic on (zero is allowed: absent).
func sane(t time.Time) bool { return t.IsZero() || (t.Year() >= 2000 && t.Year() < 3000) }

// text is printable UTF-8 of at most n bytes.
func text(s string, n int) bool {
	if len(s) > n || !utf8.ValidString(s) {
		return false
	}
	for _, r := range s {
		if !unicode.IsPrint(r) {
			return false
		}
	}
	return true
}

// truncate cuts s to at most n bytes on a character boundary, marking the cut, and replaces
// what is not printable (an error may quote anything).
func truncate(s string, n int) string {
	clean := []rune{}
	for _, r := range s {
		if !unicode.IsPrint(r) {
			r = ' '
		}
		clean = append(clean, r)
	}
	s = string(clean)
	if len(s) <= n {
		return s
	}
	cut := n
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "…"
}

// StaleAt is when a node that wrote e has been silent for more than two windows: the end of
// the window after its next one (NextWindow + PeriodSec + WindowSec). A node reports at the end
// of every pass and passes run whenever its window is open, so by then it has missed its report
// in two whole windows. Zero when e carries no window (its schedule never opens again): such a
// node is never called stale.
func StaleAt(e Entry) time.Time {
	if e.NextWindow.IsZero() || e.PeriodSec <= 0 {
		return time.Time{}
	}
	return e.NextWindow.Add(time.Duration(e.PeriodSec+e.WindowSec) * time.Second)
}
