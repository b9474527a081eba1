// Package status renders the cluster-wide view of the lock: who holds each slot, which clone it
// is flattening, how far it got. The data comes from the lock images (internal/lock.ReadStatus).
package status

import (
	"encoding/json"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/flattend/flattend/internal/lock"
)

// Slot is one slot as `flattend status --json` prints it (a stable, documented format).
type Slot struct {
	lock.SlotStatus
	Percent    *float64 `json:"percent,omitempty"`
	ElapsedSec *float64 `json:"elapsed_s,omitempty"` // since the clone's flatten started
	ETASec     *float64 `json:"eta_s,omitempty"`
	HeldSec    *float64 `json:"held_s,omitempty"` // since the lock was taken
}

// Report is the whole of `flattend status --json`.
type Report struct {
	Time  time.Time `json:"time"`
	Slots []Slot    `json:"slots"`
	// Waiting lists the queued nodes in the order releases serve them (never null).
	Waiting []lock.Waiter `json:"waiting"`
}

// Build derives progress, elapsed time and ETA from the raw slot states at now.
func Build(slots []lock.SlotStatus, waiting []lock.Waiter, now time.Time) Report {
	r := Report{Time: now.UTC(), Waiting: append([]lock.Waiter{}, waiting...)}
	for _, s := range slots {
		out := Slot{SlotStatus: s}
		if h := s.Holder; h != nil && !s.Stale {
			out.HeldSec = ptr(now.Sub(h.Since).Seconds())
			if h.Clone != "" && !h.Started.IsZero() {
				elapsed := now.Sub(h.Started).Seconds()
				out.ElapsedSec = ptr(elapsed)
				if h.Total > 0 {
					out.Percent = ptr(100 * float64(h.Done) / float64(h.Total))
					if h.Done > 0 {
						out.ETASec = ptr(elapsed * float64(h.Total-h.Done) / float64(h.Done))
					}
				}
			}
		}
		r.Slots = append(r.Slots, out)
	}
	return r
}

func ptr(v float64) *float64 { return &v }

// WriteJSON prints r as indented JSON.
func WriteJSON(w io.Writer, r Report) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// WriteText prints r as a table for people.
func WriteText(w io.Writer, r Report) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SLOT\tLOCK IMAGE\tSTATE\tNODE\tVERSION\tPID\tCLONE\tPROGRESS\tELAPSED\tETA")
	for _, s := range r.Slots {
		state, node, ver, pid, clone, pct, elapsed, eta := "free", "-", "-", "-", "-", "-", "-", "-"
		switch {
		case s.Holder != nil && s.Stale && s.Owner == "":
			state = "free (stale record)"
		case s.Holder != nil && s.Stale:
			state = "held (stale record)"
		case s.Holder != nil:
			state = "held"
		case s.Owner != "":
			state = "held (no record)"
		}
		if h := s.Holder; h != nil {
			node, ver, pid = h.Node, h.Version, fmt.Sprint(h.PID)
			if h.Clone != "" {
				clone = h.Clone
			}
		}
		if s.Percent != nil {
			pct = fmt.Sprintf("%.0f%%", *s.Percent)
		}
		if s.ElapsedSec != nil {
			elapsed = secs(*s.ElapsedSec)
		}
		if s.ETASec != nil {
			eta = secs(*s.ETASec)
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s.Slot, s.Image, state, node, ver, pid, clone, pct, elapsed, eta)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(r.Waiting) == 0 {
		_, err := fmt.Fprintln(w, "\nwaiting: nobody")
		return err
	}
	fmt.Fprintf(w, "\nwaiting (%d, first served first):\n", len(r.Waiting))
	for i, q := range r.Waiting {
		fmt.Fprintf(w, "  %d. %s, for %s\n", i+1, q.Node, r.Time.Sub(q.Since).Round(time.Second))
	}
	return nil
}

func secs(s float64) string { return (time.Duration(s) * time.Second).Round(time.Second).String() }
