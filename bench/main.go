// Command bench measures flattend on the throwaway test cluster and prints a table and a JSON
// file in bench/results for each bench. Run it with `make bench`; -benches picks some of them.
//
//	flatten    `flattend once` vs `rbd flatten` on twin clones of one parent, alternating order
//	           (AB BA …): flatten.json
//	discovery  discovery vs `rbd ls -l` over a pool of many images (bench/discovery.go): discovery.json
//	lock       3 `flattend once` processes × 12 small clones: handover gap, makespan vs the same
//	           flattens alone, `rbd flatten` in a loop, the mgr queue and a fixed-tick lock
//	           (bench/lockbench.go), and the gap at the RADOS level from the OSD's op history, no flattend
//	           log (bench/radosgap.go): lock.json, timeline.svg, timeline-fixed-tick*.svg
//	fleet      50 (and 10) simulated nodes on their own RADOS connections contending for the lock:
//	           gap, fairness, lock attempts and OSD ops per handover (bench/fleet.go): fleet.json
//	verify     the lost-copy-up verification before a flatten: objects looked up per second, and its
//	           time beside a fresh flatten of a twin clone (bench/verify.go): verify.json
//	throttle   flatten.concurrent_ops vs a client's write latency, and librbd QoS vs flatten
//	           (bench/throttle.go): throttle.json
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"
)

const pool = "bench"

type pair struct {
	Round          int     `json:"round"`
	FlattendFirst  bool    `json:"flattend_first"`
	FlattendProcS  float64 `json:"flattend_process_s"` // whole `flattend once`: connect, discovery, lock, flatten
	FlattendFlatS  float64 `json:"flattend_flatten_s"` // the flatten alone, from its log
	RbdProcS       float64 `json:"rbd_flatten_process_s"`
	ProcessRatio   float64 `json:"process_ratio"`
	FlattenRatio   float64 `json:"flatten_ratio"`
	FlattendResult string  `json:"flattend_result"`
}

type report struct {
	When          time.Time `json:"when"`
	CloneMiB      int       `json:"clone_mib"`
	ConcurrentOps int       `json:"concurrent_ops"`
	Pairs         []pair    `json:"pairs"`
	// Geometric means and medians of flattend ÷ rbd flatten, per pair.
	ProcessRatioGeomean float64 `json:"process_ratio_geomean"`
	ProcessRatioMedian  float64 `json:"process_ratio_median"`
	FlattenRatioGeomean float64 `json:"flatten_ratio_geomean"`
	FlattenRatioMedian  float64 `json:"flatten_ratio_median"`
}

var allBenches = []string{"discovery", "flatten", "resume", "verify", "lock", "fleet", "throttle"}

func main() {
	benches := flag.String("benches", strings.Join(allBenches, ","), "comma-separated benches to run: "+strings.Join(allBenches, ", "))
	mib := flag.Int("mib", 256, "flatten bench: clone size in MiB")
	pairs := flag.Int("pairs", 6, "flatten bench: twin-clone pairs (alternating order)")
	bin := flag.String("flattend", "bin/flattend", "flattend binary")
	out := flag.String("out", "bench/results", "directory for the JSON results")
	discImages := flag.Int("discovery-images", 2000, "images in the discovery bench's pool (0: skip it)")
	discOnly := flag.Bool("discovery-only", false, "run only the discovery bench (same as -benches discovery)")
	lockNodes := flag.Int("lock-nodes", 3, "lock bench: flattend processes")
	lockClones := flag.Int("lock-clones", 12, "lock bench: clones per node")
	lockMiB := flag.Int("lock-mib", 32, "lock bench: clone size in MiB")
	lockRounds := flag.Int("lock-rounds", 2, "lock bench: rounds (variants in rotating order)")
	lockTick := flag.Duration("lock-tick", 2*time.Second, "lock bench: the fixed-tick baseline's polling interval")
	lockHist := flag.Int("lock-osd-history", 20000, "lock bench: the OSD's op history size (osd_op_history_size) for the RADOS-level gaps")
	lockVariants := flag.String("lock-variants", "flattend,alone,rbd-cli,mgr,fixed-tick,fixed-tick-yield", "lock bench: variants")
	fleetSizes := flag.String("fleet-nodes", "10,50", "fleet bench: fleet sizes (simulated nodes) to run")
	fleetHandovers := flag.Int("fleet-handovers", 200, "fleet bench: handovers per fleet size (about)")
	fleetHold := flag.Duration("fleet-hold", 100*time.Millisecond, "fleet bench: how long each turn holds the lock")
	fleetBoMin := flag.Duration("fleet-backoff-min", 2*time.Second, "fleet bench: fallback backoff min (flattend's default)")
	fleetBoMax := flag.Duration("fleet-backoff-max", 2*time.Minute, "fleet bench: fallback backoff max (flattend's default)")
	thrMiB := flag.Int("throttle-mib", 512, "throttle bench: clone size in MiB")
	thrOps := flag.String("throttle-ops", "1,2,4,10,32", "throttle bench: concurrent_ops values")
	thrPace := flag.String("throttle-pace", "16,64", "throttle bench: flatten.max_bytes_per_second values to try, MiB/s (at concurrent_ops 10)")
	thrRounds := flag.Int("throttle-rounds", 2, "throttle bench: rounds (settings in rotating order)")
	thrBase := flag.Duration("throttle-baseline", 5*time.Second, "throttle bench: how long the client runs alone for its baseline")
	resMiB := flag.Int("resume-mib", 512, "resume bench: clone size in MiB")
	resRounds := flag.Int("resume-rounds", 4, "resume bench: rounds (fresh and halved twins, alternating order)")
	verMiB := flag.Int("verify-mib", 256, "verify bench: clone size in MiB (64 KiB objects)")
	verRounds := flag.Int("verify-rounds", 3, "verify bench: rounds")
	thrQoS := flag.Int("throttle-qos-mib", 32, "throttle bench: QoS limit to try on a flatten, MiB/s (0: skip)")
	flag.Parse()
	run := map[string]bool{}
	for _, b := range strings.Split(*benches, ",") {
		if b = strings.TrimSpace(b); b == "" {
			continue
		}
		if !slices.Contains(allBenches, b) {
			fail("unknown bench %q: use %s", b, strings.Join(allBenches, ", "))
		}
		run[b] = true
	}
	if *discOnly {
		run = map[string]bool{"discovery": true}
	}
	conf := os.Getenv("CEPH_CONF")
	if conf == "" {
		fail("CEPH_CONF is not set: run through `make bench` (test/run.sh starts a cluster)")
	}
	conn, err := rados.NewConnWithUser("admin")
	check(err)
	check(conn.ReadConfigFile(conf))
	check(conn.Connect())
	defer conn.Shutdown()
	start := time.Now()
	step := func(name string, f func()) {
		if !run[name] {
			return
		}
		t := time.Now()
		fmt.Printf("\n==== bench %s\n", name)
		f()
		fmt.Printf("==== bench %s took %s (%s in all)\n", name, time.Since(t).Round(time.Second), time.Since(start).Round(time.Second))
	}
	if *discImages > 0 {
		step("discovery", func() { benchDiscovery(conn, *discImages, *discImages*3/20, 5, *out) })
	}
	step("flatten", func() { benchFlatten(conn, conf, *bin, *out, *mib, *pairs) })
	step("resume", func() {
		waitForRoom(float64(*resMiB)/1024*3 + 1)
		benchResume(conf, *out, *resMiB, *resRounds)
	})
	step("verify", func() {
		waitForRoom(float64(*verMiB)/1024*4 + 1)
		benchVerify(conf, *out, *verMiB, *verRounds)
	})
	step("lock", func() {
		waitForRoom(3)
		benchLock(conn, *bin, *out, *lockNodes, *lockClones, *lockMiB, *lockRounds, *lockTick, strings.Split(*lockVariants, ","), *lockHist)
	})
	step("fleet", func() {
		benchFleet(conn, *out, ints(*fleetSizes), *fleetHandovers, *fleetHold, *fleetBoMin, *fleetBoMax)
	})
	step("throttle", func() {
		waitForRoom(float64(*thrMiB)/1024*3 + 1)
		benchThrottle(conn, *out, *thrMiB, ints(*thrOps), ints(*thrPace), *thrRounds, *thrBase, *thrQoS)
	})
}

func ints(s string) []int {
	var xs []int
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil || n < 1 {
			fail("%q: want positive integers separated by commas", s)
		}
		xs = append(xs, n)
	}
	return xs
}

// benchFlatten: `flattend once` vs `rbd flatten` on twin clones, alternating order.
func benchFlatten(conn *rados.Conn, conf, bin, out string, mib, pairs int) {
	cmd, _ := json.Marshal(map[string]any{"prefix": "osd pool create", "pool": pool, "pg_num": 8})
	if _, s, err := conn.MonCommand(cmd); err != nil {
		fail("creating pool: %v %s", err, s)
	}
	ioctx, err := conn.OpenIOContext(pool)
	check(err)
	defer ioctx.Destroy()
	check(rbd.PoolInit(ioctx, false))

	parent := fmt.Sprintf("parent-%d", time.Now().UnixNano())
	makeParent(ioctx, parent, uint64(mib)<<20)
	dir, err := os.MkdirTemp("", "flattend-bench")
	check(err)
	defer os.RemoveAll(dir)

	rep := report{When: time.Now().UTC(), CloneMiB: mib, ConcurrentOps: 10}
	for i := range pairs {
		node := fmt.Sprintf("bench-%d-%d", time.Now().Unix(), i)
		a, b := node+"-flattend", node+"-rbd"
		for _, c := range []string{a, b} {
			opts := rbd.NewRbdImageOptions()
			check(rbd.CloneImage(ioctx, parent, "s", ioctx, c, opts))
			opts.Destroy()
		}
		img, err := rbd.OpenImage(ioctx, a, rbd.NoSnapshot)
		check(err)
		check(img.SetMetadata("flattend.owner", node))
		img.Close()
		cfg := filepath.Join(dir, node+".yaml")
		check(os.WriteFile(cfg, []byte(fmt.Sprintf(`node: %s
ceph: {conf: %s, user: admin}
lock: {pool: %s, image: bench-lock}
flatten: {concurrent_ops: %d}
log: {format: json}
discovery: {pools: [{pool: %s}]}
`, node, conf, pool, rep.ConcurrentOps, pool)), 0o644))

		p := pair{Round: i, FlattendFirst: i%2 == 0}
		runFlattend := func() {
			start := time.Now()
			c := exec.Command(bin, "once", "--config", cfg)
			var logb bytes.Buffer
			c.Stderr = &logb
			if err := c.Run(); err != nil {
				fail("flattend once: %v\n%s", err, logb.String())
			}
			p.FlattendProcS = time.Since(start).Seconds()
			p.FlattendFlatS, p.FlattendResult = flattenFromLog(logb.Bytes())
		}
		runRbd := func() {
			start := time.Now()
			c := exec.Command("rbd", "flatten", "--no-progress", pool+"/"+b)
			if o, err := c.CombinedOutput(); err != nil {
				fail("rbd flatten: %v\n%s", err, o)
			}
			p.RbdProcS = time.Since(start).Seconds()
		}
		if p.FlattendFirst {
			runFlattend()
			runRbd()
		} else {
			runRbd()
			runFlattend()
		}
		if p.FlattendResult != "flat" {
			fail("flattend did not flatten %s: result %q", a, p.FlattendResult)
		}
		p.ProcessRatio = p.FlattendProcS / p.RbdProcS
		p.FlattenRatio = p.FlattendFlatS / p.RbdProcS
		rep.Pairs = append(rep.Pairs, p)
		removeImages(ioctx, []string{a, b}) // memstore: keep the cluster's memory for the later benches
	}
	var pr, fr []float64
	for _, p := range rep.Pairs {
		pr = append(pr, p.ProcessRatio)
		fr = append(fr, p.FlattenRatio)
	}
	rep.ProcessRatioGeomean, rep.ProcessRatioMedian = geomean(pr), median(pr)
	rep.FlattenRatioGeomean, rep.FlattenRatioMedian = geomean(fr), median(fr)

	fmt.Printf("flatten of a %d MiB clone, concurrent_ops %d: flattend once vs rbd flatten on twin clones\n", mib, rep.ConcurrentOps)
	fmt.Printf("%5s %6s %14s %14s %12s %9s %9s\n", "round", "first", "flattend proc", "flattend flat", "rbd flatten", "ratio(p)", "ratio(f)")
	for _, p := range rep.Pairs {
		first := "rbd"
		if p.FlattendFirst {
			first = "fl'd"
		}
		fmt.Printf("%5d %6s %13.2fs %13.2fs %11.2fs %9.3f %9.3f\n", p.Round, first, p.FlattendProcS, p.FlattendFlatS, p.RbdProcS, p.ProcessRatio, p.FlattenRatio)
	}
	fmt.Printf("ratio flattend÷rbd, whole process: geomean %.3f median %.3f\n", rep.ProcessRatioGeomean, rep.ProcessRatioMedian)
	fmt.Printf("ratio flattend÷rbd, flatten alone: geomean %.3f median %.3f\n", rep.FlattenRatioGeomean, rep.FlattenRatioMedian)

	check(os.MkdirAll(out, 0o755))
	js, _ := json.MarshalIndent(rep, "", "  ")
	path := filepath.Join(out, "flatten.json")
	check(os.WriteFile(path, append(js, '\n'), 0o644))
	fmt.Println("wrote", path)
}

func flattenFromLog(b []byte) (secs float64, result string) {
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		var e struct {
			Msg      string  `json:"msg"`
			Result   string  `json:"result"`
			Duration float64 `json:"duration"`
		}
		if json.Unmarshal(sc.Bytes(), &e) == nil && e.Msg == "flatten finished" {
			return e.Duration, e.Result
		}
	}
	return 0, ""
}

// makeParent writes size bytes of random data into a new image of 4 MiB objects, snapshots it
// as "s" and protects the snapshot.
func makeParent(ioctx *rados.IOContext, name string, size uint64) {
	makeParentObj(ioctx, name, size, 22)
}

func geomean(xs []float64) float64 {
	s := 0.0
	for _, x := range xs {
		s += math.Log(x)
	}
	return math.Exp(s / float64(len(xs)))
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func check(err error) {
	if err != nil {
		fail("%v", err)
	}
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "bench: "+format+"\n", args...)
	os.Exit(1)
}
