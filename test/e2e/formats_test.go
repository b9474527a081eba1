package e2e

import (
	"bytes"
	"encoding/json"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"
)

// The JSON formats operators script against are pinned here, in types the tests own: a renamed,
// removed or added field fails the test, never passes unnoticed as it would if the tests decoded
// with the product's own types. (Adding a field is allowed by the documented contract, but must
// be added here and to docs/ deliberately.)

// statusJSON is `flattend status --json`, as docs/operations.md documents it.
type statusJSON struct {
	Time  time.Time `json:"time"`
	Slots []struct {
		Slot      int    `json:"slot"`
		LockImage string `json:"lock_image"`
		Owner     string `json:"owner"`
		Holder    *struct {
			Node    string    `json:"node"`
			Version string    `json:"version"`
			PID     int       `json:"pid"`
			Client  string    `json:"client"`
			Since   time.Time `json:"since"`
			Clone   string    `json:"clone"`
			Done    uint64    `json:"objects_done"`
			Total   uint64    `json:"objects"`
			Started time.Time `json:"clone_started"`
			Updated time.Time `json:"updated"`
		} `json:"holder"`
		Stale      bool     `json:"stale"`
		Percent    *float64 `json:"percent"`
		ElapsedSec *float64 `json:"elapsed_s"`
		ETASec     *float64 `json:"eta_s"`
		HeldSec    *float64 `json:"held_s"`
	} `json:"slots"`
	Waiting []struct {
		Node  string    `json:"node"`
		Since time.Time `json:"waiting_since"`
	} `json:"waiting"`
}

// statusKeysHeld is every key of `status --json` while a slot is held, flattening, with a waiter.
var statusKeysHeld = []string{
	"slots", "slots[].elapsed_s", "slots[].eta_s", "slots[].held_s", "slots[].holder",
	"slots[].holder.client", "slots[].holder.clone", "slots[].holder.clone_started", "slots[].holder.node",
	"slots[].holder.objects", "slots[].holder.objects_done", "slots[].holder.pid", "slots[].holder.since",
	"slots[].holder.updated", "slots[].holder.version", "slots[].lock_image", "slots[].owner", "slots[].percent", "slots[].slot",
	"slots[].stale", "time", "waiting", "waiting[].node", "waiting[].waiting_since",
}

// statusKeysFree is every key of `status --json` with nobody holding or waiting.
var statusKeysFree = []string{"slots", "slots[].lock_image", "slots[].slot", "slots[].stale", "time", "waiting"}

// planJSON is `flattend plan --json`, as docs/discovery.md documents it.
type planJSON struct {
	Node      string    `json:"node"`
	Generated time.Time `json:"generated"`
	Order     []string  `json:"order"`
	InUse     string    `json:"in_use"`
	Sources   []string  `json:"sources"`
	Clones    []struct {
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
	} `json:"clones"`
	Skipped []struct {
		Image  string `json:"image"`
		Source string `json:"source"`
		Reason string `json:"reason"`
	} `json:"skipped"`
}

// planKeys is every key of `plan --json` with clones and skipped images.
var planKeys = []string{
	"clones", "clones[].also_selected_by", "clones[].bytes_to_copy", "clones[].chain", "clones[].created",
	"clones[].depth", "clones[].image", "clones[].name", "clones[].namespace", "clones[].owner",
	"clones[].parent", "clones[].pool", "clones[].position", "clones[].reason", "clones[].shared",
	"clones[].size_bytes", "clones[].source", "clones[].users", "generated", "in_use", "node", "order",
	"skipped", "skipped[].image", "skipped[].reason", "skipped[].source", "sources",
}

// decodeStrict decodes out into v, failing on a field v does not know or trailing data.
func decodeStrict(t *testing.T, what, out string, v any) {
	t.Helper()
	dec := json.NewDecoder(strings.NewReader(out))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		t.Fatalf("%s: %v\n%s", what, err, out)
	}
	if dec.More() {
		t.Fatalf("%s: data after the JSON document:\n%s", what, out)
	}
}

// assertKeys checks that the key paths of the JSON document out ("slots[].holder.node") are
// exactly want.
func assertKeys(t *testing.T, what, out string, want []string) {
	t.Helper()
	var doc any
	d := json.NewDecoder(bytes.NewReader([]byte(out)))
	d.UseNumber()
	if err := d.Decode(&doc); err != nil {
		t.Fatalf("%s: %v\n%s", what, err, out)
	}
	seen := map[string]bool{}
	var walk func(path string, v any)
	walk = func(path string, v any) {
		switch v := v.(type) {
		case map[string]any:
			for k, c := range v {
				p := k
				if path != "" {
					p = path + "." + k
				}
				seen[p] = true
				walk(p, c)
			}
		case []any:
			for _, c := range v {
				walk(path+"[]", c)
			}
		}
	}
	walk("", doc)
	var got []string
	for k := range seen {
		got = append(got, k)
	}
	sort.Strings(got)
	w := slices.Sorted(slices.Values(want))
	if !slices.Equal(got, w) {
		var extra, missing []string
		for _, k := range got {
			if !slices.Contains(w, k) {
				extra = append(extra, k)
			}
		}
		for _, k := range w {
			if !slices.Contains(got, k) {
				missing = append(missing, k)
			}
		}
		t.Fatalf("%s: the format changed: unknown keys %v, missing keys %v\n%s", what, extra, missing, out)
	}
}
