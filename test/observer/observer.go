// Package observer is the tests' independent witness of mutual exclusion and fencing: it samples
// RADOS (the owners of the clones' and the slots' exclusive locks, their watchers, the
// blocklist) and never reads what flattend logs or writes about itself. The soak and the e2e
// fault tests share it.
package observer

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

// Observer counts running flattens from RADOS alone, never from the nodes' logs. Its rules:
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
type Observer struct {
	t         testing.TB
	conn      *rados.Conn
	ioctx     *rados.IOContext
	lockImage string
	slots     int
	mu        sync.Mutex
	isFlat    func(name string) bool
	targets   []*target // clones
	slotImgs  []*target
	st        Stats
	last      []string // live owner of each slot last seen
	seen      []Sighting
}

// Sighting is a client seen as the live owner of an image's lock, from the first to the last
// round that saw it (a round that saw it torn or unconfirmed counts too).
type Sighting struct {
	Image       string
	Slot        bool // Image is a slot's lock image, not a clone
	Owner       Owner
	First, Last time.Time
}

type target struct {
	name, header string
	img          *rbd.Image // read-only: no watch of its own
}

// Stats is what the observer saw, for the report.
type Stats struct {
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

// Owner is a live lock owner: the lock's client ("client.4123") and cookie, and its address.
type Owner struct{ Client, Cookie, Addr string }

func (w Owner) String() string { return w.Client + " " + w.Cookie }

// New returns an observer of the lock images lockImage, lockImage.1, … (slots of them, opened
// once flattend has made them) and of the clones given to Watch. Violations are t.Errorf'd.
//
// The images it opens are closed when the test ends, before conn and ioctx (made before New)
// are shut down: librados torn down under open images is undefined behaviour.
func New(t testing.TB, conn *rados.Conn, ioctx *rados.IOContext, lockImage string, slots int) *Observer {
	o := &Observer{t: t, conn: conn, ioctx: ioctx, lockImage: lockImage, slots: slots, last: make([]string, slots), isFlat: func(string) bool { return false }}
	t.Cleanup(o.closeImages)
	return o
}

// closeImages closes every image the observer opened; Run's rounds have ended (Run's cleanup
// runs before this one).
func (o *Observer) closeImages() {
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, tg := range slices.Concat(o.targets, o.slotImgs) {
		_ = tg.img.Close()
	}
	o.targets, o.slotImgs = nil, nil
}

// SetIsFlat tells the observer which clones are known flat: it reads them only every tenth round.
func (o *Observer) SetIsFlat(f func(name string) bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.isFlat = f
}

// Watch opens the clone name read-only for the observer and returns its header object.
func (o *Observer) Watch(name string) (string, error) { return o.watch(name, false) }

func (o *Observer) watch(name string, slot bool) (string, error) {
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
func (o *Observer) liveOwner(tg *target) (live *Owner, dead bool, n int, err error) {
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
				return &Owner{Client: info.Clients[i], Cookie: info.Cookies[i], Addr: info.Addrs[i]}, false, info.NumLockers, nil
			}
		}
	}
	return nil, true, info.NumLockers, nil
}

// Run samples every 100 ms until ctx ends or the test ends; the returned channel closes after
// the last round. A test that ends early (t.Fatal) still waits for the round in flight before
// its images and connection go.
func (o *Observer) Run(ctx context.Context) <-chan struct{} {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	o.t.Cleanup(func() { cancel(); <-done })
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
func (o *Observer) openSlots() {
	o.mu.Lock()
	have := len(o.slotImgs)
	o.mu.Unlock()
	if have == o.slots {
		return
	}
	name := o.lockImage
	if have > 0 {
		name = fmt.Sprintf("%s.%d", o.lockImage, have)
	}
	_, _ = o.watch(name, true)
}

// failed counts a round that could not be read (the OSDs paused, or a call timed out).
func (o *Observer) failed(err error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.st.FailedRounds++
	if len(o.st.Errors) < 5 && !slices.Contains(o.st.Errors, err.Error()) {
		o.st.Errors = append(o.st.Errors, err.Error())
	}
}
