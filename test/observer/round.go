package observer

import (
	"bytes"
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/ceph/go-ceph/rados"
)

// round is one read of every slot and the clones due.
type round struct {
	before, after []string          // live owner of each slot ("" none), before and after the clones
	slotClients   map[string]bool   // every client that holds a slot's lock, live or not
	flattens      map[string]*Owner // clone → its live lock owner
	slotOwners    map[string]*Owner // slot lock image → its live owner, as last read
	dead          bool              // some lock had an owner without a watch
	at            time.Time
}

// torn says the slots changed owner while the round read the clones.
func (r round) torn() bool { return strings.Join(r.before, ",") != strings.Join(r.after, ",") }

// unslotted lists the flattens whose client holds no slot.
func (r round) unslotted() []string {
	var out []string
	for c, w := range r.flattens {
		if !r.slotClients[w.Client] {
			out = append(out, c+" by "+w.String())
		}
	}
	sort.Strings(out)
	return out
}

func (o *Observer) wrong(r round) bool { return len(r.flattens) > o.slots || len(r.unslotted()) > 0 }

func (o *Observer) readSlots(r *round) ([]string, error) {
	o.mu.Lock()
	slotImgs := append([]*target(nil), o.slotImgs...)
	o.mu.Unlock()
	ids := make([]string, o.slots)
	for i, tg := range slotImgs {
		info, err := o.ioctx.ListLockers(tg.header, "rbd_lock")
		if err != nil {
			return nil, err
		}
		if info.NumLockers > 1 {
			o.violation("slot %s has %d lockers: %v %v", tg.name, info.NumLockers, info.Clients, info.Cookies)
		}
		for _, c := range info.Clients {
			r.slotClients[c] = true
		}
		w, dead, _, err := o.liveOwner(tg)
		if err != nil {
			return nil, err
		}
		r.dead = r.dead || dead
		if w != nil {
			ids[i] = w.String()
			r.slotOwners[tg.name] = w
		} else {
			delete(r.slotOwners, tg.name)
		}
	}
	return ids, nil
}

// readRound reads the slots, the clones due in round i, and the slots again.
func (o *Observer) readRound(i int) (round, error) {
	r := round{slotClients: map[string]bool{}, flattens: map[string]*Owner{}, slotOwners: map[string]*Owner{}, at: time.Now()}
	var err error
	if r.before, err = o.readSlots(&r); err != nil {
		return r, err
	}
	o.mu.Lock()
	targets, isFlat := append([]*target(nil), o.targets...), o.isFlat
	o.mu.Unlock()
	for k, tg := range targets {
		if isFlat(tg.name) && (k+i)%10 != 0 {
			continue
		}
		w, dead, _, err := o.liveOwner(tg)
		if err != nil {
			return r, err
		}
		r.dead = r.dead || dead
		if w != nil {
			r.flattens[tg.name] = w
		}
	}
	r.after, err = o.readSlots(&r)
	return r, err
}

// observe takes round i, reading it again while it looks wrong and was torn; a wrong round that
// was not torn loses its fenced clients, and what is still wrong is a violation.
func (o *Observer) observe(i int) error {
	r, err := o.readRound(i)
	for try := 0; err == nil && o.wrong(r) && r.torn() && try < 3; try++ {
		o.mu.Lock()
		o.st.TornRounds++
		o.mu.Unlock()
		r, err = o.readRound(i)
	}
	if err != nil {
		return err
	}
	if o.wrong(r) && !r.torn() {
		if err := o.dropFenced(&r); err != nil {
			return err
		}
	}
	o.record(r)
	return nil
}

func (o *Observer) record(r round) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.st.Rounds++
	if r.dead {
		o.st.DeadOwnerRounds++
	}
	for img, w := range r.slotOwners {
		o.sawLocked(img, true, *w, r.at)
	}
	for img, w := range r.flattens {
		o.sawLocked(img, false, *w, r.at)
	}
	if o.wrong(r) && r.torn() {
		o.st.Unconfirmed++
		return
	}
	if n := len(r.flattens); n > o.st.MaxConcurrent {
		o.st.MaxConcurrent, o.st.MaxAt = n, fmt.Sprintf("%s: %v", r.at.Format(time.StampMilli), r.who())
	}
	if len(r.flattens) > o.slots {
		o.violationLocked("%d flattens at once at %s (slots %v): %v", len(r.flattens), r.at.Format(time.StampMilli), r.after, r.who())
	}
	if u := r.unslotted(); len(u) > 0 {
		o.violationLocked("flattens by clients that hold no slot at %s (slots %v): %v", r.at.Format(time.StampMilli), r.after, u)
	}
	for i, id := range r.after {
		if id != "" && id != o.last[i] {
			if o.last[i] != "" {
				o.st.Handovers++
			}
			o.last[i] = id
		}
	}
}

// sawLocked extends the sighting of w on img to at, or starts one.
func (o *Observer) sawLocked(img string, slot bool, w Owner, at time.Time) {
	for i := range o.seen {
		if s := &o.seen[i]; s.Image == img && s.Owner == w {
			s.Last = at
			return
		}
	}
	o.seen = append(o.seen, Sighting{Image: img, Slot: slot, Owner: w, First: at, Last: at})
}

// Sightings returns every live lock owner seen so far, in the order first seen.
func (o *Observer) Sightings() []Sighting {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]Sighting(nil), o.seen...)
}

// dropFenced removes the flattens whose client is blocklisted: it can write nothing more.
func (o *Observer) dropFenced(r *round) error {
	fenced, err := Blocklist(o.conn)
	if err != nil {
		return err
	}
	for c, w := range r.flattens {
		if fenced[bareAddr(w.Addr)] {
			delete(r.flattens, c)
		}
	}
	return nil
}

// Blocklist returns the addresses in the OSD map's blocklist (`ceph osd blocklist ls`), without
// their messenger prefix.
func Blocklist(conn *rados.Conn) (map[string]bool, error) {
	out, _, err := conn.MonCommand([]byte(`{"prefix": "osd blocklist ls", "format": "json"}`))
	if err != nil {
		return nil, fmt.Errorf("osd blocklist ls: %w", err)
	}
	// Pacific prints the address blocklist, then the range blocklist: two JSON arrays.
	fenced := map[string]bool{}
	dec := json.NewDecoder(bytes.NewReader(out))
	for dec.More() {
		var bl []struct {
			Addr string `json:"addr"`
		}
		if err := dec.Decode(&bl); err != nil {
			return nil, fmt.Errorf("osd blocklist ls: %w: %s", err, out)
		}
		for _, b := range bl {
			fenced[bareAddr(b.Addr)] = true
		}
	}
	return fenced, nil
}

// Blocklisted reports whether addr is in the OSD map's blocklist.
func Blocklisted(conn *rados.Conn, addr string) (bool, error) {
	bl, err := Blocklist(conn)
	return bl[bareAddr(addr)], err
}

// bareAddr drops the messenger prefix: "v1:10.0.0.2:0/123" → "10.0.0.2:0/123".
func bareAddr(a string) string {
	for _, p := range []string{"v1:", "v2:", "any:"} {
		a = strings.TrimPrefix(a, p)
	}
	return a
}

// who lists the flattens of r as "clone by client cookie".
func (r round) who() []string {
	var out []string
	for c, w := range r.flattens {
		out = append(out, c+" by "+w.String())
	}
	sort.Strings(out)
	return out
}

func (o *Observer) violation(format string, args ...any) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.violationLocked(format, args...)
}

func (o *Observer) violationLocked(format string, args ...any) {
	v := fmt.Sprintf(format, args...)
	o.st.ViolationCount++
	if len(o.st.Violations) < 10 { // the first ones tell the story; a wrong cluster repeats them
		o.st.Violations = append(o.st.Violations, v)
		o.t.Errorf("observer: %s", v)
	}
}

// Stats returns what the observer saw so far.
func (o *Observer) Stats() Stats {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.st
}
