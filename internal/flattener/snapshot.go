package flattener

import (
	"errors"
	"fmt"
	"syscall"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"

	"github.com/flattend/flattend/internal/cephconn"
	"github.com/flattend/flattend/internal/rbdimage"
)

// RemoveIfUnused removes s when no clone depends on it any more (clones in the trash count: they
// still read from it), unprotecting it first. It returns whether it removed s and, if not, why.
// A snapshot that is already gone is not an error: another node flattened the last sibling first,
// or (clone v2) s was removed earlier and parked in the trash namespace, which librbd empties
// itself once the last child is flat. Losing a race is not an error either: to another node
// removing s at the same time, or to a clone of s created after the children check.
func RemoveIfUnused(conn *rados.Conn, s rbdimage.Spec) (bool, string, error) {
	return removeIfUnused(conn, s, nil)
}

// removeIfUnused is RemoveIfUnused; beforeUnprotect, nil in production, runs between the
// children check and the unprotect, where a test makes the races happen.
func removeIfUnused(conn *rados.Conn, s rbdimage.Spec, beforeUnprotect func()) (bool, string, error) {
	atSnap, err := rbdimage.Open(conn, s, rbdimage.ReadOnly)
	switch {
	case errors.Is(err, rbdimage.ErrNotFound):
		return false, "already gone", nil
	case err != nil:
		return false, "", err
	}
	children, err := atSnap.ListChildrenAttributes()
	atSnap.Close()
	if err != nil {
		return false, "", fmt.Errorf("children of %s: %w", s, err)
	}
	if len(children) > 0 {
		c := children[0]
		where := c.PoolName + "/" + c.ImageName
		if c.Trash {
			where += " (in the trash)"
		}
		return false, fmt.Sprintf("%d clone(s) still depend on it, e.g. %s", len(children), where), nil
	}
	img, err := rbdimage.Open(conn, s.Head(), rbdimage.ReadWrite)
	if err != nil {
		return false, "", err
	}
	defer img.Close()
	snap := img.GetSnapshot(s.Snap)
	protected, err := snap.IsProtected()
	if err != nil {
		if errors.Is(err, rbd.ErrNotFound) {
			return false, "already gone", nil
		}
		return false, "", fmt.Errorf("%s: %w", s, err)
	}
	if beforeUnprotect != nil {
		beforeUnprotect()
	}
	if protected {
		// The children check and the unprotect are not atomic; librbd's unprotect checks again.
		switch err := snap.Unprotect(); {
		case err == nil, cephconn.IsErrno(err, syscall.EINVAL):
			// EINVAL: already unprotected, by another node removing it at the same time.
		case cephconn.IsNotFound(err):
			return false, "already gone", nil
		case cephconn.IsErrno(err, syscall.EBUSY):
			return false, "a clone of it was created while it was being removed", nil
		default:
			return false, "", fmt.Errorf("unprotecting %s: %w", s, err)
		}
	}
	id, idErr := img.GetSnapID(s.Snap)
	if err := snap.Remove(); err != nil {
		if errors.Is(err, rbd.ErrNotFound) {
			return false, "already gone", nil
		}
		return false, "", fmt.Errorf("removing %s: %w", s, err)
	}
	// Nothing stops a clone v2 of an unprotected snapshot between the children check and the
	// removal, and librbd then parks the snapshot in its trash namespace instead of removing it:
	// the clone stays intact, but the snapshot is no longer there to clone from. Say so.
	if idErr == nil {
		if ns, err := img.GetSnapNamespaceType(id); err == nil && ns == rbd.SnapNamespaceTypeTrash {
			return false, trashedByRace, nil
		}
	}
	return true, "", nil
}

// trashedByRace is RemoveIfUnused's reason when a clone v2 appeared during the removal.
const trashedByRace = "a clone of it was created while it was being removed: librbd moved it to its trash namespace (rbd snap ls --all) and removes it when that clone is flat; recreate the snapshot if it is still needed"
