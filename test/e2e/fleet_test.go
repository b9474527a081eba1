package e2e

import (
	"bytes"
	"encoding/json"
	"errors"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/flattend/flattend/test/cephtest"
)

// fleetReport is the documented schema of `flattend status --nodes --json` (docs/operations.md),
// written out here rather than taken from the product, so that a change to the format fails.
type fleetReport struct {
	Time          time.Time      `json:"time"`
	Object        string         `json:"object"`
	Nodes         []fleetNode    `json:"nodes"`
	Versions      map[string]int `json:"versions"`
	Version       string         `json:"version"`
	MixedVersions bool           `json:"mixed_versions"`
	Ignored       int            `json:"ignored"`
}

type fleetNode struct {
	Node        string    `json:"node"`
	Version     string    `json:"version"`
	PassStarted time.Time `json:"pass_started"`
	PassEnded   time.Time `json:"pass_ended"`
	Result      string    `json:"result"`
	Discovered  int       `json:"discovered"`
	Flattened   int       `json:"flattened"`
	Failed      int       `json:"failed"`
	ClonesLeft  int       `json:"clones_left"`
	BytesLeft   uint64    `json:"bytes_left"`
	NextWindow  time.Time `json:"next_window"`
	PeriodSec   int64     `json:"window_period_s"`
	WindowSec   int64     `json:"window_s"`
	LastError   string    `json:"last_error"`
	Written     time.Time `json:"written"`
	StaleAfter  time.Time `json:"stale_after"`
	Behind      bool      `json:"behind"`
	Failing     bool      `json:"failing"`
	Stale       bool      `json:"stale"`
	OddVersion  bool      `json:"odd_version"`
}

// fleetStatus runs `status --nodes --json` and decodes it strictly; stderr is returned apart.
func fleetStatus(t *testing.T, conf string) (fleetReport, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	cmd := exec.Command(binary, "status", "--nodes", "--json", "--config", conf)
	cmd.Stdout, cmd.Stderr = &out, &errb
	done := make(chan error, 1)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		var ee *exec.ExitError
		if errors.As(err, &ee) || err != nil {
			t.Fatalf("status --nodes --json: %v\n%s%s", err, out.String(), errb.String())
		}
	case <-time.After(time.Minute):
		_ = cmd.Process.Kill()
		t.Fatalf("status --nodes --json did not finish within a minute")
	}
	var r fleetReport
	dec := json.NewDecoder(bytes.NewReader(out.Bytes()))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&r); err != nil {
		t.Fatalf("status --nodes --json does not match the documented schema: %v\n%s", err, out.String())
	}
	return r, out.String(), errb.String()
}

var versionLine = regexp.MustCompile(`(?m)^flattend (\S+) `)

// Two nodes run a pass; `status --nodes --json` from a third lists both with their version, last
// pass and backlog. A node whose summary is older than two of its windows is flagged stale, a
// node on another version is the odd one out, and an entry flattend did not write is ignored.
func TestFleetStatusNodes(t *testing.T) {
	conn := cephtest.Connect(t)
	ioctx := cephtest.IOContext(t, conn)
	lockImage := cephtest.Name(t, "lock")
	p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 8<<20, 22)
	a, b := cephtest.Name(t, "a"), cephtest.Name(t, "b")
	cephtest.Clone(t, ioctx, p, a+"-c", a)
	cephtest.Clone(t, ioctx, p, b+"-c1", b)
	cephtest.Clone(t, ioctx, p, b+"-c2", b)
	observer := nodeConfig(t, cephtest.Name(t, "observer"), lockImage, "")

	code, out := runCmd(t, 30*time.Second, "version")
	m := versionLine.FindStringSubmatch(out)
	if code != 0 || m == nil {
		t.Fatalf("flattend version: exit %d\n%s", code, out)
	}
	version := m[1]

	// b may flatten one clone per window: one is left after its pass.
	pa := start(t, "once", "--config", nodeConfig(t, a, lockImage, ""))
	pb := start(t, "once", "--config", nodeConfig(t, b, lockImage, "flatten: {max_per_window: 1}\n"))
	if code := pa.wait(t, 3*time.Minute); code != 0 {
		t.Fatalf("a: once exited %d", code)
	}
	if code := pb.wait(t, 3*time.Minute); code != 1 {
		t.Fatalf("b: once exited %d, want 1 (a clone left over its budget)", code)
	}

	r, raw, stderr := fleetStatus(t, observer)
	if len(r.Nodes) != 2 || r.Nodes[0].Node != a || r.Nodes[1].Node != b || r.Ignored != 0 || stderr != "" {
		t.Fatalf("want nodes %s and %s:\n%s%s", a, b, raw, stderr)
	}
	if r.Object != cephtest.Pool+"/"+lockImage+".nodes" || r.MixedVersions || r.Version != version || r.Versions[version] != 2 {
		t.Errorf("object or versions wrong (want version %s):\n%s", version, raw)
	}
	for _, n := range r.Nodes {
		if n.Version != version || n.PassEnded.IsZero() || n.PassStarted.After(n.PassEnded) || time.Since(n.PassEnded) > 10*time.Minute ||
			n.NextWindow.IsZero() || n.PeriodSec != 60 || n.Stale || n.Failing || n.OddVersion || n.StaleAfter.IsZero() {
			t.Errorf("node %s: %+v", n.Node, n)
		}
	}
	if na := r.Nodes[0]; na.Result != "ok" || na.ClonesLeft != 0 || na.BytesLeft != 0 || na.Flattened != 1 || na.Behind {
		t.Errorf("a: want ok with no backlog: %+v", na)
	}
	if nb := r.Nodes[1]; nb.Result != "partial" || nb.Discovered != 2 || nb.Flattened != 1 || nb.ClonesLeft != 1 || nb.BytesLeft != 8<<20 || !nb.Behind {
		t.Errorf("b: want partial with one clone (8 MiB) left: %+v", nb)
	}
	// Exactly the documented keys, none missing (DisallowUnknownFields catches extra ones).
	var keys struct {
		Nodes []map[string]any `json:"nodes"`
	}
	if err := json.Unmarshal([]byte(raw), &keys); err != nil {
		t.Fatal(err)
	}
	var got []string
	for k := range keys.Nodes[1] {
		got = append(got, k)
	}
	slices.Sort(got)
	want := "behind,bytes_left,clones_left,discovered,failed,failing,flattened,next_window,node,odd_version,pass_ended," +
		"pass_started,result,stale,stale_after,version,window_period_s,window_s,written"
	if strings.Join(got, ",") != want {
		t.Errorf("node keys\n %s, want\n %s", strings.Join(got, ","), want)
	}

	// A ghost: a's own summary, moved back so that two of its windows have passed without a
	// report. A newer node reported just now. And someone's junk.
	var ghost map[string]any
	vals, err := ioctx.GetOmapValues(lockImage+".nodes", "", a, 1)
	if err != nil || len(vals) != 1 || json.Unmarshal(vals[a], &ghost) != nil {
		t.Fatalf("a's entry: %v, %v", vals, err)
	}
	span := time.Duration(r.Nodes[0].PeriodSec+r.Nodes[0].WindowSec) * time.Second
	back := func(k string) {
		tm, _ := time.Parse(time.RFC3339Nano, ghost[k].(string))
		ghost[k] = tm.Add(-span - time.Hour).Format(time.RFC3339Nano)
	}
	for _, k := range []string{"pass_started", "pass_ended", "next_window", "written"} {
		back(k)
	}
	ghost["version"] = "0.1-old"
	newer := map[string]any{"version": "99.0", "result": "ok", "next_window": time.Now().Add(time.Hour).UTC(),
		"window_period_s": 86400, "window_s": 3600, "written": time.Now().UTC()}
	ghostJSON, _ := json.Marshal(ghost)
	newerJSON, _ := json.Marshal(newer)
	if err := ioctx.SetOmap(lockImage+".nodes", map[string][]byte{
		"ghost": ghostJSON, "newer": newerJSON, "junk": []byte("{not json"), "huge": bytes.Repeat([]byte("x"), 4096),
	}); err != nil {
		t.Fatal(err)
	}
	r, raw, stderr = fleetStatus(t, observer)
	byName := map[string]fleetNode{}
	for _, n := range r.Nodes {
		byName[n.Node] = n
	}
	if len(r.Nodes) != 4 || r.Ignored != 2 || !strings.Contains(stderr, "2 entries flattend did not write (ignored)") {
		t.Fatalf("want 4 nodes and 2 ignored entries:\n%s%s", raw, stderr)
	}
	if g := byName["ghost"]; !g.Stale || g.Behind || !time.Now().After(g.StaleAfter) {
		t.Errorf("ghost silent for two windows: %+v", g)
	}
	if byName[a].Stale || byName[b].Stale || byName["newer"].Stale {
		t.Errorf("live nodes flagged stale:\n%s", raw)
	}
	if !r.MixedVersions || r.Version != version || !byName["newer"].OddVersion || byName[a].OddVersion || r.Versions["0.1-old"] != 1 {
		t.Errorf("mixed versions not shown:\n%s", raw)
	}
	code, text := runCmd(t, time.Minute, "status", "--nodes", "--config", observer)
	if code != 0 || !strings.Contains(text, "4 nodes: 1 behind, 0 failing, 1 stale") || !strings.Contains(text, "MIXED, most run "+version) {
		t.Errorf("status --nodes: exit %d\n%s", code, text)
	}
	t.Logf("status --nodes:\n%s", text)
}
