package soak

import (
	"fmt"
	"sync"
	"testing"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"

	"github.com/flattend/flattend/test/cephtest"
	"github.com/flattend/flattend/test/observer"
)

// connect opens the soak's own admin connection. Its OSD and mon calls time out rather than
// hang for ever: a call made during `ceph osd pause` waits at most that long.
func connect(t *testing.T) *rados.Conn {
	t.Helper()
	conn, err := rados.NewConnWithUser("admin")
	if err == nil {
		err = conn.ReadConfigFile(cephtest.ConfPath(t))
	}
	for _, o := range [][2]string{{"client_mount_timeout", "20"}, {"rados_osd_op_timeout", "30"}, {"rados_mon_op_timeout", "30"}} {
		if err == nil {
			err = conn.SetConfigOption(o[0], o[1])
		}
	}
	if err == nil {
		err = conn.Connect()
	}
	if err != nil {
		t.Fatalf("the soak's cluster is unreachable: %v", err)
	}
	t.Cleanup(conn.Shutdown)
	return conn
}

// clone is one clone of the soak, owned (flattend.owner) by node.
type clone struct {
	name, node, header string
	parent             cephtest.Parent
	flat               bool // seen flat by cloneSet.refresh
}

// cloneSet makes the soak's clones and knows which are left to flatten.
type cloneSet struct {
	ioctx   *rados.IOContext
	parents []cephtest.Parent
	obs     *observer.Observer
	mu      sync.Mutex
	all     []*clone
}

// add makes a new clone for node and hands it to the observer.
func (cs *cloneSet) add(node string) (*clone, error) {
	cs.mu.Lock()
	n := len(cs.all)
	cs.mu.Unlock()
	c := &clone{name: fmt.Sprintf("soak-%s-%03d", node, n), node: node, parent: cs.parents[n%len(cs.parents)]}
	opts := rbd.NewRbdImageOptions()
	defer opts.Destroy()
	if err := rbd.CloneImage(cs.ioctx, c.parent.Name, c.parent.Snap, cs.ioctx, c.name, opts); err != nil {
		return nil, fmt.Errorf("clone %s: %w", c.name, err)
	}
	img, err := rbd.OpenImage(cs.ioctx, c.name, rbd.NoSnapshot)
	if err != nil {
		return nil, err
	}
	err = img.SetMetadata("flattend.owner", node)
	if cerr := img.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, fmt.Errorf("tag %s: %w", c.name, err)
	}
	if c.header, err = cs.obs.Watch(c.name); err != nil {
		return nil, err
	}
	cs.mu.Lock()
	cs.all = append(cs.all, c)
	cs.mu.Unlock()
	return c, nil
}

func (cs *cloneSet) count() int {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	return len(cs.all)
}

func (cs *cloneSet) list() []*clone {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	return append([]*clone(nil), cs.all...)
}

// refresh marks the clones that became flat (their header lost its parent key) and returns how
// many each node has left.
func (cs *cloneSet) refresh() (left map[string]int, err error) {
	left = map[string]int{}
	for _, c := range cs.list() {
		if c.flat {
			continue
		}
		vals, err := cs.ioctx.GetOmapValues(c.header, "", "parent", 8)
		if err != nil {
			return nil, err
		}
		if _, ok := vals["parent"]; !ok {
			cs.mu.Lock()
			c.flat = true
			cs.mu.Unlock()
			continue
		}
		left[c.node]++
	}
	return left, nil
}

// isFlat reports whether the observer should sample c only now and then.
func (cs *cloneSet) isFlat(name string) bool {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	for _, c := range cs.all {
		if c.name == name {
			return c.flat
		}
	}
	return false
}
