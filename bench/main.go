// Command bench measures flattend against its reference on the throwaway test cluster:
// `flattend once` vs `rbd flatten` on twin clones of one parent, in alternating order (AB BA …),
// and prints a table and bench/results/flatten.json. Run it with `make bench`.
package main

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
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

func main() {
	mib := flag.Int("mib", 256, "clone size in MiB")
	pairs := flag.Int("pairs", 6, "twin-clone pairs (alternating order)")
	bin := flag.String("flattend", "bin/flattend", "flattend binary")
	out := flag.String("out", "bench/results", "directory for the JSON results")
	discImages := flag.Int("discovery-images", 2000, "images in the discovery bench's pool (0: skip it)")
	discOnly := flag.Bool("discovery-only", false, "run only the discovery bench (bench/discovery.go)")
	flag.Parse()
	conf := os.Getenv("CEPH_CONF")
	if conf == "" {
		fail("CEPH_CONF is not set: run through `make bench` (test/run.sh starts a cluster)")
	}
	conn, err := rados.NewConnWithUser("admin")
	check(err)
	check(conn.ReadConfigFile(conf))
	check(conn.Connect())
	defer conn.Shutdown()
	if *discImages > 0 {
		benchDiscovery(conn, *discImages, *discImages*3/20, 5, *out)
	}
	if *discOnly {
		return
	}
	cmd, _ := json.Marshal(map[string]any{"prefix": "osd pool create", "pool": pool, "pg_num": 8})
	if _, s, err := conn.MonCommand(cmd); err != nil {
		fail("creating pool: %v %s", err, s)
	}
	ioctx, err := conn.OpenIOContext(pool)
	check(err)
	defer ioctx.Destroy()
	check(rbd.PoolInit(ioctx, false))

	parent := fmt.Sprintf("parent-%d", time.Now().UnixNano())
	makeParent(ioctx, parent, uint64(*mib)<<20)
	dir, err := os.MkdirTemp("", "flattend-bench")
	check(err)
	defer os.RemoveAll(dir)

	rep := report{When: time.Now().UTC(), CloneMiB: *mib, ConcurrentOps: 10}
	for i := range *pairs {
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
			c := exec.Command(*bin, "once", "--config", cfg)
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
	}
	var pr, fr []float64
	for _, p := range rep.Pairs {
		pr = append(pr, p.ProcessRatio)
		fr = append(fr, p.FlattenRatio)
	}
	rep.ProcessRatioGeomean, rep.ProcessRatioMedian = geomean(pr), median(pr)
	rep.FlattenRatioGeomean, rep.FlattenRatioMedian = geomean(fr), median(fr)

	fmt.Printf("flatten of a %d MiB clone, concurrent_ops %d: flattend once vs rbd flatten on twin clones\n", *mib, rep.ConcurrentOps)
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

	check(os.MkdirAll(*out, 0o755))
	js, _ := json.MarshalIndent(rep, "", "  ")
	path := filepath.Join(*out, "flatten.json")
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

func makeParent(ioctx *rados.IOContext, name string, size uint64) {
	opts := rbd.NewRbdImageOptions()
	defer opts.Destroy()
	check(rbd.CreateImage(ioctx, name, size, opts))
	img, err := rbd.OpenImage(ioctx, name, rbd.NoSnapshot)
	check(err)
	defer img.Close()
	buf := make([]byte, 4<<20)
	for off := uint64(0); off < size; off += uint64(len(buf)) {
		_, _ = rand.Read(buf)
		_, err := img.WriteAt(buf[:min(uint64(len(buf)), size-off)], int64(off))
		check(err)
	}
	snap, err := img.CreateSnapshot("s")
	check(err)
	check(snap.Protect())
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
