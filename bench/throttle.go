package main

// The throttle bench (issue 4, "Throttle"): for each flatten.concurrent_ops value, the flatten of
// a large clone (flattend's flattener, rbd_flatten_with_progress, on a connection with
// rbd_concurrent_management_ops set as flattend sets it) while a client does 4 KiB random writes
// at queue depth 1 on another image, timing each write; and the same client with no flatten as the
// baseline. Settings run in rotating order each round. Then: does librbd's QoS
// (rbd_qos_bps_limit, set on an image with `rbd config image set`) slow a flatten at all?

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os/exec"
	"strconv"
	"sync"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"

	"github.com/flattend/flattend/internal/flattener"
	"github.com/flattend/flattend/internal/rbdimage"
)

const throttlePool = "bench-throttle"

type throttleRun struct {
	Round         int     `json:"round"`
	ConcurrentOps int     `json:"concurrent_ops"`          // 0: baseline, no flatten
	PaceMiB       int     `json:"max_mib_per_s,omitempty"` // flatten.max_bytes_per_second, MiB; 0: none
	FlattenS      float64 `json:"flatten_s,omitempty"`
	MBps          float64 `json:"flatten_mb_per_s,omitempty"`
	Client        dist    `json:"client_write_latency"`
	ClientIOPS    float64 `json:"client_iops"`
}

type throttleSetting struct {
	ConcurrentOps int     `json:"concurrent_ops"`
	PaceMiB       int     `json:"max_mib_per_s,omitempty"`
	FlattenS      float64 `json:"flatten_s_median,omitempty"`
	MBps          float64 `json:"flatten_mb_per_s_median,omitempty"`
	P50MS         float64 `json:"client_p50_ms_median"`
	P99MS         float64 `json:"client_p99_ms_median"`
	P99OverBase   float64 `json:"client_p99_over_baseline"` // median over rounds of p99 ÷ that round's baseline p99
	P50OverBase   float64 `json:"client_p50_over_baseline"`
	IOPS          float64 `json:"client_iops_median"`
}

type knobRun struct {
	CloneMiB      int     `json:"clone_mib"`
	ConcurrentOps int     `json:"concurrent_ops"`
	FlattenS      float64 `json:"flatten_s"`
}

type qosRun struct {
	Case     string  `json:"case"`
	Setting  string  `json:"setting,omitempty"`
	Seconds  float64 `json:"seconds"`
	MBps     float64 `json:"mb_per_s"`
	Expected string  `json:"if_the_limit_applied,omitempty"`
}

type throttleReport struct {
	When      time.Time         `json:"when"`
	CloneMiB  int               `json:"clone_mib"`
	ObjectMiB int               `json:"object_mib"`
	ClientIO  string            `json:"client_io"`
	BaselineS float64           `json:"baseline_s"`
	Runs      []throttleRun     `json:"runs"`
	Settings  []throttleSetting `json:"settings"`
	// KnobCheck: the same knob on a clone with 64 KiB objects, where copy-ups are many and small:
	// shows that the setting reaches librbd even when 4 MiB objects see no difference.
	KnobCheck   []knobRun `json:"knob_check_64k_objects"`
	QoSLimitMiB int       `json:"qos_limit_mib_per_s"`
	QoS         []qosRun  `json:"qos"`
}

// throttleKnob is one setting: concurrent_ops, and max_bytes_per_second in MiB (0: none).
type throttleKnob struct{ ops, pace int }

func benchThrottle(conn *rados.Conn, out string, mib int, opsList, paceList []int, rounds int, baseline time.Duration, qosMiB int) {
	ioctx := ensurePool(conn, throttlePool)
	defer ioctx.Destroy()
	fmt.Printf("throttle: writing a %d MiB parent and the client's image …\n", mib)
	makeParentObj(ioctx, "parent", uint64(mib)<<20, 22)
	const clientMiB = 128
	makeParentObj(ioctx, "client", clientMiB<<20, 22) // prefilled: the client overwrites, never allocates
	cconn := dial(nil)
	defer cconn.Shutdown()
	cio, err := cconn.OpenIOContext(throttlePool)
	check(err)
	defer cio.Destroy()
	cimg, err := rbd.OpenImage(cio, "client", rbd.NoSnapshot)
	check(err)
	defer cimg.Close()

	rep := throttleReport{When: time.Now().UTC(), CloneMiB: mib, ObjectMiB: 4, BaselineS: baseline.Seconds(), QoSLimitMiB: qosMiB,
		ClientIO: fmt.Sprintf("4 KiB random writes, queue depth 1, over a %d MiB image, go-ceph Image.WriteAt", clientMiB)}
	settings := []throttleKnob{{0, 0}}
	for _, ops := range opsList {
		settings = append(settings, throttleKnob{ops, 0})
	}
	for _, pace := range paceList {
		settings = append(settings, throttleKnob{10, pace}) // paced at flattend's default concurrent_ops
	}
	for r := range rounds {
		for k := range settings {
			ops, pace := settings[(k+r)%len(settings)].ops, settings[(k+r)%len(settings)].pace
			run := throttleRun{Round: r, ConcurrentOps: ops, PaceMiB: pace}
			stop := make(chan struct{})
			var lat []time.Duration
			var wg sync.WaitGroup
			wg.Add(1)
			go func() { defer wg.Done(); lat = clientWrites(cimg, clientMiB<<20, stop) }()
			var elapsed time.Duration
			if ops == 0 {
				time.Sleep(baseline)
				elapsed = baseline
			} else {
				name := fmt.Sprintf("c-r%d-ops%d-pace%d", r, ops, pace)
				clone(ioctx, "parent", name, "")
				fconn := dial(map[string]string{"rbd_concurrent_management_ops": strconv.Itoa(ops)})
				t := time.Now()
				check(flattener.FlattenPaced(context.Background(), fconn, rbdimage.Spec{Pool: throttlePool, Image: name}, uint64(pace)<<20, nil))
				elapsed = time.Since(t)
				fconn.Shutdown()
				run.FlattenS = elapsed.Seconds()
				run.MBps = float64(mib) / run.FlattenS
			}
			close(stop)
			wg.Wait()
			run.Client = distOf(lat)
			run.ClientIOPS = float64(len(lat)) / elapsed.Seconds()
			label := "baseline"
			if ops > 0 {
				label = fmt.Sprintf("ops %d", ops)
			}
			if pace > 0 {
				label += fmt.Sprintf(", %d MiB/s", pace)
			}
			fmt.Printf("throttle: round %d %-9s flatten %6.2fs  client %s\n", r, label, run.FlattenS, run.Client)
			rep.Runs = append(rep.Runs, run)
			if ops > 0 {
				removeImages(ioctx, []string{fmt.Sprintf("c-r%d-ops%d-pace%d", r, ops, pace)})
			}
		}
	}
	base := map[int]throttleRun{}
	for _, r := range rep.Runs {
		if r.ConcurrentOps == 0 {
			base[r.Round] = r
		}
	}
	for _, k := range settings {
		var fs, mb, p50, p99, r99, r50, iops []float64
		for _, r := range rep.Runs {
			if r.ConcurrentOps != k.ops || r.PaceMiB != k.pace {
				continue
			}
			fs, mb, iops = append(fs, r.FlattenS), append(mb, r.MBps), append(iops, r.ClientIOPS)
			p50, p99 = append(p50, r.Client.P50MS), append(p99, r.Client.P99MS)
			b := base[r.Round]
			r99, r50 = append(r99, r.Client.P99MS/b.Client.P99MS), append(r50, r.Client.P50MS/b.Client.P50MS)
		}
		rep.Settings = append(rep.Settings, throttleSetting{ConcurrentOps: k.ops, PaceMiB: k.pace, FlattenS: median(fs), MBps: median(mb),
			P50MS: median(p50), P99MS: median(p99), P99OverBase: median(r99), P50OverBase: median(r50), IOPS: median(iops)})
	}

	fmt.Printf("\nthrottle: flatten of a %d MiB clone (4 MiB objects) vs a client's 4 KiB random writes at QD1 on another image; medians of %d round(s)\n", mib, rounds)
	fmt.Printf("%20s %10s %9s %11s %11s %9s %9s %10s\n", "concurrent_ops, cap", "flatten", "MB/s", "client p50", "client p99", "p50/base", "p99/base", "client IOPS")
	for _, s := range rep.Settings {
		label, ft, mbs := strconv.Itoa(s.ConcurrentOps), fmt.Sprintf("%.2fs", s.FlattenS), fmt.Sprintf("%.0f", s.MBps)
		if s.PaceMiB > 0 {
			label += fmt.Sprintf(", %d MiB/s", s.PaceMiB)
		}
		if s.ConcurrentOps == 0 {
			label, ft, mbs = "no flatten", "-", "-"
		}
		fmt.Printf("%20s %10s %9s %9.2fms %9.2fms %9.2f %9.2f %10.0f\n", label, ft, mbs, s.P50MS, s.P99MS, s.P50OverBase, s.P99OverBase, s.IOPS)
	}

	rep.KnobCheck = knobCheck(ioctx, opsList)
	fmt.Printf("\nthrottle: the same knob on a 64 MiB clone with 64 KiB objects (1024 copy-ups), alternating order\n")
	for _, k := range rep.KnobCheck {
		fmt.Printf("  concurrent_ops %3d: flatten %.2fs\n", k.ConcurrentOps, k.FlattenS)
	}

	if qosMiB > 0 {
		rep.QoS = benchQoS(conn, ioctx, mib, qosMiB)
		fmt.Printf("\nthrottle: librbd QoS (limit %d MiB/s) and flatten\n", qosMiB)
		for _, q := range rep.QoS {
			fmt.Printf("  %-46s %7.2fs %7.1f MB/s  %s\n", q.Case, q.Seconds, q.MBps, q.Expected)
		}
	}
	fmt.Println("wrote", writeJSON(out, "throttle.json", rep))
}

// clientWrites writes 4 KiB at random 4 KiB-aligned offsets, one at a time, until stop closes,
// and returns each write's latency.
func clientWrites(img *rbd.Image, size uint64, stop <-chan struct{}) []time.Duration {
	buf := make([]byte, 4096)
	var lat []time.Duration
	blocks := size / 4096
	for {
		select {
		case <-stop:
			return lat
		default:
		}
		off := int64(rand.N(blocks) * 4096)
		buf[0]++
		t := time.Now()
		_, err := img.WriteAt(buf, off)
		check(err)
		lat = append(lat, time.Since(t))
	}
}

// benchQoS flattens twin clones with and without a QoS limit, alternating, and checks that the
// limit does apply to a client's writes (the control).
func benchQoS(conn *rados.Conn, ioctx *rados.IOContext, mib, limitMiB int) []qosRun {
	limit := strconv.Itoa(limitMiB << 20)
	cfg := func(args ...string) {
		if o, err := exec.Command("rbd", append([]string{"config", "image"}, args...)...).CombinedOutput(); err != nil {
			fail("rbd config image %v: %v\n%s", args, err, o)
		}
	}
	expect := fmt.Sprintf("≥ %.1fs", float64(mib)/float64(limitMiB))
	var res []qosRun
	flat := func(name, what, setting string) {
		t := time.Now()
		check(flattener.Flatten(context.Background(), conn, rbdimage.Spec{Pool: throttlePool, Image: name}, nil))
		s := time.Since(t).Seconds()
		res = append(res, qosRun{Case: what, Setting: setting, Seconds: s, MBps: float64(mib) / s, Expected: map[bool]string{true: expect, false: ""}[setting != ""]})
	}
	for i, order := range [][2]string{{"plain", "limited"}, {"limited", "plain"}} {
		for _, which := range order {
			name := fmt.Sprintf("qos-%d-%s", i, which)
			clone(ioctx, "parent", name, "")
			if which == "limited" {
				cfg("set", throttlePool+"/"+name, "rbd_qos_bps_limit", limit)
				cfg("set", throttlePool+"/"+name, "rbd_qos_write_bps_limit", limit)
				flat(name, "flatten, clone with rbd_qos_(write_)bps_limit", "clone: rbd_qos_bps_limit="+limit+", rbd_qos_write_bps_limit="+limit)
			} else {
				flat(name, "flatten, no limit", "")
			}
			removeImages(ioctx, []string{name})
		}
	}
	// The parent's limit: the flatten reads the parent.
	name := "qos-parent-limited"
	clone(ioctx, "parent", name, "")
	cfg("set", throttlePool+"/parent", "rbd_qos_bps_limit", limit)
	cfg("set", throttlePool+"/parent", "rbd_qos_read_bps_limit", limit)
	flat(name, "flatten, parent with rbd_qos_(read_)bps_limit", "parent: rbd_qos_bps_limit="+limit+", rbd_qos_read_bps_limit="+limit)
	cfg("remove", throttlePool+"/parent", "rbd_qos_bps_limit")
	cfg("remove", throttlePool+"/parent", "rbd_qos_read_bps_limit")
	removeImages(ioctx, []string{name})
	// The control: the same limit on a plain image slows a client's writes to it.
	ctl := "qos-control"
	opts := rbd.NewRbdImageOptions()
	check(rbd.CreateImage(ioctx, ctl, uint64(mib)<<20, opts))
	opts.Destroy()
	cfg("set", throttlePool+"/"+ctl, "rbd_qos_write_bps_limit", limit)
	img, err := rbd.OpenImage(ioctx, ctl, rbd.NoSnapshot)
	check(err)
	buf := make([]byte, 4<<20)
	n := max(4, min(mib/4, 4*limitMiB/4)) // about 4 s' worth at the limit
	t := time.Now()
	for i := range n {
		_, err := img.WriteAt(buf, int64(i)<<22)
		check(err)
	}
	s := time.Since(t).Seconds()
	img.Close()
	mb := float64(n * 4)
	res = append(res, qosRun{Case: fmt.Sprintf("control: client writes %0.f MiB to an image", mb), Setting: "image: rbd_qos_write_bps_limit=" + limit,
		Seconds: s, MBps: mb / s, Expected: fmt.Sprintf("≥ %.1fs", mb/float64(limitMiB))})
	removeImages(ioctx, []string{ctl})
	return res
}

// knobCheck flattens 64 MiB clones of a parent with 64 KiB objects at the lowest and highest
// setting, in ABBA order.
func knobCheck(ioctx *rados.IOContext, opsList []int) []knobRun {
	lo, hi := opsList[0], opsList[0]
	for _, o := range opsList {
		lo, hi = min(lo, o), max(hi, o)
	}
	makeParentObj(ioctx, "parent-64k", 64<<20, 16)
	var res []knobRun
	for i, ops := range []int{lo, hi, hi, lo} {
		name := fmt.Sprintf("knob-%d", i)
		opts := rbd.NewRbdImageOptions()
		check(rbd.CloneImage(ioctx, "parent-64k", "s", ioctx, name, opts))
		opts.Destroy()
		fconn := dial(map[string]string{"rbd_concurrent_management_ops": strconv.Itoa(ops)})
		t := time.Now()
		check(flattener.Flatten(context.Background(), fconn, rbdimage.Spec{Pool: throttlePool, Image: name}, nil))
		res = append(res, knobRun{CloneMiB: 64, ConcurrentOps: ops, FlattenS: time.Since(t).Seconds()})
		fconn.Shutdown()
		removeImages(ioctx, []string{name})
	}
	return res
}
