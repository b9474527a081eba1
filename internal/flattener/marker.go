package flattener

import (
	"errors"
	"fmt"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"

	"github.com/flattend/flattend/internal/rbdimage"
)

// FlatteningKey is the image-meta key flattend sets on a clone before it starts flattening it and
// removes after a clean end: a clone that carries it had a flatten interrupted (its holder killed,
// cut off or fenced). It lives on the clone so that every node, `status` and the parent
// snapshot's cleanup see it: a parent snapshot is never removed automatically while one of its
// clones carries it.
const FlatteningKey = "flattend.flattening"

// legacyInterruptedKey is what flattend 0.x left on a clone it had repaired.
const legacyInterruptedKey = "flattend.interrupted"

// MarkFlattening sets FlatteningKey on t to note (who flattens, since when) and returns the note
// an earlier, interrupted flatten left there ("" if none).
func MarkFlattening(conn *rados.Conn, t rbdimage.Spec, note string) (previous string, err error) {
	img, err := rbdimage.Open(conn, t, rbdimage.ReadWrite)
	if err != nil {
		return "", err
	}
	defer img.Close()
	if previous, err = readMark(img); err != nil {
		return "", err
	}
	if err := img.SetMetadata(FlatteningKey, note); err != nil {
		return "", fmt.Errorf("marking %s as being flattened: %w", t, err)
	}
	return previous, nil
}

// MarkInterrupted sets FlatteningKey on t to note unless t already carries a note: for a clone
// another node was flattening when it lost its slot.
func MarkInterrupted(conn *rados.Conn, t rbdimage.Spec, note string) error {
	img, err := rbdimage.Open(conn, t, rbdimage.ReadWrite)
	if err != nil {
		return err
	}
	defer img.Close()
	if _, err := img.GetParent(); errors.Is(err, rbd.ErrNotFound) {
		return nil // flat since: nothing left to lose
	}
	if old, err := readMark(img); err != nil || old != "" {
		return err
	}
	if err := img.SetMetadata(FlatteningKey, note); err != nil {
		return fmt.Errorf("marking %s interrupted: %w", t, err)
	}
	return nil
}

// ClearFlattening removes the marks from t after a clean end of its flatten.
func ClearFlattening(conn *rados.Conn, t rbdimage.Spec) error {
	img, err := rbdimage.Open(conn, t, rbdimage.ReadWrite)
	if err != nil {
		return err
	}
	defer img.Close()
	for _, key := range []string{FlatteningKey, legacyInterruptedKey} {
		if err := img.RemoveMetadata(key); err != nil && !errors.Is(err, rbd.ErrNotFound) {
			return fmt.Errorf("clearing %s on %s: %w", key, t, err)
		}
	}
	return nil
}

// Interrupted returns the note a flatten of t left that has not ended cleanly, "" if none.
func Interrupted(conn *rados.Conn, t rbdimage.Spec) (string, error) {
	img, err := rbdimage.Open(conn, t, rbdimage.ReadOnly)
	if err != nil {
		return "", err
	}
	defer img.Close()
	return readMark(img)
}

// readMark reads the mark on img, either key, "" if none.
func readMark(img *rbdimage.Image) (string, error) {
	for _, key := range []string{FlatteningKey, legacyInterruptedKey} {
		v, err := img.GetMetadata(key)
		switch {
		case err == nil && v != "":
			return v, nil
		case err != nil && !errors.Is(err, rbd.ErrNotFound):
			return "", fmt.Errorf("reading %s of %s: %w", key, img.Spec, err)
		}
	}
	return "", nil
}
