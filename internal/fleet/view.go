package fleet

import (
	"cmp"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/flattend/flattend/internal/humanize"
)

// unknownVersion names the version of a summary that has none.
const unknownVersion = "unknown"

// NodeView is one node as `flattend status --nodes --json` prints it: its summary and the flags
// a reader derives from it (docs/operations.md documents each field).
type NodeView struct {
	Node string `json:"node"`
	Entry
	// StaleAfter is StaleAt: when the node counts as silent for two windows (absent: never).
	StaleAfter time.Time `json:"stale_after,omitzero"`
	Behind     bool      `json:"behind"`      // it had clones left after its last report
	Failing    bool      `json:"failing"`     // its last pass failed
	Stale      bool      `json:"stale"`       // silent for more than two of its windows
	OddVersion bool      `json:"odd_version"` // it runs another version than most nodes
}

// Report is the whole of `flattend status --nodes --json` (a stable, documented format).
type Report struct {
	Time   time.Time  `json:"time"`
	Object string     `json:"object"` // "pool/object" the summaries were read from
	Nodes  []NodeView `json:"nodes"`  // by node name; never null
	// Versions counts the nodes per version; Version is the one most nodes that are not stale
	// run; MixedVersions is set when they run more than one.
	Versions      map[string]int `json:"versions"`
	Version       string         `json:"version,omitempty"`
	MixedVersions bool           `json:"mixed_versions"`
	Ignored       int            `json:"ignored"` // entries flattend did not write
}

// Assess derives the flags of every node at now.
func Assess(object string, nodes []Node, ignored int, now time.Time) Report {
	r := Report{Time: now.UTC(), Object: object, Nodes: []NodeView{}, Versions: map[string]int{}, Ignored: ignored}
	live := map[string]int{} // versions of the nodes that are not stale
	for _, n := range nodes {
		v := NodeView{Node: n.Name, Entry: n.Entry, StaleAfter: StaleAt(n.Entry)}
		if v.Version == "" {
			v.Version = unknownVersion
		}
		v.Behind = v.ClonesLeft > 0
		v.Failing = v.Result == Failed
		v.Stale = !v.StaleAfter.IsZero() && now.After(v.StaleAfter)
		r.Versions[v.Version]++
		if !v.Stale {
			live[v.Version]++
		}
		r.Nodes = append(r.Nodes, v)
	}
	slices.SortFunc(r.Nodes, func(a, b NodeView) int { return cmp.Compare(a.Node, b.Node) })
	if len(live) == 0 {
		live = r.Versions // every node is stale: judge them all
	}
	r.Version = majority(live)
	r.MixedVersions = len(live) > 1
	for i := range r.Nodes {
		r.Nodes[i].OddVersion = r.MixedVersions && r.Nodes[i].Version != r.Version
	}
	return r
}

// majority is the version counted most often; on a tie the greatest by string order.
func majority(count map[string]int) string {
	best := ""
	for v, n := range count {
		if best == "" || n > count[best] || (n == count[best] && v > best) {
			best = v
		}
	}
	return best
}

// WriteJSON prints r as indented JSON.
func WriteJSON(w io.Writer, r Report) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// WriteText prints r as a table for people, and a summary line.
func WriteText(w io.Writer, r Report) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tVERSION\tLAST PASS END\tRESULT\tCLONES LEFT\tBYTES LEFT\tNEXT WINDOW\tFLAGS\tLAST ERROR")
	var behind, failing, stale int
	for _, n := range r.Nodes {
		var flags []string
		for _, f := range []struct {
			on   bool
			name string
			n    *int
		}{{n.Behind, "behind", &behind}, {n.Failing, "failing", &failing}, {n.Stale, "stale", &stale}, {n.OddVersion, "odd-version", new(int)}} {
			if f.on {
				flags = append(flags, f.name)
				*f.n++
			}
		}
		ended := "-"
		if !n.PassEnded.IsZero() {
			ended = fmt.Sprintf("%s (%s ago)", n.PassEnded.UTC().Format(time.RFC3339), r.Time.Sub(n.PassEnded).Round(time.Second))
		} else if n.Result == Running {
			ended = fmt.Sprintf("running (written %s ago)", r.Time.Sub(n.Written).Round(time.Second))
		}
		next := "-"
		if !n.NextWindow.IsZero() {
			next = n.NextWindow.UTC().Format(time.RFC3339)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\n", n.Node, n.Version, ended, dash(n.Result), n.ClonesLeft,
			humanize.Bytes(n.BytesLeft), next, dash(strings.Join(flags, ",")), dash(n.LastError))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	var vs []string
	for v, c := range r.Versions {
		vs = append(vs, fmt.Sprintf("%s (%d)", v, c))
	}
	slices.Sort(vs)
	mixed := ""
	if r.MixedVersions {
		mixed = fmt.Sprintf(": MIXED, most run %s", r.Version)
	}
	_, err := fmt.Fprintf(w, "\n%d nodes: %d behind, %d failing, %d stale (silent for two windows); versions: %s%s\n",
		len(r.Nodes), behind, failing, stale, dash(strings.Join(vs, ", ")), mixed)
	return err
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
