package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/ceph/go-ceph/rados"

	"github.com/flattend/flattend/internal/cephconn"
	"github.com/flattend/flattend/internal/flattener"
	"github.com/flattend/flattend/internal/rbdimage"
)

// resumeRound is one pair of twin clones: one flattened in one go, the other stopped at half way
// and resumed; the second half's time is compared with the whole fresh flatten.
type resumeRound struct {
	Round        int     `json:"round"`
	FreshS       float64 `json:"fresh_s"`
	FirstHalfS   float64 `json:"first_half_s"`
	SecondHalfS  float64 `json:"second_half_s"`
	StoppedAt    float64 `json:"stopped_at"` // fraction of objects done when the cancel took effect
	ResumeRatio  float64 `json:"second_half_over_fresh"`
	FreshFirst   bool    `json:"fresh_first"`
	ObjectsTotal uint64  `json:"objects"`
}

type resumeReport struct {
	When          time.Time     `json:"when"`
	CloneMiB      int           `json:"clone_mib"`
	ConcurrentOps int           `json:"concurrent_ops"`
	Rounds        []resumeRound `json:"rounds"`
	RatioMedian   float64       `json:"second_half_over_fresh_median"`
}

// benchResume measures what resuming saves: a flatten cancelled at 50 % (as at a window's end)
// and resumed later copies only the objects not yet copied, so its second half should take about
// half a fresh flatten, plus the fixed cost of starting.
func benchResume(conf, out string, mib, rounds int) {
	const ops = 10
	conn, err := cephconn.Dial(cephconn.Options{ConfPath: conf, User: "admin", ConnectTimeout: 30 * time.Second, ConcurrentOps: ops})
	check(err)
	defer conn.Shutdown()
	ioctx := ensurePool(conn, "bench-resume")
	defer ioctx.Destroy()
	parent := fmt.Sprintf("parent-%d", time.Now().UnixNano())
	makeParent(ioctx, parent, uint64(mib)<<20)

	rep := resumeReport{When: time.Now().UTC(), CloneMiB: mib, ConcurrentOps: ops}
	for r := range rounds {
		fresh, halved := fmt.Sprintf("fresh-%d", r), fmt.Sprintf("halved-%d", r)
		clone(ioctx, parent, fresh, "")
		clone(ioctx, parent, halved, "")
		rr := resumeRound{Round: r, FreshFirst: r%2 == 0}
		runFresh := func() { rr.FreshS = timeFlatten(context.Background(), conn, fresh, nil) }
		runHalved := func() {
			ctx, cancel := context.WithCancel(context.Background())
			var done, total uint64
			rr.FirstHalfS = timeFlatten(ctx, conn, halved, func(d, t uint64) {
				done, total = d, t
				if t > 0 && d*2 >= t {
					cancel()
				}
			})
			cancel()
			if total > 0 {
				rr.StoppedAt, rr.ObjectsTotal = float64(done)/float64(total), total
			}
			rr.SecondHalfS = timeFlatten(context.Background(), conn, halved, nil)
		}
		if rr.FreshFirst {
			runFresh()
			runHalved()
		} else {
			runHalved()
			runFresh()
		}
		rr.ResumeRatio = rr.SecondHalfS / rr.FreshS
		rep.Rounds = append(rep.Rounds, rr)
		removeImages(ioctx, []string{fresh, halved})
	}
	var ratios []float64
	fmt.Printf("resume after a cancel at 50 %%: %d MiB clone, concurrent_ops %d\n", mib, ops)
	fmt.Printf("%5s %9s %12s %12s %9s %14s\n", "round", "fresh s", "1st half s", "2nd half s", "stopped", "2nd half/fresh")
	for _, r := range rep.Rounds {
		ratios = append(ratios, r.ResumeRatio)
		fmt.Printf("%5d %9.2f %12.2f %12.2f %8.0f%% %14.2f\n", r.Round, r.FreshS, r.FirstHalfS, r.SecondHalfS, r.StoppedAt*100, r.ResumeRatio)
	}
	rep.RatioMedian = median(ratios)
	fmt.Printf("median second half ÷ fresh flatten: %.2f (1.00 would mean resuming saves nothing)\n", rep.RatioMedian)
	fmt.Println("wrote", writeJSON(out, "resume.json", rep))
}

// timeFlatten flattens name and returns the seconds it took; a cancel through ctx is expected and
// not an error.
func timeFlatten(ctx context.Context, conn *rados.Conn, name string, progress flattener.Progress) float64 {
	start := time.Now()
	err := flattener.Flatten(ctx, conn, rbdimage.Spec{Pool: "bench-resume", Image: name}, progress)
	if err != nil && !errors.Is(err, flattener.ErrCancelled) {
		fail("flatten %s: %v", name, err)
	}
	return time.Since(start).Seconds()
}
