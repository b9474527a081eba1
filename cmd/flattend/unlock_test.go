package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/flattend/flattend/internal/lock"
)

func TestDescribeHolder(t *testing.T) {
	now := time.Now()
	var b bytes.Buffer
	lk := lock.Locker{Client: "client.4242", Addr: "10.0.0.1:0/77", Watching: true}
	st := lock.SlotStatus{Image: "rbd/flattend-lock", Owner: lk.Addr}
	describeHolder(&b, 0, st, lk, now)
	if !strings.Contains(b.String(), "locked by client.4242 at 10.0.0.1:0/77; it watches") || !strings.Contains(b.String(), "no holder record") {
		t.Errorf("no record: %q", b.String())
	}
	b.Reset()
	st.Holder = &lock.Record{Node: "h2\x1b[2J\nfake line", PID: 7, Client: "10.0.0.2:0/1", Since: now, Updated: now, Clone: "vms/a\x07"}
	describeHolder(&b, 0, st, lk, now)
	out := b.String()
	if strings.ContainsAny(out, "\x1b\x07") || strings.Contains(out, "\nfake line") ||
		!strings.Contains(out, `node "h2\x1b[2J\nfake line", pid 7`) || !strings.Contains(out, "a previous holder's") {
		t.Errorf("record: %q", out)
	}
}

func TestLooksAlive(t *testing.T) {
	now := time.Now()
	lk := lock.Locker{Client: "client.1", Addr: "a", Watching: true}
	fresh := &lock.Record{Client: "a", Updated: now}
	old := &lock.Record{Client: "a", Updated: now.Add(-time.Hour)}
	others := &lock.Record{Client: "b", Updated: now.Add(-time.Hour)}
	for _, c := range []struct {
		r        *lock.Record
		watching bool
		want     bool
	}{{nil, true, true}, {fresh, true, true}, {others, true, true}, {old, true, false}, {fresh, false, false}, {nil, false, false}} {
		lk.Watching = c.watching
		if got := looksAlive(lock.SlotStatus{Holder: c.r}, lk, now); got != c.want {
			t.Errorf("record %+v, watching %v: alive %v, want %v", c.r, c.watching, got, c.want)
		}
	}
}

func TestConfirmed(t *testing.T) {
	for in, want := range map[string]bool{"client.9\n": true, "  client.9 \n": true, "client.9": true, "h2\n": false, "": false, "\n": false} {
		var out bytes.Buffer
		if got := confirmed("client.9", strings.NewReader(in), &out); got != want || out.String() != `Type "client.9" to break the lock: ` {
			t.Errorf("%q: %v %q", in, got, out.String())
		}
	}
	if confirmed("", strings.NewReader("\n"), &bytes.Buffer{}) {
		t.Error("an empty word was confirmed by an empty answer")
	}
}
