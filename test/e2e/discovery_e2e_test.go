package e2e

import (
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ceph/go-ceph/rbd"

	"github.com/flattend/flattend/test/cephtest"
	"github.com/flattend/flattend/test/libvirttest"
)

// The three sources together on one node, against a real libvirtd with two defined domains:
// `plan --json` lists exactly this node's clones in flatten order, each with why (source, owner,
// parent chain, depth, bytes to copy) and what it skipped, and changes nothing; `check` reports
// libvirt; `once` then flattens exactly those clones, content intact, and leaves the rest.
func TestPlanAndOnceWithLibvirt(t *testing.T) {
	conn := cephtest.Connect(t)
	ioctx := cephtest.IOContext(t, conn)
	lv := libvirttest.Start(t)
	P := cephtest.Pool
	pre := cephtest.Name(t, "d")
	node, other := pre+"-node", pre+"-other"
	ns := pre + "-ns"
	if err := rbd.NamespaceCreate(ioctx, ns); err != nil {
		t.Fatal(err)
	}
	nsctx := cephtest.PoolIOContext(t, conn, P)
	nsctx.SetNamespace(ns)

	// libvirt: vm1's disk is a clone of a golden image; vm2's disk lives in a namespace.
	g := cephtest.MakeParent(t, ioctx, pre+"-glance", 4<<20, 22)
	cephtest.Clone(t, ioctx, g, pre+"-disk1", "")
	cephtest.Clone(t, ioctx, cephtest.SnapProtect(t, ioctx, pre+"-disk1", "s1"), pre+"-c1", "")
	cephtest.Clone(t, ioctx, cephtest.SnapProtect(t, ioctx, pre+"-c1", "s"), pre+"-c1c", "")
	d2 := cephtest.MakeParent(t, nsctx, pre+"-disk2", 4<<20, 22)
	cephtest.CloneV2(t, nsctx, d2, ioctx, pre+"-c2")
	o := cephtest.MakeParent(t, ioctx, pre+"-orphan", 4<<20, 22)
	cephtest.Clone(t, ioctx, o, pre+"-o1", "")
	lv.Define(t, pre+"-vm1", P+"/"+pre+"-disk1")
	lv.Define(t, pre+"-vm2", P+"/"+ns+"/"+pre+"-disk2")
	// pools: owner-tagged and shared, each limited by match.
	cephtest.Clone(t, ioctx, o, pre+"-tag-a", node)
	cephtest.Clone(t, ioctx, o, pre+"-tag-b", other)
	cephtest.Clone(t, ioctx, o, pre+"-shared-1", other)

	cfg := nodeConfig(t, node, cephtest.Name(t, "lock"), fmt.Sprintf(`discovery:
  libvirt: {uri: "%s"}
  pools:
    - {pool: %s, match: "^%s-tag-"}
    - {pool: %s, shared: true, match: "^%s-shared-"}
`, lv.URI, P, pre, P, pre))

	code, out := runCmd(t, time.Minute, "check", "--config", cfg)
	if code != 0 || !strings.Contains(out, "discovery: libvirt "+lv.URI+" ok (2 domains, 2 rbd disks") ||
		!strings.Contains(out, "shared backlog") {
		t.Fatalf("check: exit %d\n%s", code, out)
	}

	code, out = runCmd(t, time.Minute, "plan", "--config", cfg, "--json")
	if code != 0 {
		t.Fatalf("plan --json: exit %d\n%s", code, out)
	}
	var plan planJSON // the test's own type: a renamed field fails (formats_test.go)
	decodeStrict(t, "plan --json", out, &plan)
	assertKeys(t, "plan --json", out, planKeys)
	var got []string
	for i, c := range plan.Clones {
		got = append(got, c.Image)
		if c.Position != i+1 || c.BytesToCopy != 4<<20 || c.Parent != c.Chain[0] || c.Depth != len(c.Chain) {
			t.Errorf("plan clone %+v: position, bytes, parent or chain wrong", c)
		}
	}
	// depth first (c1c is 3 deep, c1 2 deep), then age: creation order.
	want := []string{P + "/" + pre + "-c1c", P + "/" + pre + "-c1", P + "/" + pre + "-c2", P + "/" + pre + "-tag-a", P + "/" + pre + "-shared-1"}
	if !slices.Equal(got, want) {
		t.Fatalf("plan clones %v\nwant %v\n%s", got, want, out)
	}
	c1c, c2, tag, shared := plan.Clones[0], plan.Clones[2], plan.Clones[3], plan.Clones[4]
	if c1c.Source != "libvirt" || c1c.Owner != node || c1c.Depth != 3 || c1c.Chain[2] != P+"/"+g.Name+"@s" ||
		!strings.Contains(c1c.Reason, "disk vda of domain "+pre+"-vm1") {
		t.Errorf("c1c: %+v", c1c)
	}
	if c2.Parent != P+"/"+ns+"/"+pre+"-disk2@s" || !strings.Contains(c2.Reason, pre+"-vm2") {
		t.Errorf("c2 (child of a disk in a namespace): %+v", c2)
	}
	if tag.Source != "pool:"+P || tag.Owner != node || !strings.Contains(tag.Reason, "flattend.owner = "+node) {
		t.Errorf("tag-a: %+v", tag)
	}
	if shared.Owner != "" || !shared.Shared || !strings.Contains(shared.Reason, "shared backlog") {
		t.Errorf("shared-1: %+v", shared)
	}
	var skippedDisk bool
	for _, s := range plan.Skipped {
		if s.Image == P+"/"+pre+"-disk1" && strings.Contains(s.Reason, "include_vm_disks is false") {
			skippedDisk = true
		}
	}
	if !skippedDisk {
		t.Errorf("plan does not say why vm1's disk (a clone) is left: %+v", plan.Skipped)
	}
	for _, c := range want {
		if !cephtest.IsClone(t, ioctx, strings.TrimPrefix(c, P+"/")) {
			t.Fatalf("plan changed %s", c)
		}
	}
	code, text := runCmd(t, time.Minute, "plan", "--config", cfg)
	if code != 0 || !strings.Contains(text, "5 clone(s) to flatten") || !strings.Contains(text, "parents: ") {
		t.Fatalf("plan: exit %d\n%s", code, text)
	}
	t.Logf("flattend plan:\n%s", text)

	code, out = runCmd(t, 3*time.Minute, "once", "--config", cfg)
	if code != 0 {
		t.Fatalf("once: exit %d\n%s", code, out)
	}
	for _, c := range []string{pre + "-c1c", pre + "-c1"} {
		cephtest.AssertFlatAndIntact(t, ioctx, g, c)
	}
	cephtest.AssertFlatAndIntact(t, ioctx, d2, pre+"-c2")
	for _, c := range []string{pre + "-tag-a", pre + "-shared-1"} {
		cephtest.AssertFlatAndIntact(t, ioctx, o, c)
	}
	for _, c := range []string{pre + "-disk1", pre + "-o1", pre + "-tag-b"} {
		if !cephtest.IsClone(t, ioctx, c) {
			t.Errorf("%s was flattened; it is not this node's", c)
		}
	}
}

// An unreachable libvirt: check says so and exits 1; plan and once fail (exit 1) instead of
// reporting "nothing to do".
func TestLibvirtUnreachable(t *testing.T) {
	cephtest.Connect(t)
	sock := filepath.Join(t.TempDir(), "no-libvirt-sock")
	cfg := nodeConfig(t, cephtest.Name(t, "n"), cephtest.Name(t, "lock"),
		fmt.Sprintf("discovery: {libvirt: {uri: \"qemu:///system?socket=%s\"}}\n", sock))
	code, out := runCmd(t, time.Minute, "check", "--config", cfg)
	if code != 1 || !strings.Contains(out, "discovery: libvirt qemu:///system?socket="+sock) || !strings.Contains(out, "is libvirtd running") {
		t.Fatalf("check: exit %d\n%s", code, out)
	}
	for _, cmd := range []string{"plan", "once"} {
		code, out = runCmd(t, time.Minute, cmd, "--config", cfg)
		if code != 1 || !strings.Contains(out, sock) {
			t.Errorf("%s: exit %d\n%s", cmd, code, out)
		}
	}
}

// Disks that are no roots of ownership and a malformed disk, on a real libvirtd: check says what
// it does not follow and warns of the malformed name (exit 0); plan lists both as skipped and
// selects only the writable disk's clone, not the golden image's; once flattens only that one.
func TestLibvirtIgnoredDisksEndToEnd(t *testing.T) {
	conn := cephtest.Connect(t)
	ioctx := cephtest.IOContext(t, conn)
	lv := libvirttest.Start(t)
	P := cephtest.Pool
	pre := cephtest.Name(t, "ig")
	g := cephtest.MakeParent(t, ioctx, pre+"-golden", 4<<20, 22)
	cephtest.Clone(t, ioctx, g, pre+"-elsewhere", "")
	d := cephtest.MakeParent(t, ioctx, pre+"-disk", 4<<20, 22)
	cephtest.Clone(t, ioctx, d, pre+"-mine", "")
	lv.DefineDisks(t, pre+"-vm",
		libvirttest.RBDDisk("vda", P+"/"+pre+"-disk", "disk", ""),
		libvirttest.RBDDisk("vdb", P+"/"+pre+"-golden", "disk", "<readonly/>"),
		libvirttest.RBDDisk("sda", P+"/"+pre+"-golden", "cdrom", ""),
		libvirttest.RBDDisk("vdc", P+"/x/y/z", "disk", ""))
	cfg := nodeConfig(t, pre+"-node", cephtest.Name(t, "lock"), fmt.Sprintf("discovery: {libvirt: {uri: %q}}\n", lv.URI))

	code, out := runCmd(t, time.Minute, "check", "--config", cfg)
	for _, want := range []string{"(1 domains, 1 rbd disks", "disk vdb of domain " + pre + "-vm is read-only", "disk sda of domain " + pre + "-vm is a cdrom",
		"warning: discovery: libvirt disk vdc of domain " + pre + "-vm skipped: malformed: rbd source name \"" + P + "/x/y/z\""} {
		if code != 0 || !strings.Contains(out, want) {
			t.Fatalf("check: exit %d, want %q in\n%s", code, want, out)
		}
	}
	code, out = runCmd(t, time.Minute, "plan", "--config", cfg, "--json")
	if code != 0 {
		t.Fatalf("plan --json: exit %d\n%s", code, out)
	}
	var plan planJSON
	decodeStrict(t, "plan --json", out, &plan)
	if len(plan.Clones) != 1 || plan.Clones[0].Image != P+"/"+pre+"-mine" {
		t.Fatalf("plan clones %+v, want only %s", plan.Clones, pre+"-mine")
	}
	skipped := map[string]bool{}
	for _, s := range plan.Skipped {
		skipped[s.Image] = true
	}
	if !skipped[P+"/"+pre+"-golden"] || !skipped[fmt.Sprintf("%q", P+"/x/y/z")] {
		t.Errorf("plan skipped %+v, want the golden image and the malformed name", plan.Skipped)
	}
	if code, out = runCmd(t, 3*time.Minute, "once", "--config", cfg); code != 0 {
		t.Fatalf("once: exit %d\n%s", code, out)
	}
	cephtest.AssertFlatAndIntact(t, ioctx, d, pre+"-mine")
	if !cephtest.IsClone(t, ioctx, pre+"-elsewhere") {
		t.Errorf("%s, another host's clone of the golden image, was flattened", pre+"-elsewhere")
	}
}
