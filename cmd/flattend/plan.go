package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/ceph/go-ceph/rados"

	"github.com/flattend/flattend/internal/config"
	"github.com/flattend/flattend/internal/discovery"
	"github.com/flattend/flattend/internal/humanize"
	"github.com/flattend/flattend/internal/rbdimage"
	"github.com/flattend/flattend/internal/scheduler"
)

// Plan is what `flattend plan --json` prints. The format is stable and documented in
// docs/discovery.md: fields are only ever added.
type Plan struct {
	Node      string        `json:"node"`
	Generated time.Time     `json:"generated"`
	Order     []string      `json:"order"`
	InUse     string        `json:"in_use"`
	Sources   []string      `json:"sources"`
	Clones    []PlanClone   `json:"clones"`
	Skipped   []PlanSkipped `json:"skipped"`
}

// PlanClone is one clone this node would flatten, in flatten order.
type PlanClone struct {
	Position       int       `json:"position"`
	Image          string    `json:"image"`
	Pool           string    `json:"pool"`
	Namespace      string    `json:"namespace"`
	Name           string    `json:"name"`
	Source         string    `json:"source"`
	AlsoSelectedBy []string  `json:"also_selected_by"`
	Owner          string    `json:"owner"`
	Shared         bool      `json:"shared"`
	Reason         string    `json:"reason"`
	Parent         string    `json:"parent"`
	Chain          []string  `json:"chain"`
	Depth          int       `json:"depth"`
	SizeBytes      uint64    `json:"size_bytes"`
	BytesToCopy    uint64    `json:"bytes_to_copy"`
	Created        time.Time `json:"created"`
	Users          []string  `json:"users"`
}

// PlanSkipped is an image left out, and why.
type PlanSkipped struct {
	Image  string `json:"image"`
	Source string `json:"source"`
	Reason string `json:"reason"`
}

func planFlags(fs *flag.FlagSet, o *options) {
	fs.BoolVar(&o.json, "json", false, "print JSON (the format is documented in docs/discovery.md)")
	adminFlags(fs, &o.admin)
	planSourceFlags(fs, &o.admin)
}

// runPlan is `flattend plan`.
func runPlan(ctx context.Context, e *env, o options) int {
	return plan(ctx, e.cfg, e.dialReader, o.json, e.stdout, e.stderr)
}

// plan discovers this node's clones, orders them as a pass would and says why each one is there
// and why others are not. It changes nothing.
func plan(ctx context.Context, cfg *config.Config, dial func() (*rados.Conn, error), asJSON bool, stdout, stderr io.Writer) int {
	conn, err := dial()
	if err != nil {
		fmt.Fprintln(stderr, err)
		return exitCode(err)
	}
	defer conn.Shutdown()
	p, err := buildPlan(ctx, cfg, conn, time.Now())
	if err != nil {
		fmt.Fprintln(stderr, err)
		return exitFailure
	}
	if asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		err = enc.Encode(p)
	} else {
		err = writePlan(stdout, p)
	}
	if err != nil {
		return exitFailure
	}
	return exitOK
}

func buildPlan(ctx context.Context, cfg *config.Config, conn *rados.Conn, now time.Time) (Plan, error) {
	srcs := sources(cfg, nil) // plan lists what discovery skipped
	p := Plan{Node: cfg.Node, Generated: now.UTC().Truncate(time.Second), Order: cfg.Flatten.Order, InUse: cfg.Flatten.InUse,
		Sources: []string{}, Clones: []PlanClone{}, Skipped: []PlanSkipped{}}
	for _, s := range srcs {
		if !slices.Contains(p.Sources, s.Name()) {
			p.Sources = append(p.Sources, s.Name())
		}
	}
	found, err := discovery.Find(ctx, conn, srcs)
	if err != nil {
		return Plan{}, err
	}
	scheduler.Order(found.Clones, cfg.Flatten.Order)
	for _, c := range found.Clones {
		users, err := rbdimage.Users(conn, c.Spec)
		inUse := scheduler.InUse(users, cfg.Flatten.InUse == config.InUseAllow)
		switch {
		case errors.Is(err, rbdimage.ErrNotFound):
			p.Skipped = append(p.Skipped, PlanSkipped{Image: c.String(), Source: c.Source, Reason: "removed since discovery"})
			continue
		case err != nil:
			return Plan{}, err
		case inUse != nil:
			p.Skipped = append(p.Skipped, PlanSkipped{Image: c.String(), Source: c.Source,
				Reason: fmt.Sprintf("%s (flatten.in_use: skip): %s", scheduler.ErrInUse, strings.Join(users, ", "))})
			continue
		}
		pc := PlanClone{Position: len(p.Clones) + 1, Image: c.String(), Pool: c.Pool, Namespace: c.Namespace, Name: c.Image,
			Source: c.Source, AlsoSelectedBy: c.AlsoBy, Owner: c.Owner, Shared: c.Owner == "", Reason: c.Reason,
			Parent: c.Parent.String(), Chain: specStrings(c.Chain), Depth: c.Depth, SizeBytes: c.Size, BytesToCopy: c.Overlap,
			Created: c.Created.UTC(), Users: users}
		if pc.AlsoSelectedBy == nil {
			pc.AlsoSelectedBy = []string{}
		}
		if pc.Users == nil {
			pc.Users = []string{}
		}
		p.Clones = append(p.Clones, pc)
	}
	for _, s := range found.Skipped {
		p.Skipped = append(p.Skipped, PlanSkipped(s))
	}
	return p, nil
}

// specStrings prints specs, keeping nil nil (the JSON of a plan does not change).
func specStrings(specs []rbdimage.Spec) []string {
	var out []string
	for _, s := range specs {
		out = append(out, s.String())
	}
	return out
}

func writePlan(w io.Writer, p Plan) error {
	var total uint64
	for _, c := range p.Clones {
		total += c.BytesToCopy
	}
	fmt.Fprintf(w, "node %s: %d clone(s) to flatten, %s to copy at most (order: %s; sources: %s)\n",
		p.Node, len(p.Clones), humanize.Bytes(total), strings.Join(p.Order, ", "), strings.Join(p.Sources, ", "))
	for _, c := range p.Clones {
		owner := "owner " + c.Owner
		if c.Shared {
			owner = "shared backlog"
		}
		src := c.Source
		if len(c.AlsoSelectedBy) > 0 {
			src += " (also " + strings.Join(c.AlsoSelectedBy, ", ") + ")"
		}
		fmt.Fprintf(w, "%d. %s  depth %d, %s to copy, %s, %s\n", c.Position, c.Image, c.Depth, humanize.Bytes(c.BytesToCopy), src, owner)
		fmt.Fprintf(w, "   why: %s\n", c.Reason)
		fmt.Fprintf(w, "   parents: %s\n", strings.Join(c.Chain, " <- "))
		if len(c.Users) > 0 {
			fmt.Fprintf(w, "   in use (flatten.in_use: allow): %s\n", strings.Join(c.Users, ", "))
		}
	}
	if len(p.Skipped) == 0 {
		return nil
	}
	fmt.Fprintf(w, "skipped: %d\n", len(p.Skipped))
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "IMAGE\tSOURCE\tWHY")
	for _, s := range p.Skipped {
		fmt.Fprintf(tw, "%s\t%s\t%s\n", s.Image, s.Source, s.Reason)
	}
	return tw.Flush()
}
