package discovery_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/flattend/flattend/internal/discovery"
	"github.com/flattend/flattend/test/cephtest"
	"github.com/flattend/flattend/test/libvirttest"
)

// A read-only disk, a shareable disk and a cdrom that read a golden image are no roots of
// ownership: every host may use that image so, and the clones of its snapshots (the other hosts'
// VM disks) are not this node's. The clones of a writable disk's snapshots still are.
func TestLibvirtSharedDisksAreNoRoots(t *testing.T) {
	conn := cephtest.Connect(t)
	daemon := cephtest.DaemonReader(t) // Find runs as in flattend: its own key, on a reader; set-up as admin
	ioctx := cephtest.IOContext(t, conn)
	lv := libvirttest.Start(t)
	P := cephtest.Pool
	pre := cephtest.Name(t, "ro")
	g := cephtest.MakeParent(t, ioctx, pre+"-golden", 4<<20, 22)
	cephtest.Clone(t, ioctx, g, pre+"-elsewhere", "") // another host's VM disk
	d := cephtest.MakeParent(t, ioctx, pre+"-disk", 4<<20, 22)
	cephtest.Clone(t, ioctx, d, pre+"-mine", "")

	golden := P + "/" + pre + "-golden"
	lv.DefineDisks(t, pre+"-vm",
		libvirttest.RBDDisk("vda", P+"/"+pre+"-disk", "disk", ""),
		libvirttest.RBDDisk("vdb", golden, "disk", "<readonly/>"),
		libvirttest.RBDDisk("vdc", golden, "disk", "<shareable/>"),
		libvirttest.RBDDisk("sda", golden, "cdrom", ""))

	f, err := discovery.Find(context.Background(), daemon, []discovery.Source{discovery.Libvirt{URI: lv.URI, Node: "me"}})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := specs(f.Clones), []string{P + "/" + pre + "-mine"}; !slices.Equal(got, want) {
		t.Fatalf("clones %v, want %v", got, want)
	}
	var reasons []string
	for _, s := range f.Skipped {
		if s.Image == golden {
			reasons = append(reasons, s.Reason)
		}
	}
	all := strings.Join(reasons, "\n")
	for _, want := range []string{"disk vdb of domain " + pre + "-vm is read-only", "disk vdc of domain " + pre + "-vm is shareable",
		"disk sda of domain " + pre + "-vm is a cdrom"} {
		if !strings.Contains(all, want) {
			t.Errorf("skipped reasons for %s:\n%s\nwant one with %q", golden, all, want)
		}
	}
}

// A disk whose RBD name is malformed is skipped with the reason; the other disks of its domain,
// and the other domains, are still discovered.
func TestLibvirtMalformedDiskSkipped(t *testing.T) {
	conn := cephtest.Connect(t)
	daemon := cephtest.DaemonReader(t) // Find runs as in flattend: its own key, on a reader; set-up as admin
	ioctx := cephtest.IOContext(t, conn)
	lv := libvirttest.Start(t)
	P := cephtest.Pool
	pre := cephtest.Name(t, "bad")
	d1 := cephtest.MakeParent(t, ioctx, pre+"-disk1", 4<<20, 22)
	cephtest.Clone(t, ioctx, d1, pre+"-c1", "")
	d2 := cephtest.MakeParent(t, ioctx, pre+"-disk2", 4<<20, 22)
	cephtest.Clone(t, ioctx, d2, pre+"-c2", "")

	// ("pool/" is left to the unit test: libvirt stores it as "pool/(null)", a well-formed name.)
	// A name the libvirtd refuses at define time never reaches discovery: probe each alone first.
	var bad, disks []string
	for i, name := range []string{P + "/x/y/z", P + "//" + pre + "-disk1", P + "/a\tb", P + "/c@"} {
		disk := libvirttest.RBDDisk("vd"+string(rune('b'+len(bad))), name, "disk", "")
		probe := fmt.Sprintf("%s-probe%d", pre, i)
		if err := lv.TryDefineDisks(t, probe, disk); err != nil {
			t.Logf("this libvirtd refuses %q at define (nothing to discover): %v", name, err)
			continue
		}
		lv.Virsh(t, "undefine", probe)
		bad, disks = append(bad, name), append(disks, disk)
	}
	if len(bad) == 0 {
		t.Fatal("this libvirtd refuses every malformed name: the test shows nothing")
	}
	lv.DefineDisks(t, pre+"-vm1", append([]string{libvirttest.RBDDisk("vda", P+"/"+pre+"-disk1", "disk", "")}, disks...)...)
	lv.Define(t, pre+"-vm2", P+"/"+pre+"-disk2")

	core, logs := observer.New(zap.DebugLevel)
	src := discovery.Libvirt{URI: lv.URI, Node: "me", Log: zap.New(core)}
	f, err := discovery.Find(context.Background(), daemon, []discovery.Source{src})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := specs(f.Clones), []string{P + "/" + pre + "-c1", P + "/" + pre + "-c2"}; !slices.Equal(got, want) {
		t.Fatalf("clones %v, want %v", got, want)
	}
	var malformed []string
	for _, s := range f.Skipped {
		if strings.Contains(s.Reason, " skipped: malformed: ") {
			malformed = append(malformed, s.Image)
			if strings.ContainsRune(s.Image+s.Reason, '\t') {
				t.Errorf("skipped %q: %q, want control characters escaped", s.Image, s.Reason)
			}
		}
	}
	if len(malformed) != len(bad) {
		t.Errorf("skipped as malformed: %q, want the %d bad disks", malformed, len(bad))
	}
	if n := logs.FilterLevelExact(zap.WarnLevel).FilterMessageSnippet("malformed").Len(); n != len(bad) {
		t.Errorf("%d warnings logged, want one per bad disk (%d): %v", n, len(bad), logs.All())
	}
}
