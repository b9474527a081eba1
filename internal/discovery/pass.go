package discovery

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"

	"github.com/flattend/flattend/internal/rbdimage"
)

// pass holds what one discovery run shares between its lookups: I/O contexts per pool and
// namespace, and the parent chains already walked. Close releases the I/O contexts.
type pass struct {
	conn   *rados.Conn
	mu     sync.Mutex
	ioctxs map[[2]string]*rados.IOContext
	chains map[string][]rbdimage.Spec // image id key → that image's own parent chain
}

func newPass(conn *rados.Conn) *pass {
	return &pass{conn: conn, ioctxs: map[[2]string]*rados.IOContext{}, chains: map[string][]rbdimage.Spec{}}
}

func (p *pass) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.ioctxs {
		c.Destroy()
	}
	p.ioctxs = nil
}

// ioctx returns an I/O context on pool and namespace, shared by the whole pass. librados I/O
// contexts are safe for concurrent use as long as nobody changes their namespace.
func (p *pass) ioctx(pool, ns string) (*rados.IOContext, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	k := [2]string{pool, ns}
	if c, ok := p.ioctxs[k]; ok {
		return c, nil
	}
	c, err := p.conn.OpenIOContext(pool)
	if errors.Is(err, rados.ErrNotFound) {
		return nil, fmt.Errorf("opening pool %q: %w", pool, errNoPool)
	}
	if err != nil {
		return nil, fmt.Errorf("opening pool %q: %w", pool, err)
	}
	c.SetNamespace(ns)
	p.ioctxs[k] = c
	return c, nil
}

// errNoPool is a pool that does not exist.
var errNoPool = errors.New("no such pool")

// image is what one read-only open of an image learns.
type image struct {
	rbdimage.Spec
	id            string
	parent        *rbd.ParentInfo // nil when flat
	size, overlap uint64
	created       time.Time
	children      []rbd.ImageSpec // only when asked for
}

// open reads the image s by id (or by name when id is empty), read-only, and closes it again. A
// read-only open registers no watch and takes no lock: a running VM does not notice it. An image
// that does not exist (any more) is an error wrapping rbdimage.ErrNotFound.
//
// It is not rbdimage.Open because it opens by id too and reuses the pass's I/O contexts (a pool
// of thousands of images is read with one I/O context, not one per image).
func (p *pass) open(s rbdimage.Spec, id string, withChildren bool) (image, error) {
	ioctx, err := p.ioctx(s.Pool, s.Namespace)
	if err != nil {
		return image{}, err
	}
	var img *rbd.Image
	if id != "" {
		img, err = rbd.OpenImageByIdReadOnly(ioctx, id, rbd.NoSnapshot)
	} else {
		img, err = rbd.OpenImageReadOnly(ioctx, s.Image, rbd.NoSnapshot)
	}
	if err != nil {
		return image{}, rbdimage.OpenError(s, err)
	}
	defer img.Close()
	im := image{Spec: s, id: id}
	if err := im.read(img, withChildren); err != nil {
		return image{}, err
	}
	return im, nil
}

// read fills in what im learns from the open img: its id (when opened by name), parent and
// overlap, size, creation time and, when asked, its children.
func (im *image) read(img *rbd.Image, withChildren bool) error {
	var err error
	if im.id == "" {
		if im.id, err = img.GetId(); err != nil {
			return fmt.Errorf("id of %s: %w", im.Spec, err)
		}
	}
	parent, err := img.GetParent()
	switch {
	case errors.Is(err, rbd.ErrNotFound):
	case err != nil:
		return fmt.Errorf("parent of %s: %w", im.Spec, err)
	default:
		im.parent = parent
		if im.overlap, err = img.GetOverlap(); err != nil {
			return fmt.Errorf("parent overlap of %s: %w", im.Spec, err)
		}
	}
	if im.size, err = img.GetSize(); err != nil {
		return fmt.Errorf("size of %s: %w", im.Spec, err)
	}
	if ts, err := img.GetCreateTimestamp(); err == nil {
		im.created = time.Unix(ts.Sec, ts.Nsec)
	}
	if withChildren {
		if im.children, err = img.ListChildrenAttributes(); err != nil {
			return fmt.Errorf("children of %s: %w", im.Spec, err)
		}
	}
	return nil
}

// clone turns an image with a parent into a Clone, its parent chain walked (and cached).
func (p *pass) clone(im image, source, owner, reason string) Clone {
	chain := append([]rbdimage.Spec{rbdimage.FromParent(im.parent)}, p.chainOf(im.parent.Image, 0)...)
	return Clone{Spec: im.Spec, Parent: chain[0], Chain: chain,
		Size: im.size, Overlap: im.overlap, Depth: len(chain), Created: im.created,
		Source: source, Owner: owner, Reason: reason}
}

// maxDepth stops a walk up a parent chain that never ends (it cannot in Ceph, but a bound costs nothing).
const maxDepth = 64

// chainOf returns the parent chain above the image s (empty when s is flat). A parent that
// cannot be opened (in the trash, in a pool we cannot read) ends the walk.
func (p *pass) chainOf(s rbd.ImageSpec, depth int) []rbdimage.Spec {
	key := s.PoolName + "/" + s.PoolNamespace + "/" + s.ImageID
	p.mu.Lock()
	c, ok := p.chains[key]
	p.mu.Unlock()
	if ok || depth >= maxDepth {
		return c
	}
	spec := rbdimage.Spec{Pool: s.PoolName, Namespace: s.PoolNamespace, Image: s.ImageName}
	im, err := p.open(spec, s.ImageID, false)
	if err == nil && im.parent != nil {
		c = append([]rbdimage.Spec{rbdimage.FromParent(im.parent)}, p.chainOf(im.parent.Image, depth+1)...)
	}
	p.mu.Lock()
	p.chains[key] = c
	p.mu.Unlock()
	return c
}

// each runs f on every item with at most workers at once, stopping early when ctx ends or f
// fails; it returns the first error.
func each[T any](ctx context.Context, workers int, items []T, f func(T) error) error {
	var (
		mu       sync.Mutex
		firstErr error
		wg       sync.WaitGroup
		next     = make(chan T)
	)
	failed := func() bool { mu.Lock(); defer mu.Unlock(); return firstErr != nil }
	for range min(workers, len(items)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for it := range next {
				if err := f(it); err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
				}
			}
		}()
	}
feed:
	for _, it := range items {
		if failed() {
			break
		}
		select {
		case next <- it:
		case <-ctx.Done():
			break feed
		}
	}
	close(next)
	wg.Wait()
	if ctx.Err() != nil {
		return context.Cause(ctx)
	}
	return firstErr
}
