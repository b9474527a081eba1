// Package discovery answers "which clones are mine?": it lists the RBD clones this node owns from
// one or more sources, merged and ordered. It only reads.
package discovery

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"

	"github.com/flattend/flattend/internal/cephconn"
)

// Clone is one image that still has a parent and that this node should flatten.
type Clone struct {
	Pool      string
	Namespace string
	Image     string
	Parent    string // "pool/image@snap"
	Size      uint64 // bytes
	Overlap   uint64 // bytes still shared with the parent: at most what a flatten copies
	Depth     int    // 1 for a clone of a flat image, 2 for a clone of a clone …
	Created   time.Time
	Source    string // which source selected it, e.g. "pool:vms"
}

// Spec is "pool/image" or "pool/namespace/image".
func (c Clone) Spec() string {
	if c.Namespace != "" {
		return c.Pool + "/" + c.Namespace + "/" + c.Image
	}
	return c.Pool + "/" + c.Image
}

// Source is one way of finding this node's clones.
type Source interface {
	// Name says where clones come from, for logs ("pool:vms").
	Name() string
	// Discover lists the clones this source selects, on conn.
	Discover(ctx context.Context, conn *rados.Conn) ([]Clone, error)
}

// Discover runs every source and returns their clones once each, ordered by spec. A failing
// source fails the whole discovery: a partial list would look like "nothing left to do".
func Discover(ctx context.Context, conn *rados.Conn, sources []Source) ([]Clone, error) {
	seen := map[string]bool{}
	var all []Clone
	for _, s := range sources {
		clones, err := s.Discover(ctx, conn)
		if err != nil {
			return nil, fmt.Errorf("discovery from %s: %w", s.Name(), err)
		}
		for _, c := range clones {
			if !seen[c.Spec()] {
				seen[c.Spec()] = true
				all = append(all, c)
			}
		}
	}
	sort.Slice(all, func(i, j int) bool { return all[i].Spec() < all[j].Spec() })
	return all, nil
}

// PoolOwner selects the clones in Pool whose image-meta OwnerKey equals Node.
type PoolOwner struct {
	Pool     string
	OwnerKey string
	Node     string
	// Workers bounds how many images are inspected at once (default 8).
	Workers int
}

// Name implements Source.
func (p PoolOwner) Name() string { return "pool:" + p.Pool }

// Discover implements Source. It opens every image of the pool read-only, one image-meta read and
// one parent lookup each, and closes it again.
func (p PoolOwner) Discover(ctx context.Context, conn *rados.Conn) ([]Clone, error) {
	ioctx, err := cephconn.OpenPool(conn, p.Pool)
	if err != nil {
		return nil, err
	}
	defer ioctx.Destroy()
	names, err := rbd.GetImageNames(ioctx)
	if err != nil {
		return nil, fmt.Errorf("listing images in pool %q: %w", p.Pool, err)
	}
	workers := p.Workers
	if workers <= 0 {
		workers = 8
	}

	var (
		mu       sync.Mutex
		clones   []Clone
		firstErr error
		wg       sync.WaitGroup
		next     = make(chan string)
	)
	for range min(workers, len(names)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for name := range next {
				c, ok, err := p.inspect(conn, ioctx, name)
				mu.Lock()
				switch {
				case err != nil && firstErr == nil:
					firstErr = err
				case ok:
					clones = append(clones, c)
				}
				mu.Unlock()
			}
		}()
	}
feed:
	for _, name := range names {
		select {
		case next <- name:
		case <-ctx.Done():
			break feed
		}
	}
	close(next)
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return nil, context.Cause(ctx)
	}
	return clones, firstErr
}

func (p PoolOwner) inspect(conn *rados.Conn, ioctx *rados.IOContext, name string) (Clone, bool, error) {
	img, err := rbd.OpenImageReadOnly(ioctx, name, rbd.NoSnapshot)
	if errors.Is(err, rbd.ErrNotFound) {
		return Clone{}, false, nil // removed since the listing
	}
	if err != nil {
		return Clone{}, false, fmt.Errorf("opening %s/%s: %w", p.Pool, name, err)
	}
	defer img.Close()
	owner, err := img.GetMetadata(p.OwnerKey)
	switch {
	case errors.Is(err, rbd.ErrNotFound):
		return Clone{}, false, nil // not tagged
	case err != nil:
		return Clone{}, false, fmt.Errorf("reading %s of %s/%s: %w", p.OwnerKey, p.Pool, name, err)
	case owner != p.Node:
		return Clone{}, false, nil
	}
	parent, err := img.GetParent()
	if errors.Is(err, rbd.ErrNotFound) {
		return Clone{}, false, nil // already flat
	}
	if err != nil {
		return Clone{}, false, fmt.Errorf("parent of %s/%s: %w", p.Pool, name, err)
	}
	c := Clone{Pool: p.Pool, Image: name, Parent: parentSpec(parent), Source: p.Name()}
	if c.Size, err = img.GetSize(); err != nil {
		return Clone{}, false, fmt.Errorf("size of %s/%s: %w", p.Pool, name, err)
	}
	if c.Overlap, err = img.GetOverlap(); err != nil {
		return Clone{}, false, fmt.Errorf("parent overlap of %s/%s: %w", p.Pool, name, err)
	}
	if ts, err := img.GetCreateTimestamp(); err == nil {
		c.Created = time.Unix(ts.Sec, ts.Nsec)
	}
	c.Depth = 1 + ancestors(conn, parent)
	return c, true, nil
}

func parentSpec(p *rbd.ParentInfo) string {
	if p.Image.PoolNamespace != "" {
		return p.Image.PoolName + "/" + p.Image.PoolNamespace + "/" + p.Image.ImageName + "@" + p.Snap.SnapName
	}
	return p.Image.PoolName + "/" + p.Image.ImageName + "@" + p.Snap.SnapName
}

// maxDepth stops a walk up a parent chain that never ends (it cannot in Ceph, but a bound costs nothing).
const maxDepth = 64

// ancestors counts the images above p in its chain (0 when p itself is flat). A parent that
// cannot be opened (in the trash, in a pool we cannot read) ends the walk: depth only orders.
func ancestors(conn *rados.Conn, p *rbd.ParentInfo) int {
	n := 0
	for ; n < maxDepth; n++ {
		pctx, err := conn.OpenIOContext(p.Image.PoolName)
		if err != nil {
			return n
		}
		pctx.SetNamespace(p.Image.PoolNamespace)
		img, err := rbd.OpenImageByIdReadOnly(pctx, p.Image.ImageID, rbd.NoSnapshot)
		if err != nil {
			pctx.Destroy()
			return n
		}
		next, err := img.GetParent()
		img.Close()
		pctx.Destroy()
		if err != nil {
			return n
		}
		p = next
	}
	return n
}
