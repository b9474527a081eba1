package lock

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"

	"github.com/flattend/flattend/internal/cephconn"
)

// UnknownVersion is the version of a holder whose record names none.
const UnknownVersion = "unknown"

// SlotStatus is what any node can read about one slot.
type SlotStatus struct {
	Slot   int     `json:"slot"`
	Image  string  `json:"lock_image"`
	Owner  string  `json:"owner,omitempty"`  // client address of the current lock owner, "" if free
	Holder *Record `json:"holder,omitempty"` // what the holder wrote; may be stale
	// Stale is true when a record is there but its writer does not own the lock any more (it
	// was fenced, or died and its lock was broken), or has not refreshed it for StaleAfter
	// (it died, or hangs, and nobody has broken its lock yet).
	Stale bool `json:"stale"`
}

// ReadStatus reads every slot's owner and holder record. It changes nothing.
func ReadStatus(conn *rados.Conn, pool, image string, slots int) ([]SlotStatus, error) {
	now := time.Now()
	ioctx, err := cephconn.OpenPool(conn, pool)
	if err != nil {
		return nil, err
	}
	defer ioctx.Destroy()
	var out []SlotStatus
	for i := range max(slots, 1) {
		name := SlotImage(image, i)
		st := SlotStatus{Slot: i, Image: pool + "/" + name}
		// Lock owners can only be listed on an image opened read-write (it takes no lock).
		img, err := rbd.OpenImage(ioctx, name, rbd.NoSnapshot)
		if errors.Is(err, rbd.ErrNotFound) {
			out = append(out, st) // not created yet: free
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("opening lock image %s: %w", st.Image, cephconn.WithHint(err))
		}
		owners, err := img.LockGetOwners()
		if err == nil && len(owners) > 0 {
			st.Owner = owners[0].Owner
		}
		if v, err := img.GetMetadata(RecordKey); err == nil {
			var r Record
			if json.Unmarshal([]byte(v), &r) == nil {
				if r.Version == "" {
					r.Version = UnknownVersion // written by a build before versions were recorded
				}
				st.Holder = &r
				st.Stale = st.Owner == "" || (r.Client != "" && r.Client != st.Owner) || now.Sub(r.Updated) > StaleAfter
			}
		}
		_ = img.Close()
		out = append(out, st)
	}
	return out, nil
}

// Waiter is a node queued for a slot, as any node can read it.
type Waiter struct {
	Node  string    `json:"node"`
	Since time.Time `json:"waiting_since"` // by the waiter's own clock (the order is the cluster's)
}

// Queue is the queue of waiters as any node can read it.
type Queue struct {
	Waiters []Waiter
	// Ignored are the keys under the queue's prefix that flattend did not write (printed %q
	// when shown): nobody is notified for them, and the next release removes them.
	Ignored []string
}

// ReadQueue lists the nodes waiting for a slot, in the order releases will serve them. A node
// that died while waiting stays listed until its turn comes and it does not answer. It changes
// nothing.
func ReadQueue(conn *rados.Conn, pool, image string) ([]Waiter, error) {
	q, err := ReadQueueAll(conn, pool, image)
	return q.Waiters, err
}

// ReadQueueAll is ReadQueue with the entries it ignored.
func ReadQueueAll(conn *rados.Conn, pool, image string) (Queue, error) {
	ioctx, err := cephconn.OpenPool(conn, pool)
	if err != nil {
		return Queue{}, err
	}
	defer ioctx.Destroy()
	r, err := readQueue(ioctx, HandoverObject(image), image, 0, "")
	if errors.Is(err, rados.ErrNotFound) {
		return Queue{}, nil
	}
	if err != nil {
		return Queue{}, fmt.Errorf("reading the queue on %s/%s: %w", pool, HandoverObject(image), cephconn.WithHint(err))
	}
	q := Queue{Ignored: r.junk}
	for _, e := range r.entries {
		w := Waiter{Node: e.Node, Since: e.Since.UTC()}
		if w.Node == "" {
			w.Node = "client." + strconv.FormatUint(e.id, 10)
		}
		q.Waiters = append(q.Waiters, w)
	}
	return q, nil
}

// ErrNotHeld is returned by Break when the slot has no owner to break.
var ErrNotHeld = errors.New("the lock is not held")

// Locker is the client that owns a slot's lock, as Ceph lists it (not as a record says).
type Locker struct {
	Client string // its client id, "client.4157"
	Addr   string // its address, what the blocklist names
	// Watching is true while it watches the lock image: its connection is alive.
	Watching bool
}

// ReadLocker reads who owns slot's lock; a zero Locker when nobody does.
func ReadLocker(conn *rados.Conn, pool, image string, slot int) (Locker, error) {
	img, done, err := openSlot(conn, pool, image, slot)
	if err != nil {
		return Locker{}, err
	}
	defer done()
	_, lockers, err := img.ListLockers()
	if err != nil {
		return Locker{}, fmt.Errorf("lockers of %s/%s: %w", pool, SlotImage(image, slot), cephconn.WithHint(err))
	}
	if len(lockers) == 0 {
		return Locker{}, nil
	}
	l := Locker{Client: lockers[0].Client, Addr: lockers[0].Addr}
	_, l.Watching = lockOwner(img)
	return l, nil
}

func openSlot(conn *rados.Conn, pool, image string, slot int) (*rbd.Image, func(), error) {
	ioctx, err := cephconn.OpenPool(conn, pool)
	if err != nil {
		return nil, nil, err
	}
	name := SlotImage(image, slot)
	img, err := rbd.OpenImage(ioctx, name, rbd.NoSnapshot)
	if err != nil {
		ioctx.Destroy()
		return nil, nil, fmt.Errorf("opening lock image %s/%s: %w", pool, name, cephconn.WithHint(err))
	}
	return img, func() { _ = img.Close(); ioctx.Destroy() }, nil
}

// Break breaks the managed exclusive lock of one slot, for an operator whose holder is stuck: as
// librbd does when it takes a lock over, the owner's client is blocklisted first, so a holder
// that is only slow cannot go on writing; then Break checks the blocklist (Fence) and returns
// when the entry expires. An error wrapping ErrFenceUnverified or ErrNotFenced comes after the
// lock was broken. The holder's record stays on the lock image: the next holder sees it and
// repairs the clone it was flattening before anything else. owner must be the address the
// operator confirmed (from ReadLocker); if the lock changed hands since, nothing is broken.
func Break(conn *rados.Conn, pool, image string, slot int, owner string) (time.Time, error) {
	img, done, err := openSlot(conn, pool, image, slot)
	if err != nil {
		return time.Time{}, err
	}
	defer done()
	spec := pool + "/" + SlotImage(image, slot)
	owners, err := img.LockGetOwners()
	if err != nil && !errors.Is(err, rbd.ErrNotFound) {
		return time.Time{}, fmt.Errorf("lock owners of %s: %w", spec, cephconn.WithHint(err))
	}
	if len(owners) == 0 {
		return time.Time{}, fmt.Errorf("%s: %w", spec, ErrNotHeld)
	}
	if owners[0].Owner != owner {
		return time.Time{}, fmt.Errorf("%s: the lock changed hands (now %s, not %s): nothing broken", spec, owners[0].Owner, owner)
	}
	if err := img.LockBreak(owners[0].Mode, owner); err != nil {
		return time.Time{}, fmt.Errorf("breaking the lock of %s held by %s: %w", spec, owner, cephconn.WithHint(err))
	}
	return Fence(conn, owner)
}
