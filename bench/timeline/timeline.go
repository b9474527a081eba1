// Package timeline draws who flattened what when, from flattend's JSON logs, as a self-contained
// SVG: one row per node, a bar per flatten (coloured by result, the clone in its tooltip), the
// time the node held the lock as a pale band behind it (from the debug "lock acquired" / "lock
// released" events, when the log has them), and a thin line for every lock handover, from the end
// of one node's flatten to the start of the next node's.
package timeline

import (
	"bufio"
	"encoding/json"
	"fmt"
	"html"
	"io"
	"math"
	"slices"
	"strings"
	"time"
)

// Bar is one flatten, or one lock tenure (Lock true).
type Bar struct {
	Node   string
	Image  string // empty for a lock tenure
	Result string // flat, cancelled, failed …; "running" when the log ends before it finished
	From   time.Time
	To     time.Time
	Lock   bool
}

type event struct {
	TS     time.Time `json:"ts"`
	Msg    string    `json:"msg"`
	Node   string    `json:"node"`
	Image  string    `json:"image"`
	Result string    `json:"result"`
	Lock   string    `json:"lock"`
}

// Parse reads one process's JSON log (other lines are skipped) and returns its flattens and lock
// tenures. node names the process when its lines carry no "node" field.
func Parse(r io.Reader, node string) ([]Bar, error) {
	var bars []Bar
	open := map[string]*Bar{}
	var lock *Bar
	var last time.Time
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var e event
		if json.Unmarshal(sc.Bytes(), &e) != nil || e.Msg == "" || e.TS.IsZero() {
			continue
		}
		if e.Node == "" {
			e.Node = node
		}
		last = e.TS
		switch e.Msg {
		case "flatten started":
			open[e.Image] = &Bar{Node: e.Node, Image: e.Image, From: e.TS}
		case "flatten finished":
			if b := open[e.Image]; b != nil {
				b.To, b.Result = e.TS, e.Result
				bars = append(bars, *b)
				delete(open, e.Image)
			}
		case "lock acquired":
			lock = &Bar{Node: e.Node, From: e.TS, Lock: true}
		case "lock released":
			if lock != nil {
				lock.To = e.TS
				bars = append(bars, *lock)
				lock = nil
			}
		}
	}
	for _, b := range open {
		b.To, b.Result = last, "running"
		bars = append(bars, *b)
	}
	if lock != nil {
		lock.To = last
		bars = append(bars, *lock)
	}
	return bars, sc.Err()
}

// Handover is a lock passing from one node's flatten to another node's.
type Handover struct {
	FromNode, ToNode string
	Released, Next   time.Time // end of the one flatten, start of the next
}

// Handovers returns, in time order, each flatten that started after the previous flatten (by
// start time) ended, on a different node: with one slot, every lock handover between nodes.
func Handovers(bars []Bar) []Handover {
	var fl []Bar
	for _, b := range bars {
		if !b.Lock {
			fl = append(fl, b)
		}
	}
	slices.SortFunc(fl, func(a, b Bar) int { return a.From.Compare(b.From) })
	var hs []Handover
	for i := 1; i < len(fl); i++ {
		p, n := fl[i-1], fl[i]
		if p.Node != n.Node && !n.From.Before(p.To) {
			hs = append(hs, Handover{FromNode: p.Node, ToNode: n.Node, Released: p.To, Next: n.From})
		}
	}
	return hs
}

var colours = map[string]string{"flat": "#2e8b57", "cancelled": "#e69f00", "failed": "#d62728", "running": "#7f7f7f"}

func colour(result string) string {
	if c, ok := colours[result]; ok {
		return c
	}
	return "#e69f00" // "aborted by a safety gate", "killed" …: stopped, not failed
}

// WriteSVG draws bars as a timeline titled title.
func WriteSVG(w io.Writer, title string, bars []Bar) error {
	if len(bars) == 0 {
		return fmt.Errorf("timeline: nothing to draw (no \"flatten started\" events in the logs?)")
	}
	var nodes []string
	t0, t1 := bars[0].From, bars[0].To
	for _, b := range bars {
		if !slices.Contains(nodes, b.Node) {
			nodes = append(nodes, b.Node)
		}
		if b.From.Before(t0) {
			t0 = b.From
		}
		if b.To.After(t1) {
			t1 = b.To
		}
	}
	slices.Sort(nodes)
	row := map[string]int{}
	for i, n := range nodes {
		row[n] = i
	}
	span := max(t1.Sub(t0).Seconds(), 0.001)
	const left, right, top, rowH, barH, plotW = 110.0, 30.0, 50.0, 34.0, 18.0, 1000.0
	height := top + rowH*float64(len(nodes)) + 60
	x := func(t time.Time) float64 { return left + t.Sub(t0).Seconds()/span*plotW }
	y := func(node string) float64 { return top + rowH*float64(row[node]) + (rowH-barH)/2 }

	var s strings.Builder
	fmt.Fprintf(&s, `<svg xmlns="http://www.w3.org/2000/svg" width="%.0f" height="%.0f" font-family="sans-serif" font-size="12">`+"\n", left+plotW+right, height)
	fmt.Fprintf(&s, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	fmt.Fprintf(&s, `<text x="%.0f" y="22" font-size="15" font-weight="bold">%s</text>`+"\n", left, html.EscapeString(title))
	hs := Handovers(bars)
	nf := 0
	for _, b := range bars {
		if !b.Lock {
			nf++
		}
	}
	fmt.Fprintf(&s, `<text x="%.0f" y="38" fill="#555">%d flattens on %d nodes, %d handovers between nodes, %s from first to last event</text>`+"\n",
		left, nf, len(nodes), len(hs), t1.Sub(t0).Round(time.Millisecond))
	// rows
	for i, n := range nodes {
		yy := top + rowH*float64(i)
		if i%2 == 1 {
			fmt.Fprintf(&s, `<rect x="%.0f" y="%.1f" width="%.0f" height="%.0f" fill="#f4f4f4"/>`+"\n", left, yy, plotW, rowH)
		}
		fmt.Fprintf(&s, `<text x="%.0f" y="%.1f" text-anchor="end">%s</text>`+"\n", left-8, yy+rowH/2+4, html.EscapeString(n))
	}
	// axis and ticks
	axisY := top + rowH*float64(len(nodes))
	fmt.Fprintf(&s, `<line x1="%.0f" y1="%.1f" x2="%.0f" y2="%.1f" stroke="#333"/>`+"\n", left, axisY, left+plotW, axisY)
	step := niceStep(span / 10)
	for v := 0.0; v <= span+1e-9; v += step {
		xx := left + v/span*plotW
		fmt.Fprintf(&s, `<line x1="%.1f" y1="%.0f" x2="%.1f" y2="%.1f" stroke="#ddd"/>`+"\n", xx, top, xx, axisY)
		fmt.Fprintf(&s, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#333"/>`+"\n", xx, axisY, xx, axisY+5)
		fmt.Fprintf(&s, `<text x="%.1f" y="%.1f" text-anchor="middle">%s</text>`+"\n", xx, axisY+18, fmtSecs(v, step))
	}
	fmt.Fprintf(&s, `<text x="%.0f" y="%.1f" text-anchor="middle" fill="#555">seconds since %s</text>`+"\n", left+plotW/2, axisY+36, t0.UTC().Format("15:04:05.000 UTC"))
	// lock tenures, then flattens, then handovers on top
	for _, b := range bars {
		if !b.Lock {
			continue
		}
		fmt.Fprintf(&s, `<rect x="%.2f" y="%.1f" width="%.2f" height="%.0f" fill="#9ecae1" opacity="0.6"><title>%s holds the lock %s (%s)</title></rect>`+"\n",
			x(b.From), y(b.Node)-4, max(x(b.To)-x(b.From), 0.5), barH+8, html.EscapeString(b.Node), b.From.UTC().Format("15:04:05.000"), b.To.Sub(b.From).Round(time.Millisecond))
	}
	for _, b := range bars {
		if b.Lock {
			continue
		}
		fmt.Fprintf(&s, `<rect x="%.2f" y="%.1f" width="%.2f" height="%.0f" fill="%s" stroke="white" stroke-width="0.5"><title>%s on %s: %s, %s, from %s</title></rect>`+"\n",
			x(b.From), y(b.Node), max(x(b.To)-x(b.From), 1), barH, colour(b.Result), html.EscapeString(b.Image), html.EscapeString(b.Node),
			html.EscapeString(b.Result), b.To.Sub(b.From).Round(time.Millisecond), b.From.UTC().Format("15:04:05.000"))
	}
	for _, h := range hs {
		fmt.Fprintf(&s, `<line x1="%.2f" y1="%.1f" x2="%.2f" y2="%.1f" stroke="#000" stroke-width="1"><title>handover %s → %s: %s</title></line>`+"\n",
			x(h.Released), y(h.FromNode)+barH/2, x(h.Next), y(h.ToNode)+barH/2, html.EscapeString(h.FromNode), html.EscapeString(h.ToNode), h.Next.Sub(h.Released).Round(time.Millisecond))
	}
	// legend
	lx := left + plotW - 420
	for i, k := range []string{"flat", "cancelled", "failed"} {
		fmt.Fprintf(&s, `<rect x="%.0f" y="28" width="12" height="12" fill="%s"/><text x="%.0f" y="38">%s</text>`+"\n", lx+float64(i)*80, colour(k), lx+float64(i)*80+16, k)
	}
	if slices.ContainsFunc(bars, func(b Bar) bool { return b.Lock }) {
		fmt.Fprintf(&s, `<rect x="%.0f" y="28" width="12" height="12" fill="#9ecae1"/><text x="%.0f" y="38">lock held</text>`+"\n", lx+240, lx+256)
	}
	fmt.Fprintf(&s, `<line x1="%.0f" y1="28" x2="%.0f" y2="40" stroke="#000"/><text x="%.0f" y="38">handover</text>`+"\n", lx+330, lx+330, lx+336)
	s.WriteString("</svg>\n")
	_, err := io.WriteString(w, s.String())
	return err
}

// niceStep rounds d up to 1, 2 or 5 times a power of ten.
func niceStep(d float64) float64 {
	if d <= 0 {
		return 1
	}
	p := math.Pow(10, math.Floor(math.Log10(d)))
	for _, m := range []float64{1, 2, 5, 10} {
		if m*p >= d {
			return m * p
		}
	}
	return 10 * p
}

func fmtSecs(v, step float64) string {
	if step >= 1 {
		return fmt.Sprintf("%.0f", v)
	}
	dec := int(math.Ceil(-math.Log10(step)))
	return fmt.Sprintf("%.*f", dec, v)
}
