package flattener_test

import (
	"bytes"
	"context"
	"slices"
	"testing"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"

	"github.com/flattend/flattend/internal/flattener"
	"github.com/flattend/flattend/internal/rbdimage"
	"github.com/flattend/flattend/test/cephtest"
)

// The state a flattening client leaves when it dies between marking an object as existing in the
// object map and writing it: the map says "exists", RADOS has no object. A flatten trusts the map,
// skips the object and loses its data (Pacific); VerifyCopyups copies it up first.
func TestVerifyCopyupsAfterLostCopyup(t *testing.T) {
	conn := dial(t, 10)
	ioctx := cephtest.IOContext(t, conn)
	p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 8<<20, 16) // 128 objects of 64 KiB
	clone := cephtest.Name(t, "clone")
	cephtest.Clone(t, ioctx, p, clone, "")
	target := rbdimage.Spec{Pool: cephtest.Pool, Image: clone}
	for _, obj := range []uint64{3, 100} { // 3: written, then lost again below
		cephtest.LoseCopyup(t, ioctx, clone, obj)
	}
	writeAt(t, ioctx, clone, 3*64<<10, []byte("kept")) // a client's write after the loss: object 3 exists again

	v, err := flattener.VerifyCopyups(context.Background(), conn, target)
	if err != nil || !slices.Equal(v.Missing, []uint64{100}) || !slices.Equal(v.CopiedUp, []uint64{100}) || v.Checked != 2 {
		t.Fatalf("VerifyCopyups = %+v, %v; want 2 checked, object 100 missing and copied up", v, err)
	}
	if again, err := flattener.VerifyCopyups(context.Background(), conn, target); err != nil || len(again.Missing) != 0 {
		t.Errorf("second VerifyCopyups = %+v, %v; want nothing missing", again, err)
	}
	if err := flattener.Flatten(context.Background(), conn, target, nil); err != nil {
		t.Fatal(err)
	}
	assertRegionEqualsParent(t, ioctx, p, clone, 100*64<<10, 64<<10)
	if got := readAt(t, ioctx, clone, 3*64<<10, 4); string(got) != "kept" {
		t.Errorf("the client's write to object 3 reads %q after the flatten", got)
	}
	if v, err := flattener.VerifyCopyups(context.Background(), conn, target); err != nil || v.Checked != 0 {
		t.Errorf("VerifyCopyups on a flat image = %+v, %v; want nothing checked", v, err)
	}
}

// A running VM owns its clone's exclusive lock. Verifying (and repairing) the clone must not take
// that lock from it: before, the repair took it with rbd_lock_acquire, which refuses the VM's
// requests for as long as the repair runs.
func TestVerifyCopyupsLeavesTheClientsLockAlone(t *testing.T) {
	conn := dial(t, 10)
	ioctx := cephtest.IOContext(t, conn)
	p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 8<<20, 16)
	clone := cephtest.Name(t, "clone")
	cephtest.Clone(t, ioctx, p, clone, "")
	cephtest.LoseCopyup(t, ioctx, clone, 100)

	vm, err := rbd.OpenImage(cephtest.IOContext(t, cephtest.Connect(t)), clone, rbd.NoSnapshot) // another client
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close()
	if _, err := vm.WriteAt([]byte("vm"), 5*64<<10); err != nil { // takes the exclusive lock
		t.Fatal(err)
	}
	before := cephtest.Lockers(t, ioctx, clone)
	if len(before) != 1 {
		t.Fatalf("lockers before = %q, want the VM", before)
	}
	v, err := flattener.VerifyCopyups(context.Background(), conn, rbdimage.Spec{Pool: cephtest.Pool, Image: clone})
	if err != nil || !slices.Equal(v.CopiedUp, []uint64{100}) {
		t.Fatalf("VerifyCopyups = %+v, %v; want object 100 copied up", v, err)
	}
	if after := cephtest.Lockers(t, ioctx, clone); !slices.Equal(after, before) {
		t.Fatalf("the clone's lock moved: lockers %q before, %q after", before, after)
	}
	if _, err := vm.WriteAt([]byte("vm2"), 6*64<<10); err != nil {
		t.Fatalf("the VM cannot write after the verification: %v", err)
	}
	if err := vm.Flatten(); err != nil { // as in_use: allow would: the flatten runs in the lock owner
		t.Fatal(err)
	}
	assertRegionEqualsParent(t, ioctx, p, clone, 100*64<<10, 64<<10)
}

// A clone whose data lives in another pool (rbd clone --data-pool), striped over 4 objects in
// 16 KiB units: the objects are looked up where they are, and a lost one is rebuilt from the
// image ranges that striping puts in it.
func TestVerifyCopyupsDataPoolAndStriping(t *testing.T) {
	conn := dial(t, 10)
	admin := cephtest.Connect(t)
	ioctx := cephtest.IOContext(t, conn)
	dataPool := cephtest.Pool + "-data"
	cephtest.EnsurePool(t, admin, dataPool)
	data := cephtest.PoolIOContext(t, conn, dataPool)
	p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 8<<20, 16)
	clone := cephtest.Name(t, "clone")
	opts := rbd.NewRbdImageOptions()
	defer opts.Destroy()
	for _, o := range []struct {
		opt rbd.ImageOption
		v   uint64
	}{{rbd.ImageOptionOrder, 16}, {rbd.ImageOptionStripeUnit, 16 << 10}, {rbd.ImageOptionStripeCount, 4}} {
		if err := opts.SetUint64(o.opt, o.v); err != nil {
			t.Fatal(err)
		}
	}
	if err := opts.SetString(rbd.ImageOptionDataPool, dataPool); err != nil {
		t.Fatal(err)
	}
	if err := rbd.CloneImage(ioctx, p.Name, p.Snap, ioctx, clone, opts); err != nil {
		t.Fatal(err)
	}
	for _, obj := range []uint64{6, 101} {
		cephtest.LoseCopyupIn(t, ioctx, data, clone, obj)
	}
	target := rbdimage.Spec{Pool: cephtest.Pool, Image: clone}
	v, err := flattener.VerifyCopyups(context.Background(), conn, target)
	if err != nil || !slices.Equal(v.CopiedUp, []uint64{6, 101}) || v.Checked != 2 {
		t.Fatalf("VerifyCopyups = %+v, %v; want objects 6 and 101 (of 2 checked) copied up", v, err)
	}
	if err := flattener.Flatten(context.Background(), conn, target, nil); err != nil {
		t.Fatal(err)
	}
	cephtest.AssertFlatAndIntact(t, ioctx, p, clone)
}

func writeAt(t *testing.T, ioctx *rados.IOContext, image string, off int64, b []byte) {
	t.Helper()
	img, err := rbd.OpenImage(ioctx, image, rbd.NoSnapshot)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if _, err := img.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

func readAt(t *testing.T, ioctx *rados.IOContext, image string, off int64, n int) []byte {
	t.Helper()
	img, err := rbd.OpenImageReadOnly(ioctx, image, rbd.NoSnapshot)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	b := make([]byte, n)
	if _, err := img.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	return b
}

// assertRegionEqualsParent fails unless image's n bytes at off equal its parent snapshot's.
func assertRegionEqualsParent(t *testing.T, ioctx *rados.IOContext, p cephtest.Parent, image string, off int64, n int) {
	t.Helper()
	snap, err := rbd.OpenImageReadOnly(ioctx, p.Name, p.Snap)
	if err != nil {
		t.Fatal(err)
	}
	defer snap.Close()
	want := make([]byte, n)
	if _, err := snap.ReadAt(want, off); err != nil {
		t.Fatal(err)
	}
	if got := readAt(t, ioctx, image, off, n); !bytes.Equal(got, want) {
		t.Errorf("%s at %d: %d bytes differ from the parent snapshot (lost copy-up)", image, off, n)
	}
}
