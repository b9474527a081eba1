package flattener

import (
	"errors"
	"fmt"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"

	"github.com/flattend/flattend/internal/rbdimage"
)

// RemoveIfUnused removes s when no clone depends on it any more (clones in the trash count: they
// still read from it), unprotecting it first. It returns whether it removed s and, if not, why.
// A snapshot that is already gone is not an error: another node flattened the last sibling first,
// or (clone v2) s was removed earlier and parked in the trash namespace, which librbd empties
// itself once the last child is flat.
func RemoveIfUnused(conn *rados.Conn, s rbdimage.Spec) (bool, string, error) {
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
	if protected, err := snap.IsProtected(); err != nil {
		if errors.Is(err, rbd.ErrNotFound) {
			return false, "already gone", nil
		}
		return false, "", fmt.Errorf("%s: %w", s, err)
	} else if protected {
		if err := snap.Unprotect(); err != nil {
			return false, "", fmt.Errorf("unprotecting %s: %w", s, err)
		}
	}
	if err := snap.Remove(); err != nil {
		if errors.Is(err, rbd.ErrNotFound) {
			return false, "already gone", nil
		}
		return false, "", fmt.Errorf("removing %s: %w", s, err)
	}
	return true, "", nil
}
