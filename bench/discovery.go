package main

// The discovery measurement: a pool of N images (a few hundred clones among them), discovery
// against `rbd ls -l` on the same pool in the same run, in alternating order, and the RADOS
// operations each issues per image (the OSD's client op counter, osd.op, before and after).

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"sync"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"

	"github.com/flattend/flattend/internal/cephconn"
	"github.com/flattend/flattend/internal/discovery"
)

const discoveryPool = "bench-discovery"

type discoveryRound struct {
	Round   int     `json:"round"`
	OwnerS  float64 `json:"discovery_owner_s"`  // pool source, owner key, in process, on a reader as flattend's
	SharedS float64 `json:"discovery_shared_s"` // pool source, shared backlog (every clone), in process, on a reader
	// SharedTwoS is SharedS on a connection with librados' default 2 completion threads, and
	// ReaderRatio SharedS / SharedTwoS: what one thread (cephconn.ReaderThreads) costs.
	SharedTwoS  float64 `json:"discovery_shared_2_threads_s"`
	ReaderRatio float64 `json:"reader_ratio"`
	OpenAllS    float64 `json:"open_every_image_s"` // the previous way: open every image read-only, 8 at once
	RbdLsLS     float64 `json:"rbd_ls_l_s"`         // `rbd ls -l POOL`, whole process
	RbdLsS      float64 `json:"rbd_ls_s"`           // `rbd ls POOL`, whole process: its fixed cost
	OwnerRatio  float64 `json:"owner_ratio"`        // OwnerS / RbdLsLS
	SharedRatio float64 `json:"shared_ratio"`
}

type discoveryReport struct {
	When    time.Time        `json:"when"`
	Images  int              `json:"images"`
	Clones  int              `json:"clones"`
	Mine    int              `json:"mine"` // clones tagged for the measured node
	Rounds  []discoveryRound `json:"rounds"`
	Medians discoveryRound   `json:"medians"`
	// RADOS client ops counted by the OSD during one run, per image of the pool.
	OpsPerImageOwner   float64 `json:"ops_per_image_owner"`
	OpsPerImageShared  float64 `json:"ops_per_image_shared"`
	OpsPerImageOpenAll float64 `json:"ops_per_image_open_every_image"`
	OpsPerImageRbdLsL  float64 `json:"ops_per_image_rbd_ls_l"`
}

func benchDiscovery(conn *rados.Conn, images, clones, rounds int, out string) {
	cmd, _ := json.Marshal(map[string]any{"prefix": "osd pool create", "pool": discoveryPool, "pg_num": 8})
	if _, s, err := conn.MonCommand(cmd); err != nil {
		fail("creating pool: %v %s", err, s)
	}
	ioctx, err := conn.OpenIOContext(discoveryPool)
	check(err)
	defer ioctx.Destroy()
	check(rbd.PoolInit(ioctx, false))
	node := fmt.Sprintf("bench-%d", time.Now().Unix())
	rep := discoveryReport{When: time.Now().UTC(), Images: images, Clones: clones}

	existing, err := rbd.GetImageNames(ioctx)
	check(err)
	if len(existing) != 0 {
		fail("pool %s is not empty (%d images): use a fresh cluster (make bench)", discoveryPool, len(existing))
	}
	fmt.Printf("discovery: creating %d images (%d clones) in pool %s …\n", images, clones, discoveryPool)
	start := time.Now()
	opts := rbd.NewRbdImageOptions()
	check(rbd.CreateImage(ioctx, "golden", 64<<20, opts))
	opts.Destroy()
	img, err := rbd.OpenImage(ioctx, "golden", rbd.NoSnapshot)
	check(err)
	snap, err := img.CreateSnapshot("s")
	check(err)
	check(snap.Protect())
	img.Close()
	var wg sync.WaitGroup
	work := make(chan int)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				o := rbd.NewRbdImageOptions()
				var name, owner string
				if i <= clones {
					name = fmt.Sprintf("clone-%05d", i)
					check(rbd.CloneImage(ioctx, "golden", "s", ioctx, name, o))
					// a third each: this node's, another node's, untagged
					owner = []string{node, "other-node", ""}[i%3]
				} else {
					name = fmt.Sprintf("flat-%05d", i)
					check(rbd.CreateImage(ioctx, name, 1<<20, o))
					if i%2 == 0 {
						owner = "other-node" // tags left on flattened clones
					}
				}
				o.Destroy()
				if owner != "" {
					im, err := rbd.OpenImage(ioctx, name, rbd.NoSnapshot)
					check(err)
					check(im.SetMetadata("flattend.owner", owner))
					im.Close()
				}
			}
		}()
	}
	for i := 1; i < images; i++ {
		work <- i
	}
	close(work)
	wg.Wait()
	for i := 1; i <= clones; i++ {
		if i%3 == 0 {
			rep.Mine++
		}
	}
	fmt.Printf("discovery: created in %.1fs\n", time.Since(start).Seconds())

	owner := []discovery.Source{discovery.Pool{Pool: discoveryPool, OwnerKey: "flattend.owner", Node: node}}
	shared := []discovery.Source{discovery.Pool{Pool: discoveryPool, Shared: true, Node: node, Match: regexp.MustCompile("^clone-")}}
	// Discovery runs on a reader, as in flattend (cephconn.ReaderThreads); conn has librados'
	// default threads.
	reader := dial(map[string]string{"librados_thread_count": strconv.Itoa(cephconn.ReaderThreads)})
	defer reader.Shutdown()
	runFindOn := func(c *rados.Conn, srcs []discovery.Source, want int) float64 {
		t := time.Now()
		f, err := discovery.Find(context.Background(), c, srcs)
		check(err)
		if len(f.Clones) != want {
			fail("discovery found %d clones, want %d", len(f.Clones), want)
		}
		return time.Since(t).Seconds()
	}
	runFind := func(srcs []discovery.Source, want int) float64 { return runFindOn(reader, srcs, want) }
	runRbd := func(args ...string) float64 {
		t := time.Now()
		c := exec.Command("rbd", args...)
		c.Stdout = nil
		if o, err := c.CombinedOutput(); err != nil {
			fail("rbd %v: %v\n%s", args, err, o)
		}
		return time.Since(t).Seconds()
	}
	for r := range rounds {
		d := discoveryRound{Round: r}
		steps := []func(){
			func() { d.OwnerS = runFind(owner, rep.Mine) },
			func() { d.RbdLsLS = runRbd("ls", "-l", discoveryPool) },
			func() { d.SharedS = runFind(shared, clones) },
			func() { d.SharedTwoS = runFindOn(conn, shared, clones) },
			func() { d.RbdLsS = runRbd("ls", discoveryPool) },
			func() { d.OpenAllS = openEveryImage(ioctx, node) },
		}
		for i := range steps { // rotate the order every round
			steps[(i+r)%len(steps)]()
		}
		d.OwnerRatio, d.SharedRatio = d.OwnerS/d.RbdLsLS, d.SharedS/d.RbdLsLS
		d.ReaderRatio = d.SharedS / d.SharedTwoS
		rep.Rounds = append(rep.Rounds, d)
	}
	col := func(f func(discoveryRound) float64) float64 {
		var xs []float64
		for _, d := range rep.Rounds {
			xs = append(xs, f(d))
		}
		return median(xs)
	}
	rep.Medians = discoveryRound{Round: -1,
		OwnerS: col(func(d discoveryRound) float64 { return d.OwnerS }), SharedS: col(func(d discoveryRound) float64 { return d.SharedS }),
		OpenAllS: col(func(d discoveryRound) float64 { return d.OpenAllS }), RbdLsLS: col(func(d discoveryRound) float64 { return d.RbdLsLS }),
		RbdLsS: col(func(d discoveryRound) float64 { return d.RbdLsS }), OwnerRatio: col(func(d discoveryRound) float64 { return d.OwnerRatio }),
		SharedRatio: col(func(d discoveryRound) float64 { return d.SharedRatio }),
		SharedTwoS:  col(func(d discoveryRound) float64 { return d.SharedTwoS }), ReaderRatio: col(func(d discoveryRound) float64 { return d.ReaderRatio })}

	perImage := func(f func()) float64 {
		before := osdOps()
		f()
		return float64(osdOps()-before) / float64(images)
	}
	rep.OpsPerImageOwner = perImage(func() { runFind(owner, rep.Mine) })
	rep.OpsPerImageShared = perImage(func() { runFind(shared, clones) })
	rep.OpsPerImageOpenAll = perImage(func() { openEveryImage(ioctx, node) })
	rep.OpsPerImageRbdLsL = perImage(func() { runRbd("ls", "-l", discoveryPool) })

	fmt.Printf("discovery over %d images (%d clones, %d of them this node's), %d rounds, rotating order:\n", images, clones, rep.Mine, rounds)
	fmt.Printf("%5s %10s %10s %10s %10s %10s %10s %8s %8s %8s\n", "round", "owner", "shared", "shared-2t", "open-all", "rbd ls -l", "rbd ls", "own/ls-l", "shr/ls-l", "1t/2t")
	for _, d := range append(rep.Rounds, rep.Medians) {
		label := fmt.Sprint(d.Round)
		if d.Round < 0 {
			label = "med"
		}
		fmt.Printf("%5s %9.3fs %9.3fs %9.3fs %9.3fs %9.3fs %9.3fs %8.3f %8.3f %8.3f\n", label, d.OwnerS, d.SharedS, d.SharedTwoS, d.OpenAllS, d.RbdLsLS, d.RbdLsS, d.OwnerRatio, d.SharedRatio, d.ReaderRatio)
	}
	fmt.Printf("RADOS ops per image (osd.op delta / %d): owner %.2f, shared %.2f, open every image %.2f, rbd ls -l %.2f\n",
		images, rep.OpsPerImageOwner, rep.OpsPerImageShared, rep.OpsPerImageOpenAll, rep.OpsPerImageRbdLsL)
	check(os.MkdirAll(out, 0o755))
	js, _ := json.MarshalIndent(rep, "", "  ")
	path := filepath.Join(out, "discovery.json")
	check(os.WriteFile(path, append(js, '\n'), 0o644))
	fmt.Println("wrote", path)
}

// openEveryImage is how discovery worked before: open each image read-only, read the owner key
// and the parent, 8 at once.
func openEveryImage(ioctx *rados.IOContext, node string) float64 {
	t := time.Now()
	names, err := rbd.GetImageNames(ioctx)
	check(err)
	var wg sync.WaitGroup
	next := make(chan string)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := range next {
				img, err := rbd.OpenImageReadOnly(ioctx, n, rbd.NoSnapshot)
				check(err)
				if v, err := img.GetMetadata("flattend.owner"); err == nil && v == node {
					_, _ = img.GetParent()
				}
				img.Close()
			}
		}()
	}
	for _, n := range names {
		next <- n
	}
	close(next)
	wg.Wait()
	return time.Since(t).Seconds()
}

// osdOps reads osd.0's count of client operations.
func osdOps() uint64 {
	o, err := exec.Command("ceph", "tell", "osd.0", "perf", "dump").Output()
	check(err)
	var d struct {
		OSD struct {
			Op uint64 `json:"op"`
		} `json:"osd"`
	}
	check(json.Unmarshal(o, &d))
	return d.OSD.Op
}
