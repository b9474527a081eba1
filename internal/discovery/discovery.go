// Package discovery answers "which clones are mine?": it lists the RBD clones this node owns from
// one or more sources (the pools' owner tags or shared backlogs, and the VM disks libvirt knows
// on this host), merged, each with why it was selected. It only reads: no image is opened for
// writing, no image-meta is written, and every image it opens is closed before it returns.
//
// Where things are: discovery.go (what a discovery returns, and Find merging the sources),
// pass.go (what one run shares: read-only opens, parent chains, the worker pool), pool.go (the
// pool source), libvirt.go (the libvirt source: from the VM disks down the clone tree) and
// disks.go (reading the VM disks from libvirt and domain XML).
package discovery

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/ceph/go-ceph/rados"

	"github.com/flattend/flattend/internal/rbdimage"
)

// Clone is one image that still has a parent and that this node should flatten. Its embedded
// Spec (no Snap) names it: c.Pool, c.Namespace, c.Image, and c.String() is "pool/image" or
// "pool/namespace/image".
type Clone struct {
	rbdimage.Spec
	Parent rbdimage.Spec // the parent snapshot (Snap set)
	// Chain is the whole parent chain, nearest first: Chain[0] == Parent. It ends early at a
	// parent that cannot be read (in another cluster's pool, removed to the trash …).
	Chain   []rbdimage.Spec
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

// Skipped is an image a source looked at and left out, with the reason, when that is worth
// telling an operator (a disk of this node's VM that is a clone, an image tagged for this node
// that is flat already …). Images that simply are not this node's are not listed.
type Skipped struct {
	Image  string // "pool/image" or "pool/namespace/image"; a malformed libvirt disk name, quoted
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
	var all Found
	at := map[string]int{} // spec → index in all.Clones
	var skipped []Skipped
	for _, s := range sources {
		f, err := s.Discover(ctx, conn)
		if err != nil {
			return Found{}, fmt.Errorf("discovery from %s: %w", s.Name(), err)
		}
		for _, c := range f.Clones {
			all.Clones = merge(all.Clones, at, c)
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
	sort.Slice(all.Clones, func(i, j int) bool { return all.Clones[i].String() < all.Clones[j].String() })
	sort.SliceStable(all.Skipped, func(i, j int) bool { return all.Skipped[i].Image < all.Skipped[j].Image })
	return all, nil
}

// merge adds c to clones, or, when another source selected it already, records c's source in
// the first one's AlsoBy.
func merge(clones []Clone, at map[string]int, c Clone) []Clone {
	i, ok := at[c.String()]
	if !ok {
		at[c.String()] = len(clones)
		return append(clones, c)
	}
	if first := &clones[i]; first.Source != c.Source && !slices.Contains(first.AlsoBy, c.Source) {
		first.AlsoBy = append(first.AlsoBy, c.Source)
	}
	return clones
}

// collector gathers what a source's concurrent lookups find.
type collector struct {
	mu    sync.Mutex
	found Found
}

func (c *collector) clone(cl Clone) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.found.Clones = append(c.found.Clones, cl)
}

func (c *collector) skip(image rbdimage.Spec, source, reason string) {
	c.add(Skipped{Image: image.String(), Source: source, Reason: reason})
}

func (c *collector) add(s Skipped) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.found.Skipped = append(c.found.Skipped, s)
}
