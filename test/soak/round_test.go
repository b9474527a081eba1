package soak

import (
	"bytes"
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"time"
)

// round is one read of every slot and the clones due.
type round struct {
	before, after []string          // live owner of each slot ("" none), before and after the clones
	slotClients   map[string]bool   // every client that holds a slot's lock, live or not
	flattens      map[string]*owner // clone → its live lock owner
	dead          bool              // some lock had an owner without a watch
	at            time.Time
}

// torn says the slots changed owner while the round read the clones.
func (r round) torn() bool { return strings.Join(r.before, ",") != strings.Join(r.after, ",") }

// unslotted lists the flattens whose client holds no slot.
func (r round) unslotted() []string {
	var out []string
	for c, w := range r.flattens {
		if !r.slotClients[w.client] {
			out = append(out, c+" by "+w.String())
		}
	}
	sort.Strings(out)
	return out
}

func (o *observer) wrong(r round) bool { return len(r.flattens) > o.slots || len(r.unslotted()) > 0 }

func (o *observer) readSlots(r *round) ([]string, error) {
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
		}
	}
	return ids, nil
}

// readRound reads the slots, the clones due in round i, and the slots again.
func (o *observer) readRound(i int) (round, error) {
	r := round{slotClients: map[string]bool{}, flattens: map[string]*owner{}, at: time.Now()}
	var err error
	if r.before, err = o.readSlots(&r); err != nil {
		return r, err
	}
	o.mu.Lock()
	targets := append([]*target(nil), o.targets...)
	o.mu.Unlock()
	for k, tg := range targets {
		if o.isFlat(tg.name) && (k+i)%10 != 0 {
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
func (o *observer) observe(i int) error {
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

func (o *observer) record(r round) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.st.Rounds++
	if r.dead {
		o.st.DeadOwnerRounds++
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

// dropFenced removes the flattens whose client is blocklisted: it can write nothing more.
func (o *observer) dropFenced(r *round) error {
	out, _, err := o.conn.MonCommand([]byte(`{"prefix": "osd blocklist ls", "format": "json"}`))
	if err != nil {
		return err
	}
	// Pacific prints the address blocklist, then the range blocklist: two JSON arrays.
	fenced := map[string]bool{}
	dec := json.NewDecoder(bytes.NewReader(out))
	for dec.More() {
		var bl []struct {
			Addr string `json:"addr"`
		}
		if err := dec.Decode(&bl); err != nil {
			return fmt.Errorf("osd blocklist ls: %w", err)
		}
		for _, b := range bl {
			fenced[bareAddr(b.Addr)] = true
		}
	}
	for c, w := range r.flattens {
		if fenced[bareAddr(w.addr)] {
			delete(r.flattens, c)
		}
	}
	return nil
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

func (o *observer) violation(format string, args ...any) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.violationLocked(format, args...)
}

func (o *observer) violationLocked(format string, args ...any) {
	v := fmt.Sprintf(format, args...)
	o.st.ViolationCount++
	if len(o.st.Violations) < 10 { // the first ones tell the story; a wrong cluster repeats them
		o.st.Violations = append(o.st.Violations, v)
		o.t.Errorf("observer: %s", v)
	}
}

func (o *observer) stats() obsStats {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.st
}
