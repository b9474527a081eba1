package soak

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"
)

// The observer counts running flattens from RADOS alone, never from the nodes' logs. Its rules:
//
//   - A flatten runs on a clone while a client owns the clone's exclusive lock (librbd takes it
//     to flatten, and flattend's mark on the clone takes it too) AND that client still watches
//     the clone's header. An owner without a watch is dead (killed, or cut off or stopped past
//     the watch timeout): librbd breaks its lock at the next request, and Ceph removes the watch
//     of a blocklisted client, so it writes nothing more.
//   - A stopped (SIGSTOP) or cut-off client keeps its watch until the watch timeout: it counts,
//     because it may wake up and go on.
//   - The same rules on the slot lock images say who owns each slot; a change of live owner is a
//     handover (a new process of the same node is a new client, so a restart counts too).
//   - One round reads the slots, then the clones, then the slots again; it is not atomic. A
//     round that sees more flattens than slots is read again at once: it counts only if it saw
//     the same slot owners before and after its clones, and only clients that are not
//     blocklisted (fenced) count in it.
//   - Every round reads the clones not yet known flat; flat ones are read every tenth round.
type observer struct {
	t        *testing.T
	conn     *rados.Conn
	ioctx    *rados.IOContext
	slots    int
	isFlat   func(name string) bool
	mu       sync.Mutex
	targets  []*target // clones
	slotImgs []*target
	st       obsStats
	last     []string // live owner of each slot last seen
}

type target struct {
	name, header string
	img          *rbd.Image // read-only: no watch of its own
}

// obsStats is what the observer saw, for the report.
type obsStats struct {
	Rounds          int      `json:"rounds"`
	TornRounds      int      `json:"torn_rounds"`
	FailedRounds    int      `json:"failed_rounds"`
	LongestGapS     float64  `json:"longest_gap_s"`
	MaxConcurrent   int      `json:"max_concurrent_flattens"`
	MaxAt           string   `json:"max_concurrent_at"`
	Handovers       int      `json:"handovers"`
	DeadOwnerRounds int      `json:"rounds_with_a_dead_lock_owner"`
	Unconfirmed     int      `json:"unconfirmed_rounds"`
	Errors          []string `json:"errors"` // of failed rounds, the first few distinct`
	ViolationCount  int      `json:"violation_count"`
	Violations      []string `json:"violations"` // the first 10
}

// owner is a live lock owner: the lock's client and cookie, and its address.
type owner struct{ client, cookie, addr string }

func (w owner) String() string { return w.client + " " + w.cookie }

func newObserver(t *testing.T, conn *rados.Conn, ioctx *rados.IOContext, slots int) *observer {
	return &observer{t: t, conn: conn, ioctx: ioctx, slots: slots, last: make([]string, slots), isFlat: func(string) bool { return false }}
}

// watch opens name read-only for the observer and returns its header object.
func (o *observer) watch(name string, slot bool) (string, error) {
	img, err := rbd.OpenImageReadOnly(o.ioctx, name, rbd.NoSnapshot)
	if err != nil {
		return "", fmt.Errorf("observer: open %s: %w", name, err)
	}
	id, err := img.GetId()
	if err != nil {
		img.Close()
		return "", err
	}
	tg := &target{name: name, header: "rbd_header." + id, img: img}
	o.mu.Lock()
	if slot {
		o.slotImgs = append(o.slotImgs, tg)
	} else {
		o.targets = append(o.targets, tg)
	}
	o.mu.Unlock()
	return tg.header, nil
}

// liveOwner returns tg's lock owner if it still watches tg's header, whether the lock had a
// dead owner, and how many lockers it has.
func (o *observer) liveOwner(tg *target) (live *owner, dead bool, n int, err error) {
	info, err := o.ioctx.ListLockers(tg.header, "rbd_lock")
	if errors.Is(err, rados.ErrNotFound) {
		return nil, false, 0, nil
	}
	if err != nil || info.NumLockers == 0 {
		return nil, false, 0, err
	}
	ws, err := tg.img.ListWatchers()
	if err != nil {
		return nil, false, 0, err
	}
	for i := range info.Clients {
		for _, w := range ws {
			if info.Clients[i] == fmt.Sprintf("client.%d", w.Id) && info.Cookies[i] == fmt.Sprintf("auto %d", w.Cookie) {
				return &owner{client: info.Clients[i], cookie: info.Cookies[i], addr: info.Addrs[i]}, false, info.NumLockers, nil
			}
		}
	}
	return nil, true, info.NumLockers, nil
}

// run samples every 100 ms until ctx ends; the returned channel closes after the last round.
func (o *observer) run(ctx context.Context) <-chan struct{} {
	done := make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		lastOK := time.Now()
		for i := 0; ; i++ {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			o.openSlots()
			if err := o.observe(i); err != nil {
				o.failed(err)
				continue
			}
			o.mu.Lock()
			o.st.LongestGapS = max(o.st.LongestGapS, time.Since(lastOK).Seconds())
			o.mu.Unlock()
			lastOK = time.Now()
		}
	}()
	return done
}

// openSlots opens the slot lock images once flattend has made them.
func (o *observer) openSlots() {
	o.mu.Lock()
	have := len(o.slotImgs)
	o.mu.Unlock()
	if have == o.slots {
		return
	}
	name := lockImage
	if have > 0 {
		name = fmt.Sprintf("%s.%d", lockImage, have)
	}
	_, _ = o.watch(name, true)
}

// failed counts a round that could not be read (the OSDs paused, or a call timed out).
func (o *observer) failed(err error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.st.FailedRounds++
	if len(o.st.Errors) < 5 && !slices.Contains(o.st.Errors, err.Error()) {
		o.st.Errors = append(o.st.Errors, err.Error())
	}
}
