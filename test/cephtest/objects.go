package cephtest

import (
	"strings"
	"testing"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"

	"github.com/flattend/flattend/internal/flattener"
)

// DataObjects returns the RADOS objects that hold image's data (rbd_data.<id>.*), each with its
// object version: RADOS raises it on every write, so an object whose version did not change was
// not written, whatever the daemon says. It lists the whole pool on an I/O context of its own.
func DataObjects(t testing.TB, conn *rados.Conn, pool, image string) map[string]uint64 {
	t.Helper()
	return DataObjectsIn(t, conn, pool, pool, image)
}

// DataObjectsIn is DataObjects for an image of pool whose data lives in dataPool (--data-pool).
func DataObjectsIn(t testing.TB, conn *rados.Conn, pool, dataPool, image string) map[string]uint64 {
	t.Helper()
	img, err := openReadOnly(t, PoolIOContext(t, conn, pool), image, rbd.NoSnapshot)
	if err != nil {
		t.Fatalf("open %s: %v", image, err)
	}
	info, err := img.Stat()
	img.Close()
	if err != nil {
		t.Fatal(err)
	}
	ioctx := PoolIOContext(t, conn, dataPool) // GetLastVersion is per I/O context: not shared
	// rbd_data.<id>. in the image's pool, rbd_data.<pool id>.<id>. in a data pool.
	prefix := info.Block_name_prefix + "."
	var names []string
	if err := ioctx.ListObjects(func(oid string) {
		if strings.HasPrefix(oid, prefix) {
			names = append(names, oid)
		}
	}); err != nil {
		t.Fatalf("listing %s: %v", pool, err)
	}
	out := map[string]uint64{}
	for _, n := range names {
		if _, err := ioctx.Stat(n); err != nil {
			t.Fatalf("stat %s: %v", n, err)
		}
		v, err := ioctx.GetLastVersion()
		if err != nil {
			t.Fatal(err)
		}
		out[n] = v
	}
	return out
}

// AssertResumeSkipped checks, from the versions DataObjects read before and after a resumed
// flatten, that the resume wrote none of the objects already copied. A librbd with the fix of
// Ceph tracker 68998 no longer trusts the object map and sends a write to every object of the
// overlap (seen on 18.2.7: every version rose on the resume); there versions cannot tell a skip
// from a copy, and only the caller's content check stands.
func AssertResumeSkipped(t testing.TB, before, after map[string]uint64) {
	t.Helper()
	rewritten := 0
	for obj, v := range before {
		if after[obj] != v {
			rewritten++
		}
	}
	if v := flattener.CephVersion(); flattener.CopyupFixed(v) {
		t.Logf("librbd %s writes every object a flatten covers: %d of the %d objects copied before were written again (not evidence of a copy)", v, rewritten, len(before))
		return
	}
	if rewritten > 0 {
		t.Errorf("the resumed flatten rewrote %d of the %d objects copied before it", rewritten, len(before))
	}
}
