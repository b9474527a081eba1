package main

import (
	"context"
	"fmt"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"

	"github.com/flattend/flattend/internal/cephconn"
	"github.com/flattend/flattend/internal/flattener"
	"github.com/flattend/flattend/internal/rbdimage"
)

// verifyRound is one pair of twin clones of one parent: the verified one has every object
// written (the worst case: the object map says every object exists, so every one is looked up,
// and two of them were lost), the other is flattened fresh, for scale.
type verifyRound struct {
	Round          int     `json:"round"`
	Objects        int     `json:"objects_checked"`
	CopiedUp       int     `json:"objects_copied_up"`
	VerifyS        float64 `json:"verify_s"`
	ObjectsPerS    float64 `json:"objects_per_s"`
	FreshFlattenS  float64 `json:"fresh_flatten_s"`
	VerifyOverFlat float64 `json:"verify_over_fresh_flatten"`
}

type verifyReport struct {
	When          time.Time     `json:"when"`
	CloneMiB      int           `json:"clone_mib"`
	ObjectKiB     int           `json:"object_kib"`
	Parallel      int           `json:"lookups_in_flight"`
	Rounds        []verifyRound `json:"rounds"`
	ObjectsPerS   float64       `json:"objects_per_s_median"`
	RatioMedian   float64       `json:"verify_over_fresh_flatten_median"`
	Estimate100G  float64       `json:"estimate_100gib_4mib_objects_s"`
	CephVersion   string        `json:"ceph_version"`
	VerifyDefault bool          `json:"verify_on_by_default"`
}

// benchVerify measures the lost-copy-up verification flattend runs before each flatten on a
// librbd without the fix of Ceph tracker 68998: objects looked up per second, and its time beside
// a fresh flatten of a twin clone of the same size, measured in the same round.
func benchVerify(conf, out string, mib, rounds int) {
	const order, ops = 16, 10 // 64 KiB objects: many objects per MiB, the lookups' worst case
	conn, err := cephconn.Dial(cephconn.Options{ConfPath: conf, User: "admin", ConnectTimeout: 30 * time.Second, ConcurrentOps: ops})
	check(err)
	defer conn.Shutdown()
	const poolName = "bench-verify"
	ioctx := ensurePool(conn, poolName)
	defer ioctx.Destroy()
	parent := fmt.Sprintf("parent-%d", time.Now().UnixNano())
	makeParentObj(ioctx, parent, uint64(mib)<<20, order)

	rep := verifyReport{When: time.Now().UTC(), CloneMiB: mib, ObjectKiB: 1 << (order - 10), Parallel: flattener.VerifyParallel,
		CephVersion: flattener.CephVersion()}
	rep.VerifyDefault = !flattener.CopyupFixed(rep.CephVersion)
	for r := range rounds {
		written, fresh := fmt.Sprintf("written-%d", r), fmt.Sprintf("fresh-%d", r)
		clone(ioctx, parent, written, "")
		clone(ioctx, parent, fresh, "")
		writeEveryObject(ioctx, written, 2)
		vr := verifyRound{Round: r}
		start := time.Now()
		v, err := flattener.VerifyCopyups(context.Background(), conn, rbdimage.Spec{Pool: poolName, Image: written})
		check(err)
		vr.VerifyS = time.Since(start).Seconds()
		vr.Objects, vr.CopiedUp = v.Checked, len(v.CopiedUp)
		vr.ObjectsPerS = float64(v.Checked) / vr.VerifyS
		start = time.Now()
		check(flattener.Flatten(context.Background(), conn, rbdimage.Spec{Pool: poolName, Image: fresh}, nil))
		vr.FreshFlattenS = time.Since(start).Seconds()
		vr.VerifyOverFlat = vr.VerifyS / vr.FreshFlattenS
		rep.Rounds = append(rep.Rounds, vr)
		removeImages(ioctx, []string{written, fresh})
	}
	var rates, ratios []float64
	fmt.Printf("lost-copy-up verification: %d MiB clones of %d KiB objects, %d lookups in flight (Ceph %s: on by default = %v)\n",
		mib, rep.ObjectKiB, rep.Parallel, rep.CephVersion, rep.VerifyDefault)
	fmt.Printf("%5s %9s %9s %9s %11s %14s %14s\n", "round", "objects", "copied", "verify s", "objects/s", "fresh flatten s", "verify/flatten")
	for _, r := range rep.Rounds {
		rates, ratios = append(rates, r.ObjectsPerS), append(ratios, r.VerifyOverFlat)
		fmt.Printf("%5d %9d %9d %9.2f %11.0f %14.2f %14.3f\n", r.Round, r.Objects, r.CopiedUp, r.VerifyS, r.ObjectsPerS, r.FreshFlattenS, r.VerifyOverFlat)
	}
	rep.ObjectsPerS, rep.RatioMedian = median(rates), median(ratios)
	rep.Estimate100G = 25600 / rep.ObjectsPerS // 100 GiB of 4 MiB objects, every one written
	fmt.Printf("median: %.0f objects/s; verification ÷ fresh flatten of the same clone size: %.3f; a 100 GiB clone of 4 MiB objects, all written: about %.0f s\n",
		rep.ObjectsPerS, rep.RatioMedian, rep.Estimate100G)
	fmt.Println("wrote", writeJSON(out, "verify.json", rep))
}

// writeEveryObject writes one byte (the parent's) into every object of clone name, so that each
// is copied up and its object map says it exists, then removes lose of them from RADOS behind
// librbd's back: the state an interrupted flatten leaves.
func writeEveryObject(ioctx *rados.IOContext, name string, lose int) {
	img, err := rbd.OpenImage(ioctx, name, rbd.NoSnapshot)
	check(err)
	defer img.Close()
	st, err := img.Stat()
	check(err)
	b := make([]byte, 1)
	for n := uint64(0); n < st.Num_objs; n++ {
		_, err := img.ReadAt(b, int64(n*st.Obj_size))
		check(err)
		_, err = img.WriteAt(b, int64(n*st.Obj_size))
		check(err)
	}
	for i := range lose {
		check(ioctx.Delete(fmt.Sprintf("%s.%016x", st.Block_name_prefix, uint64(i)*st.Num_objs/uint64(lose))))
	}
}
