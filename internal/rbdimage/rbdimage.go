// Package rbdimage is the one image type every package uses: a spec ("pool/namespace/image@snap")
// parsed and printed in one place, one way to open an image, one ErrNotFound, and the read-only
// inspections the others need (parent, overlap, users).
package rbdimage

import (
	"errors"
	"fmt"
	"strings"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"

	"github.com/flattend/flattend/internal/cephconn"
	"github.com/flattend/flattend/internal/librbd"
)

// ErrNotFound means the image (or its snapshot) does not exist: deleted or renamed since it was
// found, or a typo.
var ErrNotFound = errors.New("image not found")

// Spec names an image, or one of its snapshots when Snap is set.
type Spec struct {
	Pool      string
	Namespace string // "" for the pool's default namespace
	Image     string
	Snap      string // "" for the image itself
}

// String is "pool/image", "pool/namespace/image", with "@snap" when Snap is set.
func (s Spec) String() string {
	out := s.Pool + "/" + s.Image
	if s.Namespace != "" {
		out = s.Pool + "/" + s.Namespace + "/" + s.Image
	}
	if s.Snap != "" {
		out += "@" + s.Snap
	}
	return out
}

// Head is s without its snapshot: the image itself.
func (s Spec) Head() Spec {
	s.Snap = ""
	return s
}

// Parse reads "pool/image" or "pool/namespace/image", each optionally followed by "@snap".
func Parse(text string) (Spec, error) {
	var s Spec
	name := text
	if i := strings.LastIndexByte(text, '@'); i >= 0 {
		name, s.Snap = text[:i], text[i+1:]
		if s.Snap == "" {
			return Spec{}, fmt.Errorf("%q: empty snapshot name after @", text)
		}
	}
	parts := strings.Split(name, "/")
	switch {
	case len(parts) == 2 && parts[0] != "" && parts[1] != "":
		s.Pool, s.Image = parts[0], parts[1]
	case len(parts) == 3 && parts[0] != "" && parts[2] != "":
		s.Pool, s.Namespace, s.Image = parts[0], parts[1], parts[2]
	default:
		return Spec{}, fmt.Errorf("%q is not pool/image or pool/namespace/image", text)
	}
	return s, nil
}

// FromParent is the spec of a clone's parent snapshot as librbd reports it.
func FromParent(p *rbd.ParentInfo) Spec {
	return Spec{Pool: p.Image.PoolName, Namespace: p.Image.PoolNamespace, Image: p.Image.ImageName, Snap: p.Snap.SnapName}
}

// OpenIOContext opens s's pool on conn, in s's namespace. Destroy it when done.
func OpenIOContext(conn *rados.Conn, s Spec) (*rados.IOContext, error) {
	ioctx, err := cephconn.OpenPool(conn, s.Pool)
	if err != nil {
		return nil, err
	}
	ioctx.SetNamespace(s.Namespace)
	return ioctx, nil
}

// Mode is how Open opens an image.
type Mode int

const (
	// ReadOnly registers no watch and takes no lock: a running VM does not notice it.
	ReadOnly Mode = iota
	// ReadWrite may take the image's exclusive lock when it writes.
	ReadWrite
)

// Image is an open image. Close it when done.
type Image struct {
	*rbd.Image
	Spec  Spec
	conn  *rados.Conn
	ioctx *rados.IOContext
}

// Open opens s (at s.Snap, if set) on conn. A missing pool says what to create; a missing image
// or snapshot wraps ErrNotFound.
func Open(conn *rados.Conn, s Spec, mode Mode) (*Image, error) {
	ioctx, err := OpenIOContext(conn, s)
	if err != nil {
		return nil, err
	}
	snap := rbd.NoSnapshot
	if s.Snap != "" {
		snap = s.Snap
	}
	var img *rbd.Image
	if mode == ReadWrite {
		img, err = rbd.OpenImage(ioctx, s.Image, snap)
	} else {
		img, err = rbd.OpenImageReadOnly(ioctx, s.Image, snap)
	}
	if err != nil {
		ioctx.Destroy()
		return nil, OpenError(s, err)
	}
	return &Image{Image: img, Spec: s, conn: conn, ioctx: ioctx}, nil
}

// IOContext is the I/O context the image was opened in (s's pool and namespace).
func (i *Image) IOContext() *rados.IOContext { return i.ioctx }

// Close closes the image and its I/O context.
func (i *Image) Close() error {
	err := i.Image.Close()
	i.ioctx.Destroy()
	return err
}

// OpenError says why opening s failed: a missing image or snapshot wraps ErrNotFound, other
// errors say what to fix where an operator can. For opens that Open does not cover (by id).
func OpenError(s Spec, err error) error {
	if errors.Is(err, rbd.ErrNotFound) || cephconn.IsNotFound(err) {
		return fmt.Errorf("%s: %w", s, ErrNotFound)
	}
	return fmt.Errorf("opening %s: %w", s, cephconn.WithHint(err))
}

// Info is what Inspect learns about an image.
type Info struct {
	Size       uint64 // bytes
	Overlap    uint64 // bytes still shared with the parent (0 when flat)
	Parent     *Spec  // the parent snapshot; nil when flat
	ObjectSize uint64
	// DataPool is the pool the image's data objects live in: its own pool, or the one it was
	// created with by --data-pool (an erasure-coded pool, typically).
	DataPool string
}

// Inspect reads an image's size and parent without changing it.
func Inspect(conn *rados.Conn, s Spec) (Info, error) {
	img, err := Open(conn, s, ReadOnly)
	if err != nil {
		return Info{}, err
	}
	defer img.Close()
	return img.Inspect()
}

// Inspect reads the open image's size and parent.
func (i *Image) Inspect() (Info, error) {
	st, err := i.Stat()
	if err != nil {
		return Info{}, fmt.Errorf("stat of %s: %w", i.Spec, err)
	}
	info := Info{Size: st.Size, ObjectSize: st.Obj_size, DataPool: i.Spec.Pool}
	if info.DataPool, err = i.dataPool(); err != nil {
		return Info{}, err
	}
	p, err := i.GetParent()
	switch {
	case errors.Is(err, rbd.ErrNotFound):
		return info, nil
	case err != nil:
		return Info{}, fmt.Errorf("parent of %s: %w", i.Spec, err)
	}
	parent := FromParent(p)
	info.Parent = &parent
	if info.Overlap, err = i.GetOverlap(); err != nil {
		return Info{}, fmt.Errorf("parent overlap of %s: %w", i.Spec, err)
	}
	return info, nil
}

// dataPool names the pool of the image's data objects.
func (i *Image) dataPool() (string, error) {
	features, err := i.GetFeatures()
	if err != nil {
		return "", fmt.Errorf("features of %s: %w", i.Spec, err)
	}
	if features&rbd.FeatureDataPool == 0 {
		return i.Spec.Pool, nil
	}
	id, errno := librbd.DataPoolID(i.ioctx, i.Spec.Image)
	if errno != 0 {
		return "", fmt.Errorf("data pool of %s: %w", i.Spec, errno)
	}
	name, err := i.conn.GetPoolByID(id)
	if err != nil {
		return "", fmt.Errorf("data pool %d of %s: %w", id, i.Spec, err)
	}
	return name, nil
}

// Users lists the other clients that have s open: the owners of its exclusive lock and its
// watchers (a running VM's qemu is both). Empty means nobody else uses it. If a client holds the
// lock, librbd would hand our flatten over to it (and our throttle, fencing and cancel would not
// apply); if it only watches, our flatten would take the lock and stall the client's writes.
// A lock owner without a watch is a dead client (a flattener killed mid-flatten, whose watch
// timed out): not a user; librbd breaks its lock, blocklisting it, when the flatten takes it.
func Users(conn *rados.Conn, s Spec) ([]string, error) {
	// Read-only opens register no watch, so the list holds only the others.
	img, err := Open(conn, s, ReadOnly)
	if err != nil {
		return nil, err
	}
	defer img.Close()
	watchers, err := img.ListWatchers()
	if err != nil {
		return nil, fmt.Errorf("watchers of %s: %w", s, err)
	}
	watching := map[string]bool{}
	for _, w := range watchers {
		watching[w.Addr] = true
	}
	var users []string
	// The lockers list shows the managed exclusive lock too (rbd_lock_get_owners refuses
	// read-only images).
	_, lockers, err := img.ListLockers()
	if err != nil {
		return nil, fmt.Errorf("lockers of %s: %w", s, err)
	}
	for _, l := range lockers {
		if watching[l.Addr] {
			users = append(users, "lock owner "+l.Client+" at "+l.Addr)
			delete(watching, l.Addr)
		}
	}
	for _, w := range watchers {
		if watching[w.Addr] {
			users = append(users, "watcher "+w.Addr)
		}
	}
	return users, nil
}
