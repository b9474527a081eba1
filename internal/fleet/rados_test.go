package fleet_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/flattend/flattend/internal/fleet"
	"github.com/flattend/flattend/test/cephtest"
)

// Nodes write their summaries with the daemon's key (profile rbd under cephx); any node reads
// them all back; entries someone else wrote are set aside with a reason; no object is no fleet.
func TestWriteReadOnCluster(t *testing.T) {
	daemon := cephtest.DaemonConnect(t)
	admin := cephtest.IOContext(t, cephtest.Connect(t))
	image := cephtest.Name(t, "lock")
	nodes, junk, _, err := fleet.Read(daemon, cephtest.Pool, image)
	if err != nil || len(nodes) != 0 || len(junk) != 0 {
		t.Fatalf("no object yet: %v, %v, %v", nodes, junk, err)
	}
	a, b := reported("1.0"), reported("1.1")
	b.LastError = strings.Repeat("x", 5000)
	for name, e := range map[string]fleet.Entry{"hv-a": a, "hv-b": b} {
		if err := fleet.Write(daemon, cephtest.Pool, image, name, e); err != nil {
			t.Fatalf("write %s: %v", name, err)
		}
	}
	a.Result = fleet.Failed // a second write replaces the first
	if err := fleet.Write(daemon, cephtest.Pool, image, "hv-a", a); err != nil {
		t.Fatal(err)
	}
	if err := admin.SetOmap(fleet.Object(image), map[string][]byte{
		"junk": []byte("not json"), "huge": make([]byte, 4096), "bad\x01key": []byte("{}"),
	}); err != nil {
		t.Fatal(err)
	}
	nodes, junk, truncated, err := fleet.Read(daemon, cephtest.Pool, image)
	if err != nil || truncated {
		t.Fatal(err, truncated)
	}
	if len(nodes) != 2 || nodes[0].Name != "hv-a" || nodes[0].Result != fleet.Failed || nodes[1].Name != "hv-b" ||
		nodes[1].Version != "1.1" || len(nodes[1].LastError) > 400 || !nodes[1].Written.Equal(b.Written) {
		t.Errorf("nodes %+v", nodes)
	}
	if len(junk) != 3 {
		t.Errorf("junk %+v, want 3 entries", junk)
	}
}

// 1,000 nodes with the longest summaries flattend writes: the object stays near a megabyte and
// one status reads it in a few omap pages.
func TestThousandNodes(t *testing.T) {
	conn := cephtest.Connect(t)
	ioctx := cephtest.IOContext(t, conn)
	image := cephtest.Name(t, "lock")
	e := reported("v1.2.3-45-gabcdef0-dirty")
	e.LastError = strings.Repeat("é", 1000)
	e.PassStarted, e.ClonesLeft, e.BytesLeft, e.Discovered, e.Result = e.Written, 123456, 1<<50, 123456, fleet.Partial
	v, err := fleet.Encode(e)
	if err != nil {
		t.Fatal(err)
	}
	total := 0
	batch := map[string][]byte{}
	for i := range 1000 {
		k := fmt.Sprintf("compute-%04d.az1.example.org", i)
		batch[k] = v
		total += len(k) + len(v)
		if len(batch) == 100 {
			if err := ioctx.SetOmap(fleet.Object(image), batch); err != nil {
				t.Fatal(err)
			}
			batch = map[string][]byte{}
		}
	}
	start := time.Now()
	nodes, junk, truncated, err := fleet.Read(conn, cephtest.Pool, image)
	if err != nil || len(nodes) != 1000 || len(junk) != 0 || truncated {
		t.Fatalf("read %d nodes, %d junk, truncated %v: %v", len(nodes), len(junk), truncated, err)
	}
	t.Logf("1,000 nodes: %d bytes of omap (value %d bytes each), read in %s", total, len(v), time.Since(start))
	if total > 1100*1000 {
		t.Errorf("1,000 summaries take %d bytes", total)
	}
}
