package discovery_test

import (
	"context"
	"slices"
	"testing"

	"github.com/flattend/flattend/internal/discovery"
	"github.com/flattend/flattend/test/cephtest"
)

// Discovery returns exactly the clones tagged with this node: not other nodes' clones, not
// untagged ones, not images that are flat already, not the parent.
func TestPoolOwner(t *testing.T) {
	conn := cephtest.Connect(t)
	daemon := cephtest.DaemonReader(t) // Find runs as in flattend: its own key, on a reader; set-up as admin
	ioctx := cephtest.IOContext(t, conn)
	node, other := cephtest.Name(t, "me"), cephtest.Name(t, "other")
	p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 8<<20, 22)
	mine := []string{cephtest.Name(t, "mine1"), cephtest.Name(t, "mine2")}
	for _, c := range mine {
		cephtest.Clone(t, ioctx, p, c, node)
	}
	cephtest.Clone(t, ioctx, p, cephtest.Name(t, "theirs"), other)
	cephtest.Clone(t, ioctx, p, cephtest.Name(t, "untagged"), "")
	custom := cephtest.Name(t, "custom")
	cephtest.Clone(t, ioctx, p, custom, "")
	cephtest.SetMeta(t, ioctx, custom, "site.owner", node)
	// Tagged but flat. (Tagged after cloning: librbd copies a parent's image-meta to new clones.)
	cephtest.SetMeta(t, ioctx, p.Name, "flattend.owner", node)

	sources := []discovery.Source{
		discovery.Pool{Pool: cephtest.Pool, OwnerKey: "flattend.owner", Node: node, Workers: 3},
		discovery.Pool{Pool: cephtest.Pool, OwnerKey: "flattend.owner", Node: node}, // duplicates merge
	}
	found, err := discovery.Find(context.Background(), daemon, sources)
	clones := found.Clones
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, c := range clones {
		got = append(got, c.Image)
		if c.Parent.String() != cephtest.Pool+"/"+p.Name+"@s" || c.Size != p.Size || c.Source != "pool:"+cephtest.Pool {
			t.Errorf("clone %+v: wrong parent, size or source", c)
		}
	}
	slices.Sort(mine)
	if !slices.Equal(got, mine) {
		t.Fatalf("discovered %v, want %v", got, mine)
	}

	found, err = discovery.Find(context.Background(), daemon,
		[]discovery.Source{discovery.Pool{Pool: cephtest.Pool, OwnerKey: "site.owner", Node: node}})
	clones = found.Clones
	if err != nil || len(clones) != 1 || clones[0].Image != custom {
		t.Fatalf("owner_key site.owner: %v, %v; want only %s", clones, err, custom)
	}

	_, err = discovery.Find(context.Background(), daemon,
		[]discovery.Source{discovery.Pool{Pool: "no-such-pool", OwnerKey: "flattend.owner", Node: node}})
	if err == nil {
		t.Fatal("a missing pool must fail discovery, not look like an empty one")
	}
}
