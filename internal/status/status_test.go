package status_test

import (
	"bytes"
	"fmt"
	"testing"
	"time"

	"github.com/flattend/flattend/internal/lock"
	"github.com/flattend/flattend/internal/status"
)

var now = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

func rec(node string, since time.Duration, clone string, started time.Duration, done, total uint64) *lock.Record {
	r := &lock.Record{Node: node, Version: "1.2.3", PID: 42, Client: "client.4242 127.0.0.1:0/1", Since: now.Add(-since),
		Clone: clone, Done: done, Total: total, Updated: now.Add(-time.Second)}
	if started > 0 {
		r.Started = now.Add(-started)
	}
	return r
}

// One slot of each kind the table knows.
func fixture() ([]lock.SlotStatus, []lock.Waiter) {
	img := func(i int) string {
		if i == 0 {
			return "locks/flattend-lock"
		}
		return fmt.Sprintf("locks/flattend-lock-%d", i)
	}
	slots := []lock.SlotStatus{
		{Slot: 0, Image: img(0), Owner: "client.1", Holder: rec("hv1", 10*time.Minute, "vms/a", 100*time.Second, 25, 100)},
		{Slot: 1, Image: img(1), Owner: "client.2", Holder: rec("hv2", time.Minute, "", 0, 0, 0)},
		{Slot: 2, Image: img(2), Holder: rec("hv3", time.Hour, "vms/b", 30*time.Minute, 5, 10), Stale: true},
		{Slot: 3, Image: img(3), Owner: "client.4", Holder: rec("hv4", time.Hour, "vms/c", 30*time.Minute, 5, 10), Stale: true},
		{Slot: 4, Image: img(4)},
		{Slot: 5, Image: img(5), Owner: "client.6"},
		{Slot: 6, Image: img(6), Owner: "client.7", Holder: rec("hv7", 2*time.Second, "vms/d", time.Second, 0, 50)},
		{Slot: 7, Image: img(7), Owner: "client.8", Holder: rec("hv8", 3*time.Second, "vms/e", 0, 0, 0)},
	}
	waiting := []lock.Waiter{{Node: "hv9", Since: now.Add(-90 * time.Second)}, {Node: "hv10", Since: now.Add(-1500 * time.Millisecond)}}
	return slots, waiting
}

// Build's maths: percent = done/total, ETA = elapsed × left/done, held since the lock was taken;
// nothing for a stale record, no ETA before the first object, no progress without a clone.
func TestBuild(t *testing.T) {
	slots, waiting := fixture()
	r := status.Build(slots, waiting, now.In(time.FixedZone("UTC+1", 3600))) // reported in UTC
	type want struct{ held, elapsed, pct, eta *float64 }
	f := func(v float64) *float64 { return &v }
	for i, w := range []want{
		{held: f(600), elapsed: f(100), pct: f(25), eta: f(300)},
		{held: f(60)},
		{},
		{},
		{},
		{},
		{held: f(2), elapsed: f(1), pct: f(0)},
		{held: f(3)},
	} {
		s := r.Slots[i]
		for _, c := range []struct {
			name      string
			got, want *float64
		}{{"held_s", s.HeldSec, w.held}, {"elapsed_s", s.ElapsedSec, w.elapsed}, {"percent", s.Percent, w.pct}, {"eta_s", s.ETASec, w.eta}} {
			switch {
			case (c.got == nil) != (c.want == nil):
				t.Errorf("slot %d %s: got %v, want %v", i, c.name, str(c.got), str(c.want))
			case c.got != nil && *c.got != *c.want:
				t.Errorf("slot %d %s = %v, want %v", i, c.name, *c.got, *c.want)
			}
		}
	}
	if !r.Time.Equal(now) || r.Time.Location() != time.UTC {
		t.Errorf("Time = %v, want %v in UTC", r.Time, now)
	}
	waiting[0].Node = "changed"
	if r.Waiting[0].Node != "hv9" {
		t.Error("Build's report shares the caller's waiter slice")
	}
	if r := status.Build(slots[:1], nil, now); r.Waiting == nil {
		t.Error("Waiting is nil with nobody waiting: it must print as [], not null")
	}
}

func str(p *float64) any {
	if p == nil {
		return "none"
	}
	return *p
}

// The table, pinned here: column order, state words, rounding, and the queue's lines.
func TestWriteText(t *testing.T) {
	slots, waiting := fixture()
	var b bytes.Buffer
	if err := status.WriteText(&b, status.Build(slots, waiting, now)); err != nil {
		t.Fatal(err)
	}
	const want = `SLOT  LOCK IMAGE             STATE                NODE  VERSION  PID  CLONE  PROGRESS  ELAPSED  ETA
0     locks/flattend-lock    held                 hv1   1.2.3    42   vms/a  25%       1m40s    5m0s
1     locks/flattend-lock-1  held                 hv2   1.2.3    42   -      -         -        -
2     locks/flattend-lock-2  free (stale record)  hv3   1.2.3    42   vms/b  -         -        -
3     locks/flattend-lock-3  held (stale record)  hv4   1.2.3    42   vms/c  -         -        -
4     locks/flattend-lock-4  free                 -     -        -    -      -         -        -
5     locks/flattend-lock-5  held (no record)     -     -        -    -      -         -        -
6     locks/flattend-lock-6  held                 hv7   1.2.3    42   vms/d  0%        1s       -
7     locks/flattend-lock-7  held                 hv8   1.2.3    42   vms/e  -         -        -

waiting (2, first served first):
  1. hv9, for 1m30s
  2. hv10, for 2s
`
	if b.String() != want {
		t.Errorf("status table:\n%s\nwant:\n%s", b.String(), want)
	}
	b.Reset()
	if err := status.WriteText(&b, status.Build(slots[4:5], nil, now)); err != nil {
		t.Fatal(err)
	}
	if got := b.String(); got != "SLOT  LOCK IMAGE             STATE  NODE  VERSION  PID  CLONE  PROGRESS  ELAPSED  ETA\n4     locks/flattend-lock-4  free   -     -        -    -      -         -        -\n\nwaiting: nobody\n" {
		t.Errorf("status table with nobody waiting:\n%s", got)
	}
}

// `flattend status --json`, pinned here (field names, omissions, nulls), not with the product's
// own types: a renamed or dropped field fails this test.
func TestWriteJSON(t *testing.T) {
	slots, waiting := fixture()
	var b bytes.Buffer
	if err := status.WriteJSON(&b, status.Build(slots[:3], waiting[:1], now)); err != nil {
		t.Fatal(err)
	}
	const want = `{
  "time": "2026-01-02T03:04:05Z",
  "slots": [
    {
      "slot": 0,
      "lock_image": "locks/flattend-lock",
      "owner": "client.1",
      "holder": {
        "node": "hv1",
        "version": "1.2.3",
        "pid": 42,
        "client": "client.4242 127.0.0.1:0/1",
        "since": "2026-01-02T02:54:05Z",
        "clone": "vms/a",
        "objects_done": 25,
        "objects": 100,
        "clone_started": "2026-01-02T03:02:25Z",
        "updated": "2026-01-02T03:04:04Z"
      },
      "stale": false,
      "percent": 25,
      "elapsed_s": 100,
      "eta_s": 300,
      "held_s": 600
    },
    {
      "slot": 1,
      "lock_image": "locks/flattend-lock-1",
      "owner": "client.2",
      "holder": {
        "node": "hv2",
        "version": "1.2.3",
        "pid": 42,
        "client": "client.4242 127.0.0.1:0/1",
        "since": "2026-01-02T03:03:05Z",
        "objects_done": 0,
        "objects": 0,
        "updated": "2026-01-02T03:04:04Z"
      },
      "stale": false,
      "held_s": 60
    },
    {
      "slot": 2,
      "lock_image": "locks/flattend-lock-2",
      "holder": {
        "node": "hv3",
        "version": "1.2.3",
        "pid": 42,
        "client": "client.4242 127.0.0.1:0/1",
        "since": "2026-01-02T02:04:05Z",
        "clone": "vms/b",
        "objects_done": 5,
        "objects": 10,
        "clone_started": "2026-01-02T02:34:05Z",
        "updated": "2026-01-02T03:04:04Z"
      },
      "stale": true
    }
  ],
  "waiting": [
    {
      "node": "hv9",
      "waiting_since": "2026-01-02T03:02:35Z"
    }
  ]
}
`
	if b.String() != want {
		t.Errorf("status --json:\n%s\nwant:\n%s", b.String(), want)
	}
	b.Reset()
	if err := status.WriteJSON(&b, status.Build(nil, nil, now)); err != nil {
		t.Fatal(err)
	}
	if got := b.String(); got != "{\n  \"time\": \"2026-01-02T03:04:05Z\",\n  \"slots\": null,\n  \"waiting\": []\n}\n" {
		t.Errorf("status --json with no slots:\n%s", got)
	}
}
