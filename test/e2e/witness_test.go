package e2e

import (
	"context"
	"fmt"
	"sort"
	"testing"

	"github.com/ceph/go-ceph/rados"

	"github.com/flattend/flattend/test/observer"
)

// witness is the observer (test/observer) of one test: it samples RADOS, never the daemons'
// logs, and fails the test itself when more than `slots` flattens run at once.
type witness struct {
	*observer.Observer
	conn      *rados.Conn
	lockImage string
	stop      func()
}

// watchRADOS starts a witness of lockImage's slots and of clones (all in ioctx's pool) until the
// test ends or finish.
func watchRADOS(t *testing.T, conn *rados.Conn, ioctx *rados.IOContext, lockImage string, slots int, clones ...string) *witness {
	t.Helper()
	o := observer.New(t, conn, ioctx, lockImage, slots)
	for _, c := range clones {
		if _, err := o.Watch(c); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := o.Run(ctx)
	w := &witness{Observer: o, conn: conn, lockImage: lockImage}
	w.stop = func() { cancel(); <-done } // also when the test ends: Run's own cleanup
	return w
}

// finish stops the witness and checks it saw what it must have: at least one flatten (else it
// is blind), at most slots at once.
func (w *witness) finish(t *testing.T) observer.Stats {
	t.Helper()
	w.stop()
	st := w.Stats()
	if st.MaxConcurrent == 0 {
		t.Errorf("the RADOS observer saw no flatten at all (%d rounds, %d failed %q): it is blind", st.Rounds, st.FailedRounds, st.Errors)
	}
	if st.ViolationCount > 0 {
		t.Errorf("the RADOS observer saw %d violations: %q", st.ViolationCount, st.Violations)
	}
	t.Logf("RADOS observer: %d rounds (%d torn, %d failed), max %d flattens at once, %d slot handovers",
		st.Rounds, st.TornRounds, st.FailedRounds, st.MaxConcurrent, st.Handovers)
	return st
}

// slotOwners lists the live owners seen on slot's lock image, in the order first seen.
func (w *witness) slotOwners(slot int) []observer.Sighting {
	img := w.lockImage
	if slot > 0 {
		img = fmt.Sprintf("%s.%d", w.lockImage, slot)
	}
	var out []observer.Sighting
	for _, s := range w.Sightings() {
		if s.Slot && s.Image == img {
			out = append(out, s)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].First.Before(out[j].First) })
	return out
}

// assertFenced checks, from RADOS alone, that the first client seen holding slot had its lock
// broken and was fenced: it flattened a clone, its address is in `ceph osd blocklist ls`, and it
// was never again seen owning any lock (slot or clone) once the next owner of the slot had begun
// flattening. A holder that was not fenced and wakes up (SIGCONT, a healed link) re-watches its
// clone and is seen owning it again.
func (w *witness) assertFenced(t *testing.T, slot int) observer.Owner {
	t.Helper()
	owners := w.slotOwners(slot)
	if len(owners) < 2 {
		t.Fatalf("the RADOS observer saw %d owners of slot %d, want the broken holder and its successor: %+v", len(owners), slot, owners)
	}
	old, next := owners[0].Owner, owners[1].Owner
	if old.Client == next.Client {
		t.Fatalf("slot %d: the first two owners are the same client %s", slot, old.Client)
	}
	var oldFlattened bool
	var nextFlattens []observer.Sighting
	for _, s := range w.Sightings() {
		if !s.Slot && s.Owner.Client == old.Client {
			oldFlattened = true
		}
		if !s.Slot && s.Owner.Client == next.Client {
			nextFlattens = append(nextFlattens, s)
		}
	}
	if !oldFlattened {
		t.Errorf("the RADOS observer never saw %s (the first holder of slot %d) own a clone's lock", old, slot)
	}
	if len(nextFlattens) == 0 {
		t.Fatalf("the RADOS observer never saw %s (the next holder of slot %d) own a clone's lock", next, slot)
	}
	nextFrom := nextFlattens[0].First
	for _, s := range nextFlattens {
		if s.First.Before(nextFrom) {
			nextFrom = s.First
		}
	}
	for _, s := range w.Sightings() {
		if s.Owner.Client == old.Client && s.Last.After(nextFrom) {
			t.Errorf("the broken holder %s still owned %s's lock at %s, after %s began flattening at %s: it was not fenced",
				old, s.Image, s.Last.Format("15:04:05.000"), next, nextFrom.Format("15:04:05.000"))
		}
	}
	if ok, err := observer.Blocklisted(w.conn, old.Addr); err != nil || !ok {
		t.Errorf("the broken holder %s at %s is not in `ceph osd blocklist ls` (err %v)", old, old.Addr, err)
	}
	t.Logf("slot %d: first %s (%s), then %s", slot, old, old.Addr, next)
	return old
}
