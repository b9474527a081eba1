package fleet_test

import (
	"bytes"
	"encoding/json"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/flattend/flattend/internal/fleet"
)

var t0 = time.Date(2026, 12, 7, 1, 0, 0, 0, time.UTC) // a window opens at 01:00 daily, for 6 h

// reported is a summary written at the end of a pass at 06:59 on the day before t0: next window t0.
func reported(version string) fleet.Entry {
	return fleet.Entry{Version: version, Result: fleet.OK, NextWindow: t0, PeriodSec: 24 * 3600, WindowSec: 6 * 3600,
		PassEnded: t0.Add(-18*time.Hour - time.Minute), Written: t0.Add(-18*time.Hour - time.Minute)}
}

// A node is stale once it has been silent for more than two of its windows: past the end of the
// window after its next one (t0 + 24 h + 6 h), not before.
func TestStaleAfterTwoWindows(t *testing.T) {
	e := reported("1.0")
	if got, want := fleet.StaleAt(e), t0.Add(30*time.Hour); !got.Equal(want) {
		t.Errorf("StaleAt = %s, want %s", got, want)
	}
	for _, c := range []struct {
		name  string
		now   time.Time
		stale bool
	}{
		{"before its next window", t0.Add(-time.Hour), false},
		{"its next window ended without a report (one missed)", t0.Add(7 * time.Hour), false},
		{"the second window opened", t0.Add(25 * time.Hour), false},
		{"just before the second window ends", t0.Add(30*time.Hour - time.Second), false},
		{"the second window ended without a report", t0.Add(30*time.Hour + time.Second), true},
		{"long gone", t0.Add(30 * 24 * time.Hour), true},
	} {
		r := fleet.Assess("p/o", []fleet.Node{{Name: "hv1", Entry: e}}, 0, c.now)
		if r.Nodes[0].Stale != c.stale {
			t.Errorf("%s (%s): stale = %v, want %v", c.name, c.now, r.Nodes[0].Stale, c.stale)
		}
	}
	// A weekly window: two windows are two weeks, whatever the summary's age in days.
	w := reported("1.0")
	w.PeriodSec = 7 * 24 * 3600
	if r := fleet.Assess("p/o", []fleet.Node{{Name: "hv1", Entry: w}}, 0, t0.Add(7*24*time.Hour)); r.Nodes[0].Stale {
		t.Error("a weekly node 7 days after its next window: stale, want not (its second window has not ended)")
	}
	// No window (the schedule never opens again): never stale.
	n := reported("1.0")
	n.NextWindow, n.PeriodSec = time.Time{}, 0
	if r := fleet.Assess("p/o", []fleet.Node{{Name: "hv1", Entry: n}}, 0, t0.Add(1000*24*time.Hour)); r.Nodes[0].Stale {
		t.Error("a node without a window: stale, want never")
	}
}

func TestFlagsAndMixedVersions(t *testing.T) {
	now := t0.Add(time.Hour)
	behind := reported("1.1")
	behind.Result, behind.ClonesLeft, behind.BytesLeft = fleet.Partial, 3, 3<<30
	failing := reported("1.1")
	failing.Result, failing.LastError = fleet.Failed, "vms/x: boom"
	old := reported("1.0")
	gone := reported("0.9")
	gone.NextWindow = t0.Add(-30 * 24 * time.Hour) // silent for a month: its version does not count
	unknown := reported("")
	r := fleet.Assess("p/o", []fleet.Node{{Name: "d", Entry: old}, {Name: "a", Entry: behind}, {Name: "b", Entry: failing},
		{Name: "c", Entry: reported("1.1")}, {Name: "e", Entry: gone}, {Name: "f", Entry: unknown}}, 2, now)
	got := map[string]fleet.NodeView{}
	var order []string
	for _, n := range r.Nodes {
		got[n.Node] = n
		order = append(order, n.Node)
	}
	if strings.Join(order, ",") != "a,b,c,d,e,f" {
		t.Errorf("order %v, want by name", order)
	}
	if !got["a"].Behind || got["a"].Failing || got["c"].Behind || !got["b"].Failing || got["c"].Failing {
		t.Errorf("behind/failing wrong: %+v", r.Nodes)
	}
	if !got["e"].Stale || got["a"].Stale {
		t.Errorf("stale wrong: %+v", r.Nodes)
	}
	if !r.MixedVersions || r.Version != "1.1" || got["a"].OddVersion || !got["d"].OddVersion || !got["e"].OddVersion ||
		got["f"].Version != "unknown" || !got["f"].OddVersion {
		t.Errorf("versions: mixed %v, majority %q, nodes %+v", r.MixedVersions, r.Version, r.Nodes)
	}
	if r.Versions["1.1"] != 3 || r.Versions["0.9"] != 1 || r.Ignored != 2 {
		t.Errorf("versions %v, ignored %d", r.Versions, r.Ignored)
	}
	var text bytes.Buffer
	if err := fleet.WriteText(&text, r); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"behind", "failing", "stale", "odd-version", "vms/x: boom",
		"6 nodes: 1 behind, 1 failing, 1 stale", "MIXED, most run 1.1"} {
		if !strings.Contains(text.String(), want) {
			t.Errorf("text lacks %q:\n%s", want, text.String())
		}
	}

	// One version among the live nodes: not mixed, nobody odd, even beside a stale old node.
	r = fleet.Assess("p/o", []fleet.Node{{Name: "a", Entry: reported("1.1")}, {Name: "e", Entry: gone}}, 0, now)
	if r.MixedVersions || r.Nodes[0].OddVersion || r.Nodes[1].OddVersion {
		t.Errorf("one live version: %+v", r)
	}
}

// An empty fleet prints "nodes": [] (never null) and an empty versions map.
func TestEmptyFleet(t *testing.T) {
	var b bytes.Buffer
	if err := fleet.WriteJSON(&b, fleet.Assess("p/o", nil, 0, t0)); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(b.String(), `"nodes": []`) || !strings.Contains(b.String(), `"versions": {}`) {
		t.Errorf("%s", b.String())
	}
}

// What a node writes decodes back; what it writes is bounded (a huge error is cut) and fits
// the value bound.
func TestEncodeDecode(t *testing.T) {
	e := reported("1.0")
	e.LastError = strings.Repeat("é", 2000) + "\x00\n"
	b, err := fleet.Encode(e)
	if err != nil || len(b) > fleet.MaxValue {
		t.Fatalf("Encode: %d bytes, %v", len(b), err)
	}
	got, err := fleet.Decode("hv1", b)
	if err != nil || got.Version != "1.0" || !strings.HasSuffix(got.LastError, "…") || len(got.LastError) > 310 {
		t.Fatalf("Decode: %+v, %v", got, err)
	}
}

// Entries written by someone else are refused with a reason, never a panic.
func TestDecodeRefusesJunk(t *testing.T) {
	good, _ := json.Marshal(reported("1.0"))
	for name, kv := range map[string][2]string{
		"not JSON":           {"hv1", "garbage"},
		"oversized":          {"hv1", `{"version":"1","written":"2026-12-07T00:00:00Z","last_error":"` + strings.Repeat("x", 2000) + `"}`},
		"bad key":            {"hv\x00x", string(good)},
		"empty key":          {"", string(good)},
		"negative count":     {"hv1", `{"version":"1","clones_left":-1,"written":"2026-12-07T00:00:00Z"}`},
		"no written time":    {"hv1", `{"version":"1"}`},
		"absurd time":        {"hv1", `{"version":"1","written":"0001-01-02T00:00:00Z"}`},
		"absurd period":      {"hv1", `{"version":"1","window_period_s":999999999999,"written":"2026-12-07T00:00:00Z"}`},
		"control characters": {"hv1", `{"version":"1\u001b[31m","written":"2026-12-07T00:00:00Z"}`},
		"wrong types":        {"hv1", `{"version":7,"written":"2026-12-07T00:00:00Z"}`},
	} {
		if e, err := fleet.Decode(kv[0], []byte(kv[1])); err == nil {
			t.Errorf("%s: accepted as %+v", name, e)
		}
	}
	if _, err := fleet.Decode("hv1", good); err != nil {
		t.Errorf("a good entry refused: %v", err)
	}
}

// The JSON of `status --nodes --json` is a documented, stable format (docs/operations.md): it is
// pinned here byte for byte. Change testdata/nodes.json only with the docs, and say so in the
// release notes.
func TestJSONGolden(t *testing.T) {
	behind := reported("1.1")
	behind.PassStarted, behind.Result, behind.Discovered, behind.Flattened, behind.Failed = behind.Written.Add(-time.Hour), fleet.Failed, 5, 3, 1
	behind.ClonesLeft, behind.BytesLeft, behind.LastError = 2, 2<<30, "vms/x_disk: flatten: EIO"
	running := reported("1.0")
	running.PassEnded, running.Result = time.Time{}, fleet.Running
	r := fleet.Assess("rbd/flattend-lock.nodes", []fleet.Node{{Name: "hv2", Entry: running}, {Name: "hv1", Entry: behind}}, 1, t0.Add(time.Hour))
	var b bytes.Buffer
	if err := fleet.WriteJSON(&b, r); err != nil {
		t.Fatal(err)
	}
	want, err := os.ReadFile("testdata/nodes.json")
	if os.Getenv("FLATTEND_UPDATE_GOLDEN") != "" {
		err = os.WriteFile("testdata/nodes.json", b.Bytes(), 0o644)
	}
	if err != nil {
		t.Fatal(err)
	}
	if b.String() != string(want) {
		t.Errorf("status --nodes --json changed:\n%s\nwant (testdata/nodes.json):\n%s", b.String(), want)
	}
}
