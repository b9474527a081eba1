package main

// The lock bench (issue 3, "Measure"): three `flattend once` processes with a dozen small clones
// each, started together, against the same flattens done other ways, in the same run and in
// rotating order:
//
//	flattend    3 processes × N clones, one slot, instant handover (watch/notify)
//	alone       the same number of flattens back to back on one connection, no lock: the floor
//	rbd-cli     `rbd flatten` one after the other (what a shell loop does)
//	mgr         `ceph rbd task add flatten` for every clone, then wait for the queue to empty
//	fixed-tick  3 nodes in this process, each trying the lock image's exclusive lock once per fixed
//	            tick (the seed's pattern, no notification), flattening with go-ceph Image.Flatten;
//	            a node that released goes on with its next clone at once
//	fixed-tick-yield  the same, but a node that released sleeps a tick first: turn-taking
//
// From flattend's JSON logs (debug level: "lock acquired", "lock released") it derives the
// handover gap: from one node's release of the lock to the next node's "flatten started".

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"

	"github.com/flattend/flattend/bench/timeline"
	"github.com/flattend/flattend/internal/cephconn"
	"github.com/flattend/flattend/internal/flattener"
	"github.com/flattend/flattend/internal/rbdimage"
)

const lockPool = "bench-lock"

type lockRun struct {
	Round   int    `json:"round"`
	Variant string `json:"variant"`
	Clones  int    `json:"clones"`
	// MakespanS: flattend and fixed-tick: first flatten start to last flatten finish; alone,
	// rbd-cli: the sum of the flattens; mgr: first task added to the queue empty.
	MakespanS float64 `json:"makespan_s"`
	// ProcessS: flattend: from starting the 3 processes to the last exit (connect, discovery …).
	ProcessS float64 `json:"process_s,omitempty"`
	// SumFlattenS: the flattens' own durations added up (flattend: from its logs).
	SumFlattenS float64 `json:"sum_flatten_s,omitempty"`
	// Handover gaps between nodes (flattend, fixed-tick).
	GapReleaseToStart   *dist `json:"gap_release_to_flatten_start,omitempty"` // "lock released" → next node's "flatten started"
	GapReleaseToAcquire *dist `json:"gap_release_to_lock_acquired,omitempty"` // "lock released" → next node's "lock acquired"
	GapFinishToStart    *dist `json:"gap_flatten_finished_to_next_start,omitempty"`
	Handovers           int   `json:"handovers,omitempty"` // between different nodes
	// Prep: flattend's work under the lock before the flatten starts (gates, in-use check, record).
	AcquireToStart *dist `json:"lock_acquired_to_flatten_start,omitempty"`
	// Rados: gaps from the OSD's op history, no flattend log (bench/radosgap.go).
	Rados *radosGap `json:"rados_gap,omitempty"`
}

type lockReport struct {
	When     time.Time `json:"when"`
	Nodes    int       `json:"nodes"`
	PerNode  int       `json:"clones_per_node"`
	CloneMiB int       `json:"clone_mib"`
	TickS    float64   `json:"fixed_tick_s"`
	Runs     []lockRun `json:"runs"`
	// Over all rounds: flattend's gaps pooled, and per-round ratios' medians.
	FlattendGapReleaseToStart   dist `json:"flattend_gap_release_to_flatten_start"`
	FlattendGapReleaseToAcquire dist `json:"flattend_gap_release_to_lock_acquired"`
	FlattendGapFinishToStart    dist `json:"flattend_gap_flatten_finished_to_next_start"`
	FlattendAcquireToStart      dist `json:"flattend_lock_acquired_to_flatten_start"`
	// The fixed-tick variants' gaps between nodes, flatten finished → next node's flatten started.
	FixedTickGapFinishToStart map[string]dist `json:"fixed_tick_gap_flatten_finished_to_next_start"`
	// Medians over rounds of flattend's makespan divided by …
	RatioOwnSum   float64            `json:"ratio_makespan_over_own_flatten_sum"` // … its own flattens' sum
	RatioVsOthers map[string]float64 `json:"ratio_makespan_over"`                 // … each other variant's makespan
	// Per variant, pooled over rounds: gaps from the OSD's op history (bench/radosgap.go).
	RadosGapSource string              `json:"rados_gap_source"`
	RadosGap       map[string]radosGap `json:"rados_gap"`
}

type lockEv struct {
	TS    time.Time `json:"ts"`
	Msg   string    `json:"msg"`
	Node  string    `json:"node"`
	Image string    `json:"image"`
	Dur   float64   `json:"duration"`
	Res   string    `json:"result"`
}

func benchLock(conn *rados.Conn, bin, out string, nodes, perNode, mib, rounds int, tick time.Duration, variants []string, histSize int) {
	ioctx := ensurePool(conn, lockPool)
	defer ioctx.Destroy()
	hist := newOSDHistory(conn, histSize)
	parent := "parent"
	fmt.Printf("lock: %d nodes × %d clones of %d MiB, %d round(s), variants %v\n", nodes, perNode, mib, rounds, variants)
	makeParentObj(ioctx, parent, uint64(mib)<<20, 22)
	dir, err := os.MkdirTemp("", "flattend-bench-lock")
	check(err)
	defer os.RemoveAll(dir)
	rep := lockReport{When: time.Now().UTC(), Nodes: nodes, PerNode: perNode, CloneMiB: mib, TickS: tick.Seconds(), RatioVsOthers: map[string]float64{}}
	var gRS, gRA, gFS, gAS []time.Duration
	tFS := map[string][]time.Duration{}

	for r := range rounds {
		for k := range variants {
			v := variants[(k+r)%len(variants)]
			// fresh clones for this run: names[node][i]
			names := make([][]string, nodes)
			var all []string
			for n := range nodes {
				for i := range perNode {
					name := fmt.Sprintf("%s-r%d-h%d-%02d", v, r, n+1, i)
					owner := ""
					if v == "flattend" {
						owner = fmt.Sprintf("lk%d-h%d", r, n+1)
					}
					clone(ioctx, parent, name, owner)
					names[n] = append(names[n], name)
					all = append(all, name)
				}
			}
			run := lockRun{Round: r, Variant: v, Clones: len(all)}
			ids, nodeOf, since := imageIDs(ioctx, all), cloneNodes(v, names), time.Now()
			fmt.Printf("lock: round %d, %s …\n", r, v)
			switch v {
			case "flattend":
				evs, procS := runFlattendNodes(bin, dir, r, nodes)
				run.ProcessS = procS
				rs, ra, fs, as, mk, sum, hand := flattendGaps(evs)
				run.MakespanS, run.SumFlattenS, run.Handovers = mk, sum, hand
				d1, d2, d3, d4 := distOf(rs), distOf(ra), distOf(fs), distOf(as)
				run.GapReleaseToStart, run.GapReleaseToAcquire, run.GapFinishToStart, run.AcquireToStart = &d1, &d2, &d3, &d4
				gRS, gRA, gFS, gAS = append(gRS, rs...), append(gRA, ra...), append(gFS, fs...), append(gAS, as...)
				if r == 0 {
					svg(out, "timeline.svg", fmt.Sprintf("flattend: %d nodes × %d clones of %d MiB, one slot", nodes, perNode, mib), dir, r, nodes)
				}
			case "alone":
				run.MakespanS = flattenAlone(conn, all)
				run.SumFlattenS = run.MakespanS
			case "rbd-cli":
				for _, c := range all {
					t := time.Now()
					if o, err := exec.Command("rbd", "flatten", "--no-progress", lockPool+"/"+c).CombinedOutput(); err != nil {
						fail("rbd flatten: %v\n%s", err, o)
					}
					run.MakespanS += time.Since(t).Seconds()
				}
				run.SumFlattenS = run.MakespanS
			case "mgr":
				run.MakespanS = mgrQueue(conn, all)
			case "fixed-tick", "fixed-tick-yield":
				bars := fixedTick(conn, names, tick, v == "fixed-tick-yield")
				var fs []time.Duration
				first, last := bars[0].From, bars[0].To
				for _, b := range bars {
					run.SumFlattenS += b.To.Sub(b.From).Seconds()
					first, last = minT(first, b.From), maxT(last, b.To)
				}
				for _, h := range timeline.Handovers(bars) {
					fs = append(fs, h.Next.Sub(h.Released))
				}
				run.MakespanS, run.Handovers = last.Sub(first).Seconds(), len(fs)
				d := distOf(fs)
				run.GapFinishToStart = &d
				tFS[v] = append(tFS[v], fs...)
				if r == 0 {
					writeSVG(out, "timeline-"+v+".svg", fmt.Sprintf("%s baseline (lock tried every %s, no handover): %d nodes × %d clones", v, tick, nodes, perNode), bars)
				}
			default:
				fail("unknown lock variant %q", v)
			}
			for _, c := range all {
				if !isFlat(ioctx, c) {
					fail("%s: %s is not flat after the run", v, c)
				}
			}
			run.Rados = hist.measure(v, since, ids, nodeOf, (mib+3)/4)
			fmt.Printf("lock: round %d, %-10s makespan %.2fs (sum of flattens %.2fs)\n", r, v, run.MakespanS, run.SumFlattenS)
			rep.Runs = append(rep.Runs, run)
			removeImages(ioctx, all)
		}
	}
	rep.FlattendGapReleaseToStart, rep.FlattendGapReleaseToAcquire = distOf(gRS), distOf(gRA)
	rep.FlattendGapFinishToStart, rep.FlattendAcquireToStart = distOf(gFS), distOf(gAS)
	rep.FixedTickGapFinishToStart = map[string]dist{}
	for k, v := range tFS {
		rep.FixedTickGapFinishToStart[k] = distOf(v)
	}
	own := []float64{}
	vs := map[string][]float64{}
	for r := range rounds {
		var fl *lockRun
		for i := range rep.Runs {
			if rep.Runs[i].Round == r && rep.Runs[i].Variant == "flattend" {
				fl = &rep.Runs[i]
			}
		}
		if fl == nil {
			continue
		}
		own = append(own, fl.MakespanS/fl.SumFlattenS)
		for _, o := range rep.Runs {
			if o.Round == r && o.Variant != "flattend" {
				vs[o.Variant] = append(vs[o.Variant], fl.MakespanS/o.MakespanS)
			}
		}
	}
	if len(own) > 0 {
		rep.RatioOwnSum = median(own)
	}
	for k, xs := range vs {
		rep.RatioVsOthers[k] = median(xs)
	}

	fmt.Printf("\nlock: %d nodes × %d clones of %d MiB (one slot), %d round(s), rotating order\n", nodes, perNode, mib, rounds)
	fmt.Printf("%5s %-11s %10s %10s %10s %9s %14s %14s\n", "round", "variant", "makespan", "sum flat", "process", "handovers", "gap p50", "gap p99")
	for _, r := range rep.Runs {
		gap := r.GapReleaseToStart
		if gap == nil {
			gap = r.GapFinishToStart
		}
		p50, p99 := "-", "-"
		if gap != nil {
			p50, p99 = fmt.Sprintf("%.1f ms", gap.P50MS), fmt.Sprintf("%.1f ms", gap.P99MS)
		}
		proc := "-"
		if r.ProcessS > 0 {
			proc = fmt.Sprintf("%.2fs", r.ProcessS)
		}
		fmt.Printf("%5d %-11s %9.2fs %9.2fs %10s %9d %14s %14s\n", r.Round, r.Variant, r.MakespanS, r.SumFlattenS, proc, r.Handovers, p50, p99)
	}
	fmt.Printf("flattend handover gap, release → next node's flatten start: %s\n", rep.FlattendGapReleaseToStart)
	fmt.Printf("flattend handover gap, release → next node's lock acquired:  %s\n", rep.FlattendGapReleaseToAcquire)
	fmt.Printf("flattend, flatten finished → next node's flatten started:    %s\n", rep.FlattendGapFinishToStart)
	fmt.Printf("flattend, lock acquired → flatten started (gates, checks):   %s\n", rep.FlattendAcquireToStart)
	for _, k := range slices.Sorted(maps.Keys(rep.FixedTickGapFinishToStart)) {
		fmt.Printf("%s, flatten finished → next node's flatten started: %s\n", k, rep.FixedTickGapFinishToStart[k])
	}
	fmt.Printf("flattend makespan ÷ its own flattens' sum: median %.3f\n", rep.RatioOwnSum)
	for _, k := range slices.Sorted(maps.Keys(rep.RatioVsOthers)) {
		fmt.Printf("flattend makespan ÷ %s makespan: median %.3f\n", k, rep.RatioVsOthers[k])
	}
	rep.RadosGapSource, rep.RadosGap = radosGapSource, hist.pooledMap()
	hist.print(rep.Runs)
	fmt.Println("wrote", writeJSON(out, "lock.json", rep))
}

func minT(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

func maxT(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

func logPath(dir string, round, node int) string {
	return filepath.Join(dir, fmt.Sprintf("r%d-h%d.log", round, node))
}

// runFlattendNodes starts `flattend once` for every node at the same moment and waits for them.
func runFlattendNodes(bin, dir string, round, nodes int) ([]lockEv, float64) {
	var cmds []*exec.Cmd
	var files []*os.File
	for n := 1; n <= nodes; n++ {
		node := fmt.Sprintf("lk%d-h%d", round, n)
		cfg := filepath.Join(dir, node+".yaml")
		check(os.WriteFile(cfg, []byte(fmt.Sprintf(`node: %s
ceph: {conf: %s, user: admin}
lock: {pool: %s, image: bench-lock}
log: {format: json, level: debug}
discovery: {pools: [{pool: %s}]}
`, node, os.Getenv("CEPH_CONF"), lockPool, lockPool)), 0o644))
		f, err := os.Create(logPath(dir, round, n))
		check(err)
		c := exec.Command(bin, "once", "--config", cfg)
		c.Stderr = f
		cmds, files = append(cmds, c), append(files, f)
	}
	start := time.Now()
	for _, c := range cmds {
		check(c.Start())
	}
	for i, c := range cmds {
		if err := c.Wait(); err != nil {
			b, _ := os.ReadFile(logPath(dir, round, i+1))
			fail("flattend once (node %d): %v\n%s", i+1, err, b)
		}
		files[i].Close()
	}
	procS := time.Since(start).Seconds()
	var evs []lockEv
	for n := 1; n <= nodes; n++ {
		f, err := os.Open(logPath(dir, round, n))
		check(err)
		sc := bufio.NewScanner(f)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			var e lockEv
			if json.Unmarshal(sc.Bytes(), &e) == nil && e.Msg != "" {
				evs = append(evs, e)
			}
		}
		f.Close()
	}
	slices.SortStableFunc(evs, func(a, b lockEv) int { return a.TS.Compare(b.TS) })
	return evs, procS
}

// flattendGaps pairs each node's "lock acquired" with its next "lock released" (a tenure), orders
// the tenures by acquisition and measures every handover between two nodes' consecutive tenures.
// (A release is logged once Unlock returned, so the next node's acquisition can be logged
// slightly before it: such a gap is negative.)
func flattendGaps(evs []lockEv) (relToStart, relToAcq, finToStart, acqToStart []time.Duration, makespan, sum float64, handovers int) {
	type tenure struct {
		node                 string
		acq, rel, start, fin time.Time
	}
	var ts []*tenure
	cur := map[string]*tenure{}
	var first, last time.Time
	for _, e := range evs {
		t := cur[e.Node]
		switch e.Msg {
		case "lock acquired":
			t = &tenure{node: e.Node, acq: e.TS}
			cur[e.Node] = t
			ts = append(ts, t)
		case "lock released":
			if t != nil {
				t.rel = e.TS
			}
			delete(cur, e.Node)
		case "flatten started":
			if first.IsZero() {
				first = e.TS
			}
			if t != nil {
				t.start = e.TS
				acqToStart = append(acqToStart, e.TS.Sub(t.acq))
			}
		case "flatten finished":
			if e.Res != "flat" {
				fail("flattend: %s on %s: %s", e.Image, e.Node, e.Res)
			}
			if t != nil {
				t.fin = e.TS
			}
			last = e.TS
			sum += e.Dur
		}
	}
	for i := 1; i < len(ts); i++ {
		p, n := ts[i-1], ts[i]
		if p.node == n.node || p.rel.IsZero() {
			continue
		}
		handovers++
		relToAcq = append(relToAcq, n.acq.Sub(p.rel))
		if !n.start.IsZero() {
			relToStart = append(relToStart, n.start.Sub(p.rel))
			if !p.fin.IsZero() {
				finToStart = append(finToStart, n.start.Sub(p.fin))
			}
		}
	}
	return relToStart, relToAcq, finToStart, acqToStart, last.Sub(first).Seconds(), sum, handovers
}

func svg(out, name, title, dir string, round, nodes int) {
	var bars []timeline.Bar
	for n := 1; n <= nodes; n++ {
		f, err := os.Open(logPath(dir, round, n))
		check(err)
		b, err := timeline.Parse(f, fmt.Sprintf("h%d", n))
		f.Close()
		check(err)
		bars = append(bars, b...)
	}
	writeSVG(out, name, title, bars)
}

func writeSVG(out, name, title string, bars []timeline.Bar) {
	check(os.MkdirAll(out, 0o755))
	p := filepath.Join(out, name)
	f, err := os.Create(p)
	check(err)
	check(timeline.WriteSVG(f, title, bars))
	check(f.Close())
	fmt.Println("wrote", p)
}

// flattenAlone flattens the clones back to back on one connection, as flattend does (its
// flattener, rbd_flatten_with_progress), without any lock: the floor for the makespan.
func flattenAlone(conn *rados.Conn, clones []string) float64 {
	start := time.Now()
	for _, c := range clones {
		check(flattener.Flatten(context.Background(), conn, rbdimage.Spec{Pool: lockPool, Image: c}, nil))
	}
	return time.Since(start).Seconds()
}

// mgrQueue queues every clone on the mgr's rbd task queue and waits until the queue is empty.
func mgrQueue(conn *rados.Conn, clones []string) float64 {
	start := time.Now()
	for _, c := range clones {
		cmd, _ := json.Marshal(map[string]any{"prefix": "rbd task add flatten", "image_spec": lockPool + "/" + c})
		if _, s, err := conn.MgrCommand([][]byte{cmd}); err != nil {
			fail("rbd task add flatten %s: %v %s", c, err, s)
		}
	}
	cmd, _ := json.Marshal(map[string]any{"prefix": "rbd task list", "format": "json"})
	deadline := time.Now().Add(30 * time.Minute)
	for time.Now().Before(deadline) {
		o, s, err := conn.MgrCommand([][]byte{cmd})
		if err != nil {
			fail("rbd task list: %v %s", err, s)
		}
		var tasks []json.RawMessage
		check(json.Unmarshal(o, &tasks))
		if len(tasks) == 0 {
			return time.Since(start).Seconds()
		}
		time.Sleep(100 * time.Millisecond)
	}
	fail("the mgr queue did not empty in 30 minutes")
	return 0
}

// fixedTick is the seed's pattern: each node tries the lock image's exclusive lock; when it is
// busy it sleeps a fixed tick and tries again. No notification: a release is noticed at the next
// tick. A node that just released goes on with its next clone at once (so it usually keeps the
// lock until its list is done). Each node has its own RADOS connection.
//
// With yield, a node that released sleeps a tick before it tries again, so that the others get
// their turn: turn-taking without notification.
func fixedTick(conn *rados.Conn, names [][]string, tick time.Duration, yield bool) []timeline.Bar {
	const lockImage = "tick-lock"
	ioctx, err := conn.OpenIOContext(lockPool)
	check(err)
	_, err = rbd.Create2(ioctx, lockImage, 1<<20, rbd.FeatureLayering|rbd.FeatureExclusiveLock, 22)
	if err != nil && !cephconn.IsErrno(err, syscall.EEXIST) {
		check(err)
	}
	ioctx.Destroy()
	var mu sync.Mutex
	var bars []timeline.Bar
	var wg sync.WaitGroup
	conns := make([]*rados.Conn, len(names))
	for n := range names {
		conns[n] = dial(nil)
	}
	for n, clones := range names {
		wg.Add(1)
		go func() {
			defer wg.Done()
			node := fmt.Sprintf("h%d", n+1)
			ioctx, err := conns[n].OpenIOContext(lockPool)
			check(err)
			defer ioctx.Destroy()
			for k, c := range clones {
				if yield && k > 0 {
					time.Sleep(tick)
				}
				var lk *rbd.Image
				for {
					lk, err = rbd.OpenImage(ioctx, lockImage, rbd.NoSnapshot)
					check(err)
					err = lk.LockAcquire(rbd.LockModeExclusive)
					if err == nil {
						break
					}
					_ = lk.Close()
					if !cephconn.IsErrno(err, syscall.EROFS) && !cephconn.IsErrno(err, syscall.EBUSY) {
						fail("fixed-tick: lock: %v", err)
					}
					time.Sleep(tick)
				}
				from := time.Now()
				img, err := rbd.OpenImage(ioctx, c, rbd.NoSnapshot)
				check(err)
				check(img.Flatten())
				check(img.Close())
				to := time.Now()
				check(lk.LockRelease())
				check(lk.Close())
				mu.Lock()
				bars = append(bars, timeline.Bar{Node: node, Image: lockPool + "/" + c, Result: "flat", From: from, To: to})
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	for _, c := range conns {
		c.Shutdown()
	}
	return bars
}
