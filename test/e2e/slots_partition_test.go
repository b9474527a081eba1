package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/flattend/flattend/test/cephtest"
	"github.com/flattend/flattend/test/netlab"
	"github.com/flattend/flattend/test/observer"
)

// Two slots, three nodes (`run`), each in a network namespace of its own: one slot holder is cut
// off mid-flatten. The waiting node takes its slot once the watch expires; the other holder goes
// on. From RADOS (an observer inside the cluster's namespace, never cut): never more than 2
// flattens at once, the cut client is blocklisted and never owns a lock again once its successor
// flattens. Healed, the cut node reconnects and flattens its clone; every clone ends flat with
// its parent's content. A cephx cluster of its own, the nodes on the least-privilege key.
func TestTwoSlotsPartitionedHolder(t *testing.T) {
	inLab(t, "TestTwoSlotsPartitionedHolder", []string{"h1", "h2", "h3"}, slotsPartitionInner)
}

func slotsPartitionInner(t *testing.T, lab *netlab.Lab) {
	dir := t.TempDir()
	conf := os.Getenv("FLATTEND_TEST_CEPH_CONF")
	conn := cephtest.Connect(t)
	ioctx := cephtest.PoolIOContext(t, conn, "rbd")
	p := cephtest.MakeParent(t, ioctx, "parent", 32<<20, 16) // 512 objects of 64 KiB
	hosts := []string{"h1", "h2", "h3"}
	var clones []string
	for _, h := range hosts {
		cephtest.Clone(t, ioctx, p, h+"-c", h)
		clones = append(clones, h+"-c")
	}
	w := watchRADOS(t, conn, ioctx, "plock", 2, clones...)
	procs := map[string]*proc{}
	for _, h := range hosts {
		cfg := filepath.Join(dir, h+".yaml")
		// Paced: 16 s a clone by construction, so the cut lands mid-flatten.
		body := fmt.Sprintf(`node: %s
ceph: {conf: %s, user: flattend, keyring: %s, connect_timeout: 20s}
lock: {pool: rbd, image: plock, check_interval: 1s, slots: 2}
window: {schedule: "* * * * *", duration: 1h}
backoff: {min: 200ms, max: 1s}
flatten: {concurrent_ops: 1, max_bytes_per_second: 2MiB}
discovery: {pools: [{pool: rbd}], interval: 2s}
metrics: {listen: ""}
log: {level: debug, format: json}
`, h, conf, filepath.Join(filepath.Dir(conf), "flattend.keyring"))
		if err := os.WriteFile(cfg, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		procs[h] = startCmd(t, lab.In(h, nil, binary, "run", "--config", cfg))
	}

	// Both slots busy: two nodes copying. The first of them is cut.
	var holders []string
	for deadline := time.Now().Add(2 * time.Minute); len(holders) < 2; time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("two nodes did not start flattening within 2 minutes (flattening: %v)", holders)
		}
		holders = holders[:0]
		for _, h := range hosts {
			if count(procs[h].events(t), "flatten progress") > 0 {
				holders = append(holders, h)
			}
		}
	}
	cut := holders[0]
	waiting := hosts[slices.IndexFunc(hosts, func(h string) bool { return !slices.Contains(holders, h) })]
	lab.Cut(cut)
	cutAt := time.Now()
	t.Logf("cut %s; %s holds the other slot; %s waits", cut, holders[1], waiting)

	procs[waiting].waitFor(t, 3*time.Minute, "the takeover", func(e event) bool { return e.Msg == "flatten started" })
	if fenced, err := w.blocklistHas(lab.IP[cut] + ":"); err != nil || !fenced {
		t.Errorf("the cut node %s (%s) is not blocklisted after the takeover (err %v)", cut, lab.IP[cut], err)
	}
	time.Sleep(2 * time.Second)
	lab.Heal(cut)
	procs[cut].waitFor(t, 2*time.Minute, "the cut node noticing its loss", func(e event) bool { return e.Msg == "lock lost, reconnecting" })
	for _, h := range hosts {
		procs[h].waitFor(t, 4*time.Minute, h+"'s clone flat", func(e event) bool {
			return e.Msg == "flatten finished" && e.Result == "flat" && strings.HasSuffix(e.Image, "/"+h+"-c")
		})
	}
	t.Logf("all clones flat %s after the cut", time.Since(cutAt).Round(time.Second))
	for _, c := range clones {
		cephtest.AssertFlatAndIntact(t, ioctx, p, c)
	}

	// RADOS's word, not the logs'.
	st := w.finish(t)
	if st.MaxConcurrent != 2 {
		t.Errorf("the observer saw at most %d flattens at once, want 2 (both slots busy)", st.MaxConcurrent)
	}
	slot := slices.IndexFunc([]int{0, 1}, func(s int) bool {
		o := w.slotOwners(s)
		return len(o) > 0 && strings.HasPrefix(bareIP(o[0].Owner.Addr), lab.IP[cut]+":")
	})
	if slot < 0 {
		t.Fatalf("the observer never saw the cut node %s (%s) first on a slot", cut, lab.IP[cut])
	}
	w.assertFenced(t, slot)
}

// blocklistHas reports whether an address starting with prefix is in the OSD blocklist.
func (w *witness) blocklistHas(prefix string) (bool, error) {
	bl, err := observer.Blocklist(w.conn)
	for a := range bl {
		if strings.HasPrefix(a, prefix) {
			return true, err
		}
	}
	return false, err
}
