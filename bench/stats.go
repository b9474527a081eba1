package main

// Small helpers shared by the benches: percentiles, connections, pools, images.

import (
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"
)

// dist summarises a sample of durations, in milliseconds.
type dist struct {
	N      int     `json:"n"`
	MinMS  float64 `json:"min_ms"`
	P50MS  float64 `json:"p50_ms"`
	P90MS  float64 `json:"p90_ms"`
	P99MS  float64 `json:"p99_ms"`
	MaxMS  float64 `json:"max_ms"`
	MeanMS float64 `json:"mean_ms"`
}

func distOf(ds []time.Duration) dist {
	if len(ds) == 0 {
		return dist{}
	}
	ms := make([]float64, len(ds))
	sum := 0.0
	for i, d := range ds {
		ms[i] = float64(d) / float64(time.Millisecond)
		sum += ms[i]
	}
	slices.Sort(ms)
	return dist{N: len(ms), MinMS: ms[0], P50MS: pct(ms, 50), P90MS: pct(ms, 90), P99MS: pct(ms, 99),
		MaxMS: ms[len(ms)-1], MeanMS: sum / float64(len(ms))}
}

// pct is the p-th percentile of sorted xs (nearest rank).
func pct(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	k := int(float64(len(sorted))*p/100+0.999999) - 1
	return sorted[min(max(k, 0), len(sorted)-1)]
}

func (d dist) String() string {
	return fmt.Sprintf("n=%d p50 %.1f ms, p90 %.1f, p99 %.1f, max %.1f", d.N, d.P50MS, d.P90MS, d.P99MS, d.MaxMS)
}

// dial opens a new RADOS connection with the given config options.
func dial(opts map[string]string) *rados.Conn {
	conn, err := rados.NewConnWithUser("admin")
	check(err)
	check(conn.ReadConfigFile(os.Getenv("CEPH_CONF")))
	for k, v := range opts {
		check(conn.SetConfigOption(k, v))
	}
	check(conn.Connect())
	return conn
}

// ensurePool creates and initialises an RBD pool.
func ensurePool(conn *rados.Conn, name string) *rados.IOContext {
	cmd, _ := json.Marshal(map[string]any{"prefix": "osd pool create", "pool": name, "pg_num": 8})
	if _, s, err := conn.MonCommand(cmd); err != nil {
		fail("creating pool %s: %v %s", name, err, s)
	}
	ioctx, err := conn.OpenIOContext(name)
	check(err)
	check(rbd.PoolInit(ioctx, false))
	return ioctx
}

// makeParentObj is makeParent with an object size (order: log2 of the object size).
func makeParentObj(ioctx *rados.IOContext, name string, size uint64, order uint64) {
	opts := rbd.NewRbdImageOptions()
	check(opts.SetUint64(rbd.RbdImageOptionOrder, order))
	check(rbd.CreateImage(ioctx, name, size, opts))
	opts.Destroy()
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

func clone(ioctx *rados.IOContext, parent, name, owner string) {
	opts := rbd.NewRbdImageOptions()
	check(rbd.CloneImage(ioctx, parent, "s", ioctx, name, opts))
	opts.Destroy()
	if owner != "" {
		img, err := rbd.OpenImage(ioctx, name, rbd.NoSnapshot)
		check(err)
		check(img.SetMetadata("flattend.owner", owner))
		img.Close()
	}
}

func isFlat(ioctx *rados.IOContext, name string) bool {
	img, err := rbd.OpenImageReadOnly(ioctx, name, rbd.NoSnapshot)
	check(err)
	defer img.Close()
	_, err = img.GetParent()
	return err != nil
}

func removeImages(ioctx *rados.IOContext, names []string) {
	for _, n := range names {
		if err := rbd.RemoveImage(ioctx, n); err != nil {
			fmt.Fprintf(os.Stderr, "bench: removing %s: %v\n", n, err)
		}
	}
}

// waitForRoom waits (up to a minute) until the cluster has at least gib GiB free: memstore frees
// deleted objects a little later, and a full OSD makes a flatten hang.
func waitForRoom(gib float64) {
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		o, err := exec.Command("ceph", "df", "--format", "json").Output()
		check(err)
		var d struct {
			Stats struct {
				Avail float64 `json:"total_avail_bytes"`
			} `json:"stats"`
		}
		check(json.Unmarshal(o, &d))
		if d.Stats.Avail >= gib*(1<<30) {
			return
		}
		time.Sleep(2 * time.Second)
	}
	fmt.Fprintf(os.Stderr, "bench: warning: less than %.1f GiB free after a minute\n", gib)
}

func writeJSON(out, name string, v any) string {
	check(os.MkdirAll(out, 0o755))
	js, _ := json.MarshalIndent(v, "", "  ")
	path := filepath.Join(out, name)
	check(os.WriteFile(path, append(js, '\n'), 0o644))
	return path
}
