package lock

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"

	"github.com/flattend/flattend/internal/cephconn"
)

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
	Since time.Time `json:"waiting_since"`
}

// ReadQueue lists the nodes waiting for a slot, in the order releases will serve them. A node
// that died while waiting stays listed until its turn comes and it does not answer. It changes
// nothing.
func ReadQueue(conn *rados.Conn, pool, image string) ([]Waiter, error) {
	ioctx, err := cephconn.OpenPool(conn, pool)
	if err != nil {
		return nil, err
	}
	defer ioctx.Destroy()
	vals, err := ioctx.GetAllOmapValues(HandoverObject(image), "", queuePrefix, 256)
	if errors.Is(err, rados.ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading the queue on %s/%s: %w", pool, HandoverObject(image), cephconn.WithHint(err))
	}
	keys := slices.Sorted(maps.Keys(vals))
	var out []Waiter
	for _, k := range keys {
		id, since, ok := parseQueueKey(k)
		if !ok {
			continue
		}
		var e queueEntry
		_ = json.Unmarshal(vals[k], &e)
		w := Waiter{Node: e.Node, Since: since.UTC()}
		if w.Node == "" {
			w.Node = "client." + strconv.FormatUint(id, 10)
		}
		out = append(out, w)
	}
	return out, nil
}

// ErrNotHeld is returned by Break when the slot has no owner to break.
var ErrNotHeld = errors.New("the lock is not held")

// Break breaks the managed exclusive lock of one slot, for an operator whose holder is stuck: as
// librbd does when it takes a lock over, the owner's client is blocklisted first, so a holder
// that is only slow cannot go on writing. The holder's record stays on the lock image: the next
// holder sees it and repairs the clone it was flattening before anything else. owner must be the
// owner the operator confirmed (from ReadStatus); if the lock changed hands since, nothing is
// broken and an error says so.
func Break(conn *rados.Conn, pool, image string, slot int, owner string) error {
	ioctx, err := cephconn.OpenPool(conn, pool)
	if err != nil {
		return err
	}
	defer ioctx.Destroy()
	name := SlotImage(image, slot)
	img, err := rbd.OpenImage(ioctx, name, rbd.NoSnapshot)
	if err != nil {
		return fmt.Errorf("opening lock image %s/%s: %w", pool, name, cephconn.WithHint(err))
	}
	defer img.Close()
	owners, err := img.LockGetOwners()
	if err != nil && !errors.Is(err, rbd.ErrNotFound) {
		return fmt.Errorf("lock owners of %s/%s: %w", pool, name, cephconn.WithHint(err))
	}
	if len(owners) == 0 {
		return fmt.Errorf("%s/%s: %w", pool, name, ErrNotHeld)
	}
	if owners[0].Owner != owner {
		return fmt.Errorf("%s/%s: the lock changed hands (now %s, not %s): nothing broken", pool, name, owners[0].Owner, owner)
	}
	if err := img.LockBreak(owners[0].Mode, owner); err != nil {
		return fmt.Errorf("breaking the lock of %s/%s held by %s: %w", pool, name, owner, cephconn.WithHint(err))
	}
	return nil
}
