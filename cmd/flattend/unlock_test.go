package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/flattend/flattend/internal/lock"
)

func TestDescribeHolder(t *testing.T) {
	var b bytes.Buffer
	st := lock.SlotStatus{Image: "flattend-lock", Owner: "client.4242"}
	if w := describeHolder(&b, 0, st); w != "client.4242" || !strings.Contains(b.String(), "held by an unknown holder (no record)\n  client client.4242\n") {
		t.Errorf("no record: %q, %q", w, b.String())
	}
	b.Reset()
	st.Holder = &lock.Record{Node: "h2", PID: 7, Since: time.Now(), Updated: time.Now(), Clone: "vms/a"}
	if w := describeHolder(&b, 0, st); w != "h2" || !strings.Contains(b.String(), "held by node h2 (pid 7) since ") {
		t.Errorf("record: %q, %q", w, b.String())
	}
}

func TestConfirmed(t *testing.T) {
	for in, want := range map[string]bool{"h2\n": true, "  h2 \n": true, "h2": true, "h3\n": false, "": false} {
		var out bytes.Buffer
		if got := confirmed("h2", strings.NewReader(in), &out); got != want || out.String() != `Type "h2" to break the lock: ` {
			t.Errorf("%q: %v %q", in, got, out.String())
		}
	}
}
