// Package discovery answers "which clones are mine?": it lists the RBD clones this node owns from
// one or more sources (the pools' owner tags or shared backlogs, and the VM disks libvirt knows
// on this host), merged, each with why it was selected. It only reads: no image is opened for
// writing, no image-meta is written, and every image it opens is closed before it returns.
package discovery

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"
)

// Clone is one image that still has a parent and that this node should flatten.
type Clone struct {
	Pool      string
	Namespace string
	Image     string
	Parent    string // "pool/image@snap" or "pool/namespace/image@snap"
	// Chain is the whole parent chain, nearest first: Chain[0] == Parent. It ends early at a
	// parent that cannot be read (in another cluster's pool, removed to the trash …).
	Chain   []string
	Size    uint64 // bytes
	Overlap uint64 // bytes still shared with the parent: at most what a flatten copies
	Depth   int    // 1 for a clone of a flat image, 2 for a clone of a clone …
	Created time.Time
	Source  string // which source selected it, e.g. "pool:vms" or "libvirt"
	// Owner is the node the source says owns the clone; empty for a shared backlog.
	Owner string
	// Reason says, for people, why the source selected it.
	Reason string
	// AlsoBy lists the other sources that selected it too.
	AlsoBy []string
}

// Spec is "pool/image" or "pool/namespace/image".
func (c Clone) Spec() string { return spec(c.Pool, c.Namespace, c.Image) }

func spec(pool, ns, image string) string {
	if ns != "" {
		return pool + "/" + ns + "/" + image
	}
	return pool + "/" + image
}

// Skipped is an image a source looked at and left out, with the reason, when that is worth
// telling an operator (a disk of this node's VM that is a clone, an image tagged for this node
// that is flat already …). Images that simply are not this node's are not listed.
type Skipped struct {
	Image  string // "pool/image" or "pool/namespace/image"
	Source string
	Reason string
}

// Found is what sources found.
type Found struct {
	Clones  []Clone
	Skipped []Skipped
}

// Source is one way of finding this node's clones.
type Source interface {
	// Name says where clones come from, for logs ("pool:vms", "libvirt").
	Name() string
	// Discover lists the clones this source selects, on conn.
	Discover(ctx context.Context, conn *rados.Conn) (Found, error)
}

// Find runs every source and returns their clones once each, ordered by spec, and what they
// skipped (less what another source selected). A failing source fails the whole discovery: a
// partial list would look like "nothing left to do".
func Find(ctx context.Context, conn *rados.Conn, sources []Source) (Found, error) {
	at := map[string]int{}
	var all Found
	var skipped []Skipped
	for _, s := range sources {
		f, err := s.Discover(ctx, conn)
		if err != nil {
			return Found{}, fmt.Errorf("discovery from %s: %w", s.Name(), err)
		}
		for _, c := range f.Clones {
			if i, ok := at[c.Spec()]; ok {
				if first := &all.Clones[i]; first.Source != c.Source && !slices.Contains(first.AlsoBy, c.Source) {
					first.AlsoBy = append(first.AlsoBy, c.Source)
				}
				continue
			}
			at[c.Spec()] = len(all.Clones)
			all.Clones = append(all.Clones, c)
		}
		skipped = append(skipped, f.Skipped...)
	}
	seen := map[Skipped]bool{}
	for _, s := range skipped {
		if _, selected := at[s.Image]; !selected && !seen[s] {
			seen[s] = true
			all.Skipped = append(all.Skipped, s)
		}
	}
	sort.Slice(all.Clones, func(i, j int) bool { return all.Clones[i].Spec() < all.Clones[j].Spec() })
	sort.SliceStable(all.Skipped, func(i, j int) bool { return all.Skipped[i].Image < all.Skipped[j].Image })
	return all, nil
}

// Discover is Find without the skipped images.
func Discover(ctx context.Context, conn *rados.Conn, sources []Source) ([]Clone, error) {
	f, err := Find(ctx, conn, sources)
	return f.Clones, err
}

// pass holds what one discovery run shares between its lookups: I/O contexts per pool and
// namespace, and the parent chains already walked. Close releases the I/O contexts.
type pass struct {
	conn   *rados.Conn
	mu     sync.Mutex
	ioctxs map[[2]string]*rados.IOContext
	chains map[string][]string // image id key → that image's own parent chain
}

func newPass(conn *rados.Conn) *pass {
	return &pass{conn: conn, ioctxs: map[[2]string]*rados.IOContext{}, chains: map[string][]string{}}
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

// errGone is an image removed (or moved to the trash) since it was listed.
var errGone = errors.New("image gone")

// image is what one read-only open of an image learns.
type image struct {
	pool, ns, name, id string
	parent             *rbd.ParentInfo // nil when flat
	size, overlap      uint64
	created            time.Time
	children           []rbd.ImageSpec // only when asked for
}

func (i image) spec() string { return spec(i.pool, i.ns, i.name) }

// open reads an image by id (or by name when id is empty), read-only, and closes it again. A
// read-only open registers no watch and takes no lock: a running VM does not notice it.
func (p *pass) open(pool, ns, name, id string, withChildren bool) (image, error) {
	ioctx, err := p.ioctx(pool, ns)
	if err != nil {
		return image{}, err
	}
	var img *rbd.Image
	if id != "" {
		img, err = rbd.OpenImageByIdReadOnly(ioctx, id, rbd.NoSnapshot)
	} else {
		img, err = rbd.OpenImageReadOnly(ioctx, name, rbd.NoSnapshot)
	}
	what := spec(pool, ns, name)
	if errors.Is(err, rbd.ErrNotFound) {
		return image{}, fmt.Errorf("%s: %w", what, errGone)
	}
	if err != nil {
		return image{}, fmt.Errorf("opening %s: %w", what, err)
	}
	defer img.Close()
	im := image{pool: pool, ns: ns, name: name, id: id}
	if im.id == "" {
		if im.id, err = img.GetId(); err != nil {
			return image{}, fmt.Errorf("id of %s: %w", what, err)
		}
	}
	parent, err := img.GetParent()
	switch {
	case errors.Is(err, rbd.ErrNotFound):
	case err != nil:
		return image{}, fmt.Errorf("parent of %s: %w", what, err)
	default:
		im.parent = parent
		if im.overlap, err = img.GetOverlap(); err != nil {
			return image{}, fmt.Errorf("parent overlap of %s: %w", what, err)
		}
	}
	if im.size, err = img.GetSize(); err != nil {
		return image{}, fmt.Errorf("size of %s: %w", what, err)
	}
	if ts, err := img.GetCreateTimestamp(); err == nil {
		im.created = time.Unix(ts.Sec, ts.Nsec)
	}
	if withChildren {
		if im.children, err = img.ListChildrenAttributes(); err != nil {
			return image{}, fmt.Errorf("children of %s: %w", what, err)
		}
	}
	return im, nil
}

// clone turns an image with a parent into a Clone, its parent chain walked (and cached).
func (p *pass) clone(im image, source, owner, reason string) Clone {
	chain := append([]string{parentSpec(im.parent)}, p.chainOf(im.parent.Image, 0)...)
	return Clone{Pool: im.pool, Namespace: im.ns, Image: im.name, Parent: chain[0], Chain: chain,
		Size: im.size, Overlap: im.overlap, Depth: len(chain), Created: im.created,
		Source: source, Owner: owner, Reason: reason}
}

// maxDepth stops a walk up a parent chain that never ends (it cannot in Ceph, but a bound costs nothing).
const maxDepth = 64

// chainOf returns the parent chain above the image s (empty when s is flat). A parent that
// cannot be opened (in the trash, in a pool we cannot read) ends the walk.
func (p *pass) chainOf(s rbd.ImageSpec, depth int) []string {
	key := s.PoolName + "/" + s.PoolNamespace + "/" + s.ImageID
	p.mu.Lock()
	c, ok := p.chains[key]
	p.mu.Unlock()
	if ok || depth >= maxDepth {
		return c
	}
	im, err := p.open(s.PoolName, s.PoolNamespace, s.ImageName, s.ImageID, false)
	if err == nil && im.parent != nil {
		c = append([]string{parentSpec(im.parent)}, p.chainOf(im.parent.Image, depth+1)...)
	}
	p.mu.Lock()
	p.chains[key] = c
	p.mu.Unlock()
	return c
}

func parentSpec(p *rbd.ParentInfo) string {
	return spec(p.Image.PoolName, p.Image.PoolNamespace, p.Image.ImageName) + "@" + p.Snap.SnapName
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
