package discovery

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/ceph/go-ceph/rados"
	"go.uber.org/zap"

	"github.com/flattend/flattend/internal/libvirturi"
	"github.com/flattend/flattend/internal/rbdimage"
)

// Defaults for a Libvirt source's zero fields. The config package sets none of these (it
// defaults only the URI, to libvirturi.Default too): withDefaults is the one place they apply.
const (
	DefaultLibvirtTimeout = 30 * time.Second
	DefaultLibvirtWorkers = 8
)

// Libvirt selects the clones made from the snapshots of the RBD disks of every domain defined on
// this host (running or not), and their clones in turn; and, with IncludeVMDisks, those disks
// themselves when they are clones.
type Libvirt struct {
	// URI is qemu:///system or qemu:///session, optionally with ?socket=PATH (see libvirturi);
	// "" means libvirturi.Default.
	URI            string
	IncludeVMDisks bool
	Node           string
	// Timeout bounds the whole conversation with libvirt; zero means DefaultLibvirtTimeout.
	Timeout time.Duration
	// Workers bounds how many images are read at once; zero means DefaultLibvirtWorkers.
	Workers int
	// Log hears of the disks left out: a malformed one as a warning, the others at debug level.
	// nil logs nothing.
	Log *zap.Logger
}

// withDefaults is l with its zero (or negative) fields set to their defaults.
func (l Libvirt) withDefaults() Libvirt {
	if l.URI == "" {
		l.URI = libvirturi.Default
	}
	if l.Timeout <= 0 {
		l.Timeout = DefaultLibvirtTimeout
	}
	if l.Workers <= 0 {
		l.Workers = DefaultLibvirtWorkers
	}
	if l.Log == nil {
		l.Log = zap.NewNop()
	}
	return l
}

// Name implements Source.
func (l Libvirt) Name() string { return "libvirt" }

// Discover implements Source: it reads the disks from libvirt, then walks the clone tree below
// each disk (children of every snapshot, in any pool and namespace, and their children in turn),
// level by level, opening each image read-only once.
func (l Libvirt) Discover(ctx context.Context, conn *rados.Conn) (Found, error) {
	l = l.withDefaults()
	hd, err := l.Disks(ctx)
	if err != nil {
		return Found{}, err
	}
	w := &walk{l: l, ps: newPass(conn), visited: map[string]bool{}}
	defer w.ps.close()
	w.ignore(hd.Ignored)
	level := w.roots(hd.Disks)
	for len(level) > 0 {
		if level, err = w.level(ctx, level); err != nil {
			return Found{}, err
		}
	}
	return w.out.found, nil
}

// walk is one Libvirt.Discover's way down the clone tree.
type walk struct {
	l       Libvirt
	ps      *pass
	out     collector
	mu      sync.Mutex
	visited map[string]bool // pool/namespace/id of every image read
}

// node is an image to read, and how it relates to this host's disks.
type node struct {
	rbdimage.Spec
	id    string // "" for a VM disk, known by name only
	disks []Disk // set for a VM disk itself: the disks that use it
	via   string // for a descendant: "descendant of disk vda of domain vm1 (vms/x)"
}

// roots are the images the disks use, each once with all its disks. Disks that read a snapshot
// are skipped: their image is a shared read-only source.
func (w *walk) roots(disks []Disk) []node {
	byImage := map[rbdimage.Spec][]Disk{}
	var level []node
	for _, d := range disks {
		if d.Snap != "" {
			w.out.skip(d.Spec.Head(), w.l.Name(), fmt.Sprintf("%s reads snapshot %s: a shared read-only source, its clones are not this node's", d, d.Snap))
			continue
		}
		if byImage[d.Spec] == nil {
			level = append(level, node{Spec: d.Spec})
		}
		byImage[d.Spec] = append(byImage[d.Spec], d)
	}
	for i := range level {
		level[i].disks = byImage[level[i].Spec]
	}
	return level
}

// ignore reports the disks that are no roots: each is logged and listed as skipped.
func (w *walk) ignore(ignored []IgnoredDisk) {
	for _, ig := range ignored {
		image := ig.Spec.String()
		if ig.Malformed || ig.Pool == "" {
			image = fmt.Sprintf("%q", ig.Name)
		}
		fields := []zap.Field{zap.String("disk", ig.Disk.String()), zap.String("source", ig.Name), zap.String("reason", ig.Reason)}
		if ig.Malformed {
			w.l.Log.Warn("libvirt disk skipped: its rbd source name is malformed", fields...)
		} else {
			w.l.Log.Debug("libvirt disk is no root of ownership", fields...)
		}
		w.out.add(Skipped{Image: image, Source: w.l.Name(), Reason: ig.String()})
	}
}

// level visits the nodes of one level of the tree at once and returns the next level: their
// children.
func (w *walk) level(ctx context.Context, level []node) ([]node, error) {
	var next []node
	err := each(ctx, w.l.Workers, level, func(n node) error {
		children, err := w.visit(n)
		w.mu.Lock()
		next = append(next, children...)
		w.mu.Unlock()
		return err
	})
	return next, err
}

// visit reads n, selects or skips it, and returns its children to visit next.
func (w *walk) visit(n node) ([]node, error) {
	im, err := w.ps.open(n.Spec, n.id, true)
	if err != nil {
		return nil, w.openFailed(n, err)
	}
	if !w.firstVisit(im) {
		return nil, nil
	}
	via := n.via
	if n.disks != nil {
		via = fmt.Sprintf("descendant of %s (%s)", describe(n.disks), im.Spec)
	}
	if im.parent != nil {
		w.selectClone(n, im, via)
	}
	return w.children(im, via), nil
}

// openFailed says what a failed open of n means: a VM disk that is not in this cluster is
// skipped with the reason, a descendant removed since its parent listed it is left out, and
// anything else fails the discovery.
func (w *walk) openFailed(n node, err error) error {
	switch {
	case errors.Is(err, rbdimage.ErrNotFound) && n.disks != nil:
		w.out.skip(n.Spec, w.l.Name(), fmt.Sprintf("%s: no such image in this cluster", describe(n.disks)))
		return nil
	case errors.Is(err, rbdimage.ErrNotFound):
		return nil
	case errors.Is(err, errNoPool) && n.disks != nil:
		w.out.skip(n.Spec, w.l.Name(), fmt.Sprintf("%s: no such pool or namespace in this cluster", describe(n.disks)))
		return nil
	}
	return err
}

// firstVisit marks im visited and says whether it was not yet (two disks' trees can meet).
func (w *walk) firstVisit(im image) bool {
	key := im.Pool + "/" + im.Namespace + "/" + im.id
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.visited[key] {
		return false
	}
	w.visited[key] = true
	return true
}

// selectClone decides on the clone im: a descendant of a VM disk is this node's; a VM disk
// itself only with IncludeVMDisks.
func (w *walk) selectClone(n node, im image, via string) {
	parent := rbdimage.FromParent(im.parent)
	switch {
	case n.disks == nil:
		w.out.clone(w.ps.clone(im, w.l.Name(), w.l.Node, fmt.Sprintf("clone of %s, %s", parent, via)))
	case w.l.IncludeVMDisks:
		w.out.clone(w.ps.clone(im, w.l.Name(), w.l.Node, describe(n.disks)+", itself a clone (discovery.libvirt.include_vm_disks)"))
	default:
		w.out.skip(im.Spec, w.l.Name(), fmt.Sprintf("%s, a clone of %s: discovery.libvirt.include_vm_disks is false",
			describe(n.disks), parent))
	}
}

// children are im's clones to visit next; those in the trash are skipped.
func (w *walk) children(im image, via string) []node {
	var next []node
	for _, ch := range im.children {
		s := rbdimage.Spec{Pool: ch.PoolName, Namespace: ch.PoolNamespace, Image: ch.ImageName}
		if ch.Trash {
			w.out.skip(s, w.l.Name(), "in the trash (clone of "+im.Spec.String()+", "+via+")")
			continue
		}
		next = append(next, node{Spec: s, id: ch.ImageID, via: via})
	}
	return next
}

// describe is "disk vda of domain vm1 and disk vdb of domain vm2", sorted.
func describe(disks []Disk) string {
	var s []string
	for _, d := range disks {
		s = append(s, d.String())
	}
	slices.Sort(s)
	return strings.Join(s, " and ")
}
