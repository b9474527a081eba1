package flattener

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"

	"github.com/flattend/flattend/internal/librbd"
	"github.com/flattend/flattend/internal/rbdimage"
)

// Verified is what VerifyCopyups found and did.
type Verified struct {
	Checked  int      // objects the object map says exist, each looked up in RADOS
	Missing  []uint64 // of those, the ones RADOS lacks
	CopiedUp []uint64 // of the missing ones, those copied up from the parent (the others hold only zeros)
}

// VerifyParallel bounds the object lookups VerifyCopyups has in flight.
const VerifyParallel = 32

// VerifyCopyups looks up in RADOS every object of clone t that its object map says exists, and
// copies up from the parent each one that is missing. ctx ends it early (with its error).
//
// Why: librbd's copy-up marks an object as existing in the object map before it writes it. A
// flattening client that dies (or is fenced) between the two leaves the map saying "exists" for
// an object that was never written. Before Ceph tracker 68998 was fixed (see CopyupFixed), a
// flatten skips objects the map says exist, then detaches the parent: that object reads as zeros
// from then on. Markers cannot tell which clones are affected (a flatten may have been
// interrupted by anything), so every clone is verified before its flatten.
//
// It never takes the clone's lock, so a running VM is not disturbed: the clone is opened
// read-only, and a missing object is written with one RADOS operation that creates it only if
// it still does not exist, with the bytes the clone reads there now (its parent's). If a client
// wrote the object meanwhile, its own copy-up already holds the data, and ours is refused.
func VerifyCopyups(ctx context.Context, conn *rados.Conn, t rbdimage.Spec) (Verified, error) {
	img, err := rbdimage.Open(conn, t, rbdimage.ReadOnly)
	if err != nil {
		return Verified{}, err
	}
	defer img.Close()
	l, err := readLayout(conn, img)
	if err != nil || l == nil {
		return Verified{}, err // nil: no object map, or nothing shared with the parent
	}
	defer l.data.Destroy()
	states, err := readObjectMap(img.IOContext(), "rbd_object_map."+l.id)
	if err != nil {
		return Verified{}, fmt.Errorf("object map of %s: %w", t, err)
	}
	var exist []uint64
	for n, s := range states {
		if (s == objectExists || s == objectExistsClean) && l.extents(uint64(n))[0].off < l.overlap {
			exist = append(exist, uint64(n))
		}
	}
	v := Verified{Checked: len(exist)}
	if v.Missing, err = l.missing(ctx, exist); err != nil {
		return v, fmt.Errorf("looking up the objects of %s: %w", t, err)
	}
	for _, n := range v.Missing {
		wrote, err := l.copyUp(ctx, img, n)
		if err != nil {
			return v, fmt.Errorf("copying up object %d of %s: %w", n, t, err)
		}
		if wrote {
			v.CopiedUp = append(v.CopiedUp, n)
		}
	}
	return v, nil
}

// Object map states (librbd's OBJECT_*), two bits per object.
const (
	objectExists      = 1
	objectExistsClean = 3
)

// layout is where a clone's data lives: which RADOS object holds which image bytes.
type layout struct {
	id, prefix                      string
	objectSize, stripeUnit, stripes uint64
	overlap, size                   uint64
	data                            *rados.IOContext // the data pool (--data-pool), in the image's namespace
}

// readLayout reads img's layout; nil when nothing can have been lost (no object map, flat).
func readLayout(conn *rados.Conn, img *rbdimage.Image) (*layout, error) {
	t := img.Spec
	features, err := img.GetFeatures()
	if err != nil {
		return nil, fmt.Errorf("features of %s: %w", t, err)
	}
	if features&rbd.FeatureObjectMap == 0 {
		return nil, nil // librbd's flatten then copies up every object it cannot find
	}
	overlap, err := img.GetOverlap()
	if err != nil || overlap == 0 {
		return nil, err
	}
	info, err := img.Stat()
	if err != nil {
		return nil, fmt.Errorf("stat of %s: %w", t, err)
	}
	l := &layout{prefix: info.Block_name_prefix, objectSize: info.Obj_size, overlap: overlap, size: info.Size}
	if l.id, err = img.GetId(); err != nil {
		return nil, fmt.Errorf("id of %s: %w", t, err)
	}
	if l.stripeUnit, err = img.GetStripeUnit(); err == nil {
		l.stripes, err = img.GetStripeCount()
	}
	if err != nil || l.stripeUnit == 0 || l.stripes == 0 || l.objectSize%l.stripeUnit != 0 {
		return nil, fmt.Errorf("striping of %s (unit %d, count %d): %v", t, l.stripeUnit, l.stripes, err)
	}
	pool, errno := librbd.DataPoolID(img.IOContext(), t.Image)
	if errno != 0 {
		return nil, fmt.Errorf("data pool of %s: %w", t, errno)
	}
	if l.data, err = openPoolByID(conn, pool, t.Namespace); err != nil {
		return nil, fmt.Errorf("data pool of %s: %w", t, err)
	}
	return l, nil
}

func openPoolByID(conn *rados.Conn, id int64, namespace string) (*rados.IOContext, error) {
	name, err := conn.GetPoolByID(id)
	if err != nil {
		return nil, err
	}
	ioctx, err := conn.OpenIOContext(name)
	if err != nil {
		return nil, err
	}
	ioctx.SetNamespace(namespace)
	return ioctx, nil
}

func (l *layout) oid(n uint64) string { return fmt.Sprintf("%s.%016x", l.prefix, n) }

// extent is a range of image bytes.
type extent struct{ off, len uint64 }

// extents are the image ranges object n holds, in the order they sit in the object (RADOS
// striping: stripe units go round-robin over `stripes` objects of an object set).
func (l *layout) extents(n uint64) []extent {
	perObject := l.objectSize / l.stripeUnit
	set, pos := n/l.stripes, n%l.stripes
	out := make([]extent, 0, perObject)
	for k := range perObject {
		block := (set*perObject+k)*l.stripes + pos
		out = append(out, extent{off: block * l.stripeUnit, len: l.stripeUnit})
	}
	return out
}

// missing looks up objects, VerifyParallel at a time, and returns those RADOS lacks, sorted.
func (l *layout) missing(ctx context.Context, objects []uint64) ([]uint64, error) {
	work := make(chan uint64)
	found := make(chan uint64, len(objects))
	errs := make(chan error, VerifyParallel)
	done := make(chan struct{})
	workers := min(VerifyParallel, len(objects))
	for range workers {
		go func() {
			defer func() { done <- struct{}{} }()
			for n := range work {
				_, err := l.data.Stat(l.oid(n))
				switch {
				case errors.Is(err, rados.ErrNotFound):
					found <- n
				case err != nil:
					errs <- fmt.Errorf("object %d: %w", n, err)
					return
				}
			}
		}()
	}
	var first error
feed:
	for _, n := range objects {
		select {
		case work <- n:
		case first = <-errs:
			break feed
		case <-ctx.Done():
			first = context.Cause(ctx)
			break feed
		}
	}
	close(work)
	for range workers {
		<-done
	}
	if first == nil && len(errs) > 0 {
		first = <-errs
	}
	close(found)
	var out []uint64
	for n := range found {
		out = append(out, n)
	}
	slices.Sort(out)
	return out, first
}

// copyUp writes object n with what the clone reads there (its parent's bytes), creating it only
// if it still does not exist. It writes nothing when those bytes are all zeros: a missing object
// reads as zeros after the flatten too. It reports whether it wrote.
func (l *layout) copyUp(ctx context.Context, img *rbdimage.Image, n uint64) (bool, error) {
	if err := ctx.Err(); err != nil {
		return false, context.Cause(ctx)
	}
	data := make([]byte, 0, l.objectSize)
	for _, e := range l.extents(n) {
		chunk := make([]byte, min(e.len, l.size-min(e.off, l.size)))
		if len(chunk) > 0 {
			if _, err := img.ReadAt(chunk, int64(e.off)); err != nil {
				return false, err
			}
		}
		data = append(data, chunk...)
		data = data[:len(data)+int(e.len)-len(chunk)] // beyond the image's end: zeros
	}
	data = bytes.TrimRight(data, "\x00")
	if len(data) == 0 {
		return false, nil
	}
	op := rados.CreateWriteOp()
	defer op.Release()
	op.Create(rados.CreateExclusive)
	op.WriteFull(data)
	err := op.Operate(l.data, l.oid(n), rados.OperationNoFlag)
	if errors.Is(err, rados.ErrObjectExists) {
		return false, nil // a client wrote it since we looked: its copy-up holds the data
	}
	return err == nil, err
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
