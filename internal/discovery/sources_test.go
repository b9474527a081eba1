package discovery_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"

	"github.com/flattend/flattend/internal/discovery"
	"github.com/flattend/flattend/internal/rbdimage"
	"github.com/flattend/flattend/test/cephtest"
	"github.com/flattend/flattend/test/libvirttest"
)

func specs(cs []discovery.Clone) []string {
	var s []string
	for _, c := range cs {
		s = append(s, c.String())
	}
	slices.Sort(s)
	return s
}

// chain is c's parent chain as strings.
func chain(c discovery.Clone) []string {
	var s []string
	for _, p := range c.Chain {
		s = append(s, p.String())
	}
	return s
}

func skippedOf(f discovery.Found) map[string]string {
	m := map[string]string{}
	for _, s := range f.Skipped {
		m[s.Image] = s.Reason
	}
	return m
}

func flatten(t *testing.T, ioctx *rados.IOContext, name string) {
	t.Helper()
	img, err := rbd.OpenImage(ioctx, name, rbd.NoSnapshot)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if err := img.Flatten(); err != nil {
		t.Fatal(err)
	}
}

// namespace creates a fresh RBD namespace in the test pool and returns an I/O context on it.
func namespace(t *testing.T, conn *rados.Conn, ioctx *rados.IOContext, name string) *rados.IOContext {
	t.Helper()
	if err := rbd.NamespaceCreate(ioctx, name); err != nil {
		t.Fatalf("namespace %s: %v", name, err)
	}
	ns := cephtest.PoolIOContext(t, conn, cephtest.Pool)
	ns.SetNamespace(name)
	return ns
}

// A pool source with a namespace looks only there, and a namespace the pool lacks is an error,
// not an empty list.
func TestPoolNamespace(t *testing.T) {
	conn := cephtest.Connect(t)
	daemon := cephtest.DaemonReader(t) // Find runs as in flattend: its own key, on a reader; set-up as admin
	ioctx := cephtest.IOContext(t, conn)
	node := cephtest.Name(t, "me")
	pre := cephtest.Name(t, "x")
	nsctx := namespace(t, conn, ioctx, pre+"-ns")
	p := cephtest.MakeParent(t, nsctx, pre+"-parent", 4<<20, 22)
	cephtest.Clone(t, nsctx, p, pre+"-in-ns", node)
	cephtest.Clone(t, nsctx, p, pre+"-in-ns-theirs", "someone-else")
	dp := cephtest.MakeParent(t, ioctx, pre+"-default-parent", 4<<20, 22)
	cephtest.Clone(t, ioctx, dp, pre+"-in-default", node)

	P := cephtest.Pool
	src := discovery.Pool{Pool: P, Namespace: pre + "-ns", OwnerKey: "flattend.owner", Node: node}
	f, err := discovery.Find(context.Background(), daemon, []discovery.Source{src})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := specs(f.Clones), []string{P + "/" + pre + "-ns/" + pre + "-in-ns"}; !slices.Equal(got, want) {
		t.Fatalf("namespace source: %v, want %v", got, want)
	}
	if c := f.Clones[0]; c.Source != "pool:"+P+"/"+pre+"-ns" || !slices.Equal(chain(c), []string{P + "/" + pre + "-ns/" + p.Name + "@s"}) {
		t.Errorf("clone %+v: wrong source or chain", c)
	}
	src.Namespace = pre + "-missing"
	if _, err := discovery.Find(context.Background(), daemon, []discovery.Source{src}); !errors.Is(err, discovery.ErrNoNamespace) {
		t.Fatalf("missing namespace: %v, want ErrNoNamespace", err)
	}
}

// Owner-tagged and shared pool sources with match: the owner source takes only the images tagged
// for this node whose name matches, and reports the tagged ones that are flat (also a flattened
// clone whose header still names its parent for an older snapshot); the shared source takes every
// matching clone, whatever its tag, with no owner.
func TestPoolSharedAndMatch(t *testing.T) {
	conn := cephtest.Connect(t)
	daemon := cephtest.DaemonReader(t) // Find runs as in flattend: its own key, on a reader; set-up as admin
	ioctx := cephtest.IOContext(t, conn)
	node := cephtest.Name(t, "me")
	pre := cephtest.Name(t, "x")
	p := cephtest.MakeParent(t, ioctx, pre+"-parent", 4<<20, 22)

	cephtest.Clone(t, ioctx, p, pre+"-mine-a", node)
	cephtest.Clone(t, ioctx, p, pre+"-other-b", node) // tagged, but the name does not match
	cephtest.Clone(t, ioctx, p, pre+"-mine-theirs", "someone-else")
	cephtest.Clone(t, ioctx, p, pre+"-mine-flattened", node)
	cephtest.SnapProtect(t, ioctx, pre+"-mine-flattened", "keep") // keeps the header's parent key after the flatten
	flatten(t, ioctx, pre+"-mine-flattened")
	cephtest.Clone(t, ioctx, p, pre+"-shared-1", "")
	cephtest.Clone(t, ioctx, p, pre+"-shared-2", "someone-else")
	cephtest.MakeParent(t, ioctx, pre+"-shared-flat", 1<<20, 22)
	cephtest.MakeParent(t, ioctx, pre+"-mine-tagged-flat", 1<<20, 22)
	cephtest.SetMeta(t, ioctx, pre+"-mine-tagged-flat", "flattend.owner", node)

	P := cephtest.Pool
	owner := discovery.Pool{Pool: P, OwnerKey: "flattend.owner", Node: node, Match: regexp.MustCompile("^" + pre + "-mine-")}
	f, err := discovery.Find(context.Background(), daemon, []discovery.Source{owner})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := specs(f.Clones), []string{P + "/" + pre + "-mine-a"}; !slices.Equal(got, want) {
		t.Fatalf("owner source with match: %v, want %v", got, want)
	}
	c := f.Clones[0]
	if c.Owner != node || c.Source != "pool:"+P || !strings.Contains(c.Reason, "flattend.owner = "+node) ||
		c.Depth != 1 || !slices.Equal(chain(c), []string{P + "/" + p.Name + "@s"}) || c.Overlap != 4<<20 {
		t.Errorf("clone %+v: wrong owner, source, reason, chain or overlap", c)
	}
	sk := skippedOf(f)
	for _, img := range []string{pre + "-mine-flattened", pre + "-mine-tagged-flat"} {
		if !strings.HasPrefix(sk[P+"/"+img], "already flat") {
			t.Errorf("%s: skipped reason %q, want already flat", img, sk[P+"/"+img])
		}
	}
	if len(sk) != 2 {
		t.Errorf("skipped %v, want only the two flat tagged images", sk)
	}

	shared := discovery.Pool{Pool: P, Shared: true, Node: node, Match: regexp.MustCompile("^" + pre + "-shared-")}
	f, err = discovery.Find(context.Background(), daemon, []discovery.Source{shared})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := specs(f.Clones), []string{P + "/" + pre + "-shared-1", P + "/" + pre + "-shared-2"}; !slices.Equal(got, want) {
		t.Fatalf("shared source: %v, want %v", got, want)
	}
	for _, c := range f.Clones {
		if c.Owner != "" || !strings.Contains(c.Reason, "shared backlog") {
			t.Errorf("shared clone %+v: want no owner and a shared reason", c)
		}
	}
	if len(f.Skipped) != 0 {
		t.Errorf("shared source skipped %v, want nothing reported", f.Skipped)
	}
}

// The libvirt source, against a real libvirtd with two defined (not running) domains: it selects
// the clones of every snapshot of their RBD disks and the clones of those in turn, across
// namespaces; the disk that is itself a clone only with include_vm_disks; never clones of an image
// no domain uses, nor siblings of a VM disk.
func TestLibvirtSource(t *testing.T) {
	conn := cephtest.Connect(t)
	daemon := cephtest.DaemonReader(t) // Find runs as in flattend: its own key, on a reader; set-up as admin
	ioctx := cephtest.IOContext(t, conn)
	lv := libvirttest.Start(t)
	sc := newScenario(t, conn, ioctx)
	sc.define(t, lv)
	node := cephtest.Name(t, "me")

	src := discovery.Libvirt{URI: lv.URI, Node: node}
	f, err := discovery.Find(context.Background(), daemon, []discovery.Source{src})
	if err != nil {
		t.Fatal(err)
	}
	if got := specs(f.Clones); !slices.Equal(got, sc.owned) {
		t.Fatalf("libvirt source found %v\nwant %v", got, sc.owned)
	}
	byspec := map[string]discovery.Clone{}
	for _, c := range f.Clones {
		byspec[c.String()] = c
		if c.Owner != node || c.Source != "libvirt" {
			t.Errorf("%s: owner %q source %q", c.String(), c.Owner, c.Source)
		}
	}
	deep := byspec[sc.deep]
	if deep.Depth != 3 || len(deep.Chain) != 3 || !strings.Contains(deep.Reason, "domain "+sc.vm1) ||
		deep.Chain[2].String() != cephtest.Pool+"/"+sc.glance+"@s" {
		t.Errorf("clone of a clone of a VM disk: %+v", deep)
	}
	if r := skippedOf(f)[sc.vmClone]; !strings.Contains(r, "include_vm_disks is false") {
		t.Errorf("VM disk that is a clone: skipped reason %q", r)
	}

	src.IncludeVMDisks = true
	f, err = discovery.Find(context.Background(), daemon, []discovery.Source{src})
	if err != nil {
		t.Fatal(err)
	}
	want := append(slices.Clone(sc.owned), sc.vmClone)
	slices.Sort(want)
	if got := specs(f.Clones); !slices.Equal(got, want) {
		t.Fatalf("with include_vm_disks: %v\nwant %v", got, want)
	}

	// Unreachable libvirt fails discovery with the socket in the message.
	bad := discovery.Libvirt{URI: "qemu:///session?socket=" + filepath.Join(t.TempDir(), "none"), Node: node}
	if _, err := discovery.Find(context.Background(), daemon, []discovery.Source{bad}); err == nil || !strings.Contains(err.Error(), "none") {
		t.Fatalf("unreachable libvirt: %v", err)
	}
}

// scenario is a small cloud on the test cluster:
//
//	glance@s ─┬─ vmdisk1 (vm1 vda, itself a clone) @s1 ── c1 @s ── c1c
//	          └─ sibling (no domain)
//	vmdisk2 (vm2 vda, flat) @s ── c2;  @s2 ── ns/c2b (another namespace)
//	ns/vmdisk3 (vm2 vdb, in a namespace) @s ── c3 (default namespace)
//	orphan (no domain) @s ── o1
type scenario struct {
	vm1, vm2                 string
	glance, vmdisk1, vmdisk2 string
	vmdisk3, ns              string
	owned                    []string // specs this node owns through libvirt
	deep, vmClone            string
}

func newScenario(t *testing.T, conn *rados.Conn, ioctx *rados.IOContext) scenario {
	t.Helper()
	P := cephtest.Pool
	pre := cephtest.Name(t, "s")
	sc := scenario{vm1: pre + "-vm1", vm2: pre + "-vm2", glance: pre + "-glance", vmdisk1: pre + "-disk1",
		vmdisk2: pre + "-disk2", vmdisk3: pre + "-disk3", ns: pre + "-ns"}
	nsctx := namespace(t, conn, ioctx, sc.ns)
	g := cephtest.MakeParent(t, ioctx, sc.glance, 4<<20, 22)
	cephtest.Clone(t, ioctx, g, sc.vmdisk1, "")
	cephtest.Clone(t, ioctx, g, pre+"-sibling", "")
	d1 := cephtest.SnapProtect(t, ioctx, sc.vmdisk1, "s1")
	cephtest.Clone(t, ioctx, d1, pre+"-c1", "")
	c1 := cephtest.SnapProtect(t, ioctx, pre+"-c1", "s")
	cephtest.Clone(t, ioctx, c1, pre+"-c1c", "")
	d2 := cephtest.MakeParent(t, ioctx, sc.vmdisk2, 4<<20, 22)
	cephtest.Clone(t, ioctx, d2, pre+"-c2", "")
	d2b := cephtest.SnapProtect(t, ioctx, sc.vmdisk2, "s2")
	cephtest.CloneV2(t, ioctx, d2b, nsctx, pre+"-c2b")
	d3 := cephtest.MakeParent(t, nsctx, sc.vmdisk3, 4<<20, 22)
	cephtest.CloneV2(t, nsctx, d3, ioctx, pre+"-c3")
	o := cephtest.MakeParent(t, ioctx, pre+"-orphan", 4<<20, 22)
	cephtest.Clone(t, ioctx, o, pre+"-o1", "")

	sc.owned = []string{P + "/" + pre + "-c1", P + "/" + pre + "-c1c", P + "/" + pre + "-c2",
		P + "/" + sc.ns + "/" + pre + "-c2b", P + "/" + pre + "-c3"}
	slices.Sort(sc.owned)
	sc.deep = P + "/" + pre + "-c1c"
	sc.vmClone = P + "/" + sc.vmdisk1
	return sc
}

func (sc scenario) define(t *testing.T, lv *libvirttest.Daemon) {
	P := cephtest.Pool
	lv.Define(t, sc.vm1, P+"/"+sc.vmdisk1)
	lv.Define(t, sc.vm2, P+"/"+sc.vmdisk2, P+"/"+sc.ns+"/"+sc.vmdisk3)
}

// A <disk type='volume'> of an RBD storage pool is that pool's Ceph image: its clones are this
// node's. Volumes of other kinds of pools, and of pools libvirt no longer has, are no RBD disks.
func TestLibvirtVolumeDisks(t *testing.T) {
	conn := cephtest.Connect(t)
	daemon := cephtest.DaemonReader(t) // Find runs as in flattend: its own key, on a reader; set-up as admin
	ioctx := cephtest.IOContext(t, conn)
	lv := libvirttest.Start(t)
	pre := cephtest.Name(t, "v")
	disk := cephtest.MakeParent(t, ioctx, pre+"-disk", 4<<20, 22)
	cephtest.Clone(t, ioctx, disk, pre+"-snapclone", "")
	other := cephtest.MakeParent(t, ioctx, pre+"-other", 4<<20, 22)
	cephtest.Clone(t, ioctx, other, pre+"-otherclone", "")

	dir := t.TempDir()
	write := func(name, xml string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(xml), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	lv.Virsh(t, "pool-define", write("rbd.xml", fmt.Sprintf("<pool type='rbd'><name>%s-ceph</name><source><name>%s</name><host name='127.0.0.1'/></source></pool>", pre, cephtest.Pool)))
	lv.Virsh(t, "pool-define", write("dir.xml", fmt.Sprintf("<pool type='dir'><name>%s-dir</name><target><path>%s</path></target></pool>", pre, dir)))
	volume := func(dev, pool, vol string) string {
		return fmt.Sprintf("<disk type='volume' device='disk'><driver name='qemu' type='raw'/><source pool='%s' volume='%s'/><target dev='%s' bus='virtio'/></disk>", pool, vol, dev)
	}
	lv.Virsh(t, "define", write("vm.xml", "<domain type='qemu'><name>"+pre+"-vm</name><memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os><devices>"+
		volume("vda", pre+"-ceph", pre+"-disk")+
		volume("vdb", pre+"-dir", pre+"-other")+ // same name as an RBD image, but a file volume
		volume("vdc", pre+"-gone", pre+"-other")+
		"</devices></domain>"))

	src := discovery.Libvirt{URI: lv.URI, Node: cephtest.Name(t, "me")}
	hd, err := src.Disks(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	want := []discovery.Disk{{Domain: pre + "-vm", Target: "vda", Spec: rbdimage.Spec{Pool: cephtest.Pool, Image: pre + "-disk"}, StoragePool: pre + "-ceph"}}
	if !slices.Equal(hd.Disks, want) || len(hd.Ignored) != 0 || hd.Domains != 1 {
		t.Fatalf("disks %+v\nwant %+v", hd, want)
	}
	f, err := discovery.Find(context.Background(), daemon, []discovery.Source{src})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := specs(f.Clones), []string{cephtest.Pool + "/" + pre + "-snapclone"}; !slices.Equal(got, want) {
		t.Fatalf("clones %v, want %v", got, want)
	}
}

func TestDomainDisks(t *testing.T) {
	xml := `<domain type='kvm'><name>vm</name><devices>
	<disk type='file' device='disk'><source file='/x.img'/><target dev='hda'/></disk>
	<disk type='network' device='disk'><source protocol='rbd' name='vms/a'><host name='mon1'/></source><target dev='vda'/></disk>
	<disk type='network' device='disk'><source protocol='rbd' name='vms/ns/b'/><target dev='vdb'/></disk>
	<disk type='network' device='disk'><source protocol='rbd' name='images/c@snap'/><target dev='vde'/></disk>
	<disk type='network' device='disk'><source protocol='nbd' name='x/y'/><target dev='vdc'/></disk>
	<disk type='volume' device='disk'><source pool='cephpool' volume='d'/><target dev='vdd'/></disk>
	</devices></domain>`
	got, ignored, err := discovery.DomainDisks(xml)
	if err != nil {
		t.Fatal(err)
	}
	want := []discovery.Disk{
		{Domain: "vm", Target: "vda", Spec: rbdimage.Spec{Pool: "vms", Image: "a"}},
		{Domain: "vm", Target: "vdb", Spec: rbdimage.Spec{Pool: "vms", Namespace: "ns", Image: "b"}},
		{Domain: "vm", Target: "vde", Spec: rbdimage.Spec{Pool: "images", Image: "c", Snap: "snap"}},
		{Domain: "vm", Target: "vdd", Spec: rbdimage.Spec{Image: "d"}, StoragePool: "cephpool"}, // its Ceph pool comes from libvirt
	}
	if !slices.Equal(got, want) || len(ignored) != 0 {
		t.Fatalf("disks %+v\nwant %+v\nignored %+v", got, want, ignored)
	}
	if _, _, err := discovery.DomainDisks("<domain"); err == nil {
		t.Fatal("XML that does not parse must be an error")
	}
}

// Read-only, shareable and cdrom disks are no roots; a malformed name skips its disk alone.
func TestDomainDisksIgnored(t *testing.T) {
	rbd := func(dev, device, name, extra string) string {
		return "<disk type='network' device='" + device + "'><source protocol='rbd' name='" + name + "'/><target dev='" + dev + "'/>" + extra + "</disk>"
	}
	xml := "<domain type='kvm'><name>vm</name><devices>" +
		rbd("vda", "disk", "vms/a", "") +
		rbd("vdb", "disk", "images/golden", "<readonly/>") +
		rbd("vdc", "disk", "images/golden", "<shareable/>") +
		rbd("sda", "cdrom", "images/golden", "") +
		"<disk type='volume' device='disk'><source pool='cephpool' volume='g'/><target dev='vdd'/><readonly/></disk>" +
		rbd("vde", "disk", "vms/x/y/z", "") + rbd("vdf", "disk", "vms//a", "") + rbd("vdg", "disk", "/a", "") +
		rbd("vdh", "disk", "vms/", "") + rbd("vdi", "disk", "vms/a&#9;b", "") + rbd("vdj", "disk", "vms/a@", "") +
		"<disk type='volume' device='disk'><source pool='cephpool' volume='x/y'/><target dev='vdk'/></disk>" +
		"</devices></domain>"
	got, ignored, err := discovery.DomainDisks(xml)
	if err != nil {
		t.Fatal(err)
	}
	if want := []discovery.Disk{{Domain: "vm", Target: "vda", Spec: rbdimage.Spec{Pool: "vms", Image: "a"}}}; !slices.Equal(got, want) {
		t.Fatalf("disks %+v, want %+v", got, want)
	}
	var lines []string
	for _, ig := range ignored {
		lines = append(lines, fmt.Sprintf("%s %t %s", ig.Target, ig.Malformed, ig))
	}
	wantStart := []string{"vdb false disk vdb of domain vm is read-only: ", "vdc false disk vdc of domain vm is shareable: ",
		"sda false disk sda of domain vm is a cdrom: ", "vdd false disk vdd of domain vm is read-only: "}
	for _, dev := range []string{"vde", "vdf", "vdg", "vdh", "vdi", "vdj", "vdk"} {
		wantStart = append(wantStart, dev+" true disk "+dev+" of domain vm skipped: malformed: ")
	}
	if len(lines) != len(wantStart) {
		t.Fatalf("ignored:\n%s\nwant %d", strings.Join(lines, "\n"), len(wantStart))
	}
	for i, l := range lines {
		if !strings.HasPrefix(l, wantStart[i]) || strings.ContainsRune(l, '\t') {
			t.Errorf("ignored %q, want it to start with %q, control characters escaped", l, wantStart[i])
		}
	}
	if ig := ignored[0]; ig.Spec != (rbdimage.Spec{Pool: "images", Image: "golden"}) || ig.Name != "images/golden" {
		t.Errorf("read-only disk: %+v, want its image", ig)
	}
}
