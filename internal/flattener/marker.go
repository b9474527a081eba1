package flattener

import (
	"errors"
	"fmt"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"

	"github.com/flattend/flattend/internal/rbdimage"
)

// InterruptedKey is the image-meta key set on a clone whose flatten was interrupted (its holder
// killed, cut off or fenced mid-flatten): its parent snapshot is then never removed
// automatically (docs/operations.md, "Known issues").
const InterruptedKey = "flattend.interrupted"

// MarkInterrupted records on t that a flatten of it was interrupted, with note saying when and by
// whom.
func MarkInterrupted(conn *rados.Conn, t rbdimage.Spec, note string) error {
	img, err := rbdimage.Open(conn, t, rbdimage.ReadWrite)
	if err != nil {
		return err
	}
	defer img.Close()
	if err := img.SetMetadata(InterruptedKey, note); err != nil {
		return fmt.Errorf("marking %s interrupted: %w", t, err)
	}
	return nil
}

// Interrupted returns the note MarkInterrupted left on t, "" if none.
func Interrupted(conn *rados.Conn, t rbdimage.Spec) (string, error) {
	img, err := rbdimage.Open(conn, t, rbdimage.ReadOnly)
	if err != nil {
		return "", err
	}
	defer img.Close()
	v, err := img.GetMetadata(InterruptedKey)
	if errors.Is(err, rbd.ErrNotFound) {
		return "", nil
	}
	return v, err
}
