package flattener

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"

	"github.com/flattend/flattend/internal/rbdimage"
)

// Object map states (librbd's OBJECT_*), two bits per object.
const (
	objectExists      = 1
	objectExistsClean = 3
)

// RepairCopyups finds the objects of clone t that its object map says exist but that are missing
// in RADOS, and copies each one up from the parent. It returns their numbers.
//
// Why: librbd's copy-up marks an object as existing in the object map before it writes it. A
// flattening client that dies (or is fenced) between the two leaves the map saying "exists" for
// an object that was never written. Pacific's flatten skips objects the map says exist, then
// detaches the parent: that object reads as zeros from then on (fixed upstream after Pacific, in
// Ceph PR 61129; not backported). An object map rebuild does not help: it keeps "exists" on
// purpose. So before an interrupted flatten is resumed, each such object gets a real copy-up: a
// one-byte read (which falls through to the parent) written back (librbd's guarded write then
// copies the whole object up from the parent). The content is unchanged.
//
// It takes the clone's exclusive lock (breaking a dead flattener's lock, as librbd does, after
// its watch times out), so call it where nothing else writes the clone: under the cluster-wide
// lock. A clone without an object map needs nothing.
func RepairCopyups(conn *rados.Conn, t rbdimage.Spec) ([]uint64, error) {
	img, err := rbdimage.Open(conn, t, rbdimage.ReadWrite)
	if err != nil {
		return nil, err
	}
	defer img.Close()
	ioctx := img.IOContext()
	features, err := img.GetFeatures()
	if err != nil {
		return nil, fmt.Errorf("features of %s: %w", t, err)
	}
	if features&rbd.FeatureObjectMap == 0 {
		return nil, nil
	}
	overlap, err := img.GetOverlap()
	if err != nil || overlap == 0 {
		return nil, err // flat (or no parent data left): nothing can be lost
	}
	if err := img.LockAcquire(rbd.LockModeExclusive); err != nil {
		return nil, fmt.Errorf("taking the exclusive lock of %s: %w", t, err)
	}
	defer func() { _ = img.LockRelease() }()
	info, err := img.Stat()
	if err != nil {
		return nil, fmt.Errorf("stat of %s: %w", t, err)
	}
	id, err := img.GetId()
	if err != nil {
		return nil, fmt.Errorf("id of %s: %w", t, err)
	}
	states, err := readObjectMap(ioctx, "rbd_object_map."+id)
	if err != nil {
		return nil, fmt.Errorf("object map of %s: %w", t, err)
	}
	var repaired []uint64
	objects := min(uint64(len(states)), (overlap+info.Obj_size-1)/info.Obj_size)
	for i := range objects {
		if s := states[i]; s != objectExists && s != objectExistsClean {
			continue
		}
		_, err := ioctx.Stat(fmt.Sprintf("%s.%016x", info.Block_name_prefix, i))
		if err == nil {
			continue
		}
		if !errors.Is(err, rados.ErrNotFound) {
			return repaired, fmt.Errorf("stat of object %d of %s: %w", i, t, err)
		}
		b := make([]byte, 1)
		off := int64(i * info.Obj_size)
		if _, err := img.ReadAt(b, off); err != nil {
			return repaired, fmt.Errorf("reading object %d of %s: %w", i, t, err)
		}
		if _, err := img.WriteAt(b, off); err != nil {
			return repaired, fmt.Errorf("copying up object %d of %s: %w", i, t, err)
		}
		repaired = append(repaired, i)
	}
	return repaired, nil
}

// readObjectMap decodes an object map object (Ceph's BitVector<2>): a u32 header length, the
// header (u8 version, u8 compat, u32 length, u64 object count), then two bits per object, the
// first object in the most significant bits of each byte.
func readObjectMap(ioctx *rados.IOContext, oid string) ([]byte, error) {
	st, err := ioctx.Stat(oid)
	if err != nil {
		return nil, err
	}
	buf := make([]byte, st.Size)
	n, err := ioctx.Read(oid, buf, 0)
	if err != nil {
		return nil, err
	}
	buf = buf[:n]
	if len(buf) < 4+6+8 {
		return nil, fmt.Errorf("%s: %d bytes, too short", oid, len(buf))
	}
	headerLen := binary.LittleEndian.Uint32(buf[0:4])
	count := binary.LittleEndian.Uint64(buf[4+6 : 4+6+8])
	data := buf[min(uint64(len(buf)), 4+uint64(headerLen)):]
	if uint64(len(data)) < (count*2+7)/8 {
		return nil, fmt.Errorf("%s: %d objects but %d bytes of data", oid, count, len(data))
	}
	states := make([]byte, count)
	for i := range count {
		states[i] = (data[i/4] >> ((3 - i%4) * 2)) & 3
	}
	return states, nil
}
