package lock

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"

	"github.com/flattend/flattend/internal/cephconn"
)

// MaxSlots is the most slots a lock has (lock.slots is 1..64).
const MaxSlots = 64

// SlotsFound is how many slots the lock images in pool say the lock has: one more than the
// highest slot whose image exists, 0 when none does. An admin command without a config learns
// the lock's slots from it; nodes create every slot's image when they start.
func SlotsFound(conn *rados.Conn, pool, image string) (int, error) {
	ioctx, err := cephconn.OpenPool(conn, pool)
	if err != nil {
		return 0, err
	}
	defer ioctx.Destroy()
	names, err := rbd.GetImageNames(ioctx)
	if err != nil {
		return 0, fmt.Errorf("listing the images of pool %s: %w", pool, cephconn.WithHint(err))
	}
	n := 0
	for _, name := range names {
		if name == image {
			n = max(n, 1)
			continue
		}
		rest, ok := strings.CutPrefix(name, image+".")
		i, err := strconv.Atoi(rest)
		if ok && err == nil && i > 0 && i < MaxSlots && SlotImage(image, i) == name {
			n = max(n, i+1)
		}
	}
	return n, nil
}
