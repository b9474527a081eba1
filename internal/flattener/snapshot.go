package flattener

import (
	"errors"
	"fmt"
	"strings"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"
)

// InterruptedKey is the image-meta key set on a clone whose flatten was interrupted (its holder
// killed, cut off or fenced mid-flatten): its parent snapshot is then never removed
// automatically (docs/operations.md, "Known issues").
const InterruptedKey = "flattend.interrupted"

// MarkInterrupted records on t that a flatten of it was interrupted, with note saying when and by
// whom.
func MarkInterrupted(conn *rados.Conn, t Target, note string) error {
	ioctx, err := openPool(conn, t)
	if err != nil {
		return err
	}
	defer ioctx.Destroy()
	img, err := rbd.OpenImage(ioctx, t.Image, rbd.NoSnapshot)
	if err != nil {
		if errors.Is(err, rbd.ErrNotFound) {
			return fmt.Errorf("%s: %w", t, ErrNotFound)
		}
		return fmt.Errorf("opening %s: %w", t, err)
	}
	defer img.Close()
	if err := img.SetMetadata(InterruptedKey, note); err != nil {
		return fmt.Errorf("marking %s interrupted: %w", t, err)
	}
	return nil
}

// Interrupted returns the note MarkInterrupted left on t, "" if none.
func Interrupted(conn *rados.Conn, t Target) (string, error) {
	ioctx, err := openPool(conn, t)
	if err != nil {
		return "", err
	}
	defer ioctx.Destroy()
	img, err := rbd.OpenImageReadOnly(ioctx, t.Image, rbd.NoSnapshot)
	if err != nil {
		return "", fmt.Errorf("opening %s: %w", t, err)
	}
	defer img.Close()
	v, err := img.GetMetadata(InterruptedKey)
	if errors.Is(err, rbd.ErrNotFound) {
		return "", nil
	}
	return v, err
}

// Snapshot names one snapshot: the parent a clone was made from.
type Snapshot struct {
	Target
	Snap string
}

func (s Snapshot) String() string { return s.Target.String() + "@" + s.Snap }

// ParseSnapshot reads "pool/image@snap" or "pool/namespace/image@snap".
func ParseSnapshot(spec string) (Snapshot, error) {
	i := strings.LastIndexByte(spec, '@')
	if i < 0 || i == len(spec)-1 {
		return Snapshot{}, fmt.Errorf("%q is not pool/image@snap", spec)
	}
	t, err := ParseTarget(spec[:i])
	if err != nil {
		return Snapshot{}, err
	}
	return Snapshot{Target: t, Snap: spec[i+1:]}, nil
}

// RemoveIfUnused removes s when no clone depends on it any more (clones in the trash count: they
// still read from it), unprotecting it first. It returns whether it removed s and, if not, why.
// A snapshot that is already gone is not an error: another node flattened the last sibling first,
// or (clone v2) s was removed earlier and parked in the trash namespace, which librbd empties
// itself once the last child is flat.
func RemoveIfUnused(conn *rados.Conn, s Snapshot) (bool, string, error) {
	ioctx, err := openPool(conn, s.Target)
	if err != nil {
		return false, "", err
	}
	defer ioctx.Destroy()
	atSnap, err := rbd.OpenImageReadOnly(ioctx, s.Image, s.Snap)
	switch {
	case errors.Is(err, rbd.ErrNotFound):
		return false, "already gone", nil
	case err != nil:
		return false, "", fmt.Errorf("opening %s: %w", s, err)
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
	img, err := rbd.OpenImage(ioctx, s.Image, rbd.NoSnapshot)
	if err != nil {
		return false, "", fmt.Errorf("opening %s: %w", s.Target, err)
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
