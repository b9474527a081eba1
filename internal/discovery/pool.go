package discovery

import (
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"regexp"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"

	"github.com/flattend/flattend/internal/cephconn"
	"github.com/flattend/flattend/internal/rbdimage"
)

// ErrNoNamespace means a pool source names a namespace the pool does not have.
var ErrNoNamespace = errors.New("no such namespace (rbd namespace ls)")

// CheckNamespace says, as an error naming both, when the pool behind ioctx lacks namespace ns.
func CheckNamespace(ioctx *rados.IOContext, pool, ns string) error {
	if ok, err := rbd.NamespaceExists(ioctx, ns); err != nil || !ok {
		return fmt.Errorf("namespace %q of pool %q: %w", ns, pool, cmp.Or(err, ErrNoNamespace))
	}
	return nil
}

// DefaultPoolWorkers is how many images a Pool source reads at once when its Workers is zero.
const DefaultPoolWorkers = 16

// Pool selects clones in one pool's default namespace, or in Namespace: those whose image-meta OwnerKey names
// Node or, when Shared, every clone (a backlog that any node may work on while it holds the lock).
// Match, when set, limits either to the image names it matches.
type Pool struct {
	Pool      string
	Namespace string // "" for the default namespace
	OwnerKey  string
	Node      string
	Shared    bool
	Match     *regexp.Regexp
	// Workers bounds how many images are read at once; zero (or less) means DefaultPoolWorkers.
	// The config package has no setting for it: this is the only place it is defaulted.
	Workers int
}

// Name implements Source.
func (p Pool) Name() string {
	if p.Namespace != "" {
		return "pool:" + p.Pool + "/" + p.Namespace
	}
	return "pool:" + p.Pool
}

// workers is p.Workers, or DefaultPoolWorkers when that is not set.
func (p Pool) workers() int {
	if p.Workers <= 0 {
		return DefaultPoolWorkers
	}
	return p.Workers
}

// Discover implements Source.
//
// It costs one RADOS read per image, not an image open: the listing comes from the pool's
// rbd_directory object, and one omap read on each image's header object fetches the owner key
// (image-meta is kept there as "metadata_<key>") and whether a "parent" key exists. Only images
// that pass this filter (this node's, or any clone in a shared pool) are opened, read-only, to
// read their parent, size and overlap through librbd, which has the last word. A header keeps its
// "parent" key after a flatten when older snapshots still refer to the parent, so the filter can
// let a flat image through (librbd then says so) but never holds a clone back.
func (p Pool) Discover(ctx context.Context, conn *rados.Conn) (Found, error) {
	ioctx, err := p.openIOContext(conn)
	if err != nil {
		return Found{}, err
	}
	defer ioctx.Destroy()
	ids, err := listImages(ioctx)
	if err != nil {
		return Found{}, fmt.Errorf("listing images in %s: %w", p.where(), err)
	}
	ps := newPass(conn)
	defer ps.close()
	var out collector
	err = each(ctx, p.workers(), p.matching(ids), func(name string) error {
		return p.examine(ps, ioctx, name, ids[name], &out)
	})
	if err != nil {
		return Found{}, err
	}
	return out.found, nil
}

// openIOContext opens the pool, in p's namespace. A missing namespace would list as empty: it is
// an error instead.
func (p Pool) openIOContext(conn *rados.Conn) (*rados.IOContext, error) {
	ioctx, err := cephconn.OpenPool(conn, p.Pool)
	if err != nil {
		return nil, err
	}
	if p.Namespace != "" {
		if err := CheckNamespace(ioctx, p.Pool, p.Namespace); err != nil {
			ioctx.Destroy()
			return nil, err
		}
		ioctx.SetNamespace(p.Namespace)
	}
	return ioctx, nil
}

// where is the pool or namespace p lists, for messages.
func (p Pool) where() string {
	if p.Namespace != "" {
		return fmt.Sprintf("namespace %q of pool %q", p.Namespace, p.Pool)
	}
	return fmt.Sprintf("pool %q", p.Pool)
}

// matching is the names in ids that Match lets through.
func (p Pool) matching(ids map[string]string) []string {
	var names []string
	for name := range ids {
		if p.Match == nil || p.Match.MatchString(name) {
			names = append(names, name)
		}
	}
	return names
}

// examine decides on the image name (with id) from its header, and opens it when it may be a
// clone p selects, reporting the result to out. An image removed meanwhile is left out.
func (p Pool) examine(ps *pass, ioctx *rados.IOContext, name, id string, out *collector) error {
	s := rbdimage.Spec{Pool: p.Pool, Namespace: p.Namespace, Image: name}
	vals, err := headerKeys(ioctx, id, p.headerKeys())
	if errors.Is(err, rados.ErrNotFound) {
		return nil // removed since the listing
	}
	if err != nil {
		return fmt.Errorf("reading the header of %s: %w", s, err)
	}
	owner, reason, selected := p.selects(vals)
	if !selected {
		return nil
	}
	if _, maybeClone := vals["parent"]; !maybeClone {
		p.flat(out, s, reason)
		return nil
	}
	im, err := ps.open(s, id, false)
	if errors.Is(err, rbdimage.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	if im.parent == nil {
		p.flat(out, s, reason)
		return nil
	}
	out.clone(ps.clone(im, p.Name(), owner, reason))
	return nil
}

// headerKeys are the header omap keys examine reads: "parent" and, unless Shared, the owner key.
func (p Pool) headerKeys() []string {
	if p.Shared {
		return []string{"parent"}
	}
	return []string{"parent", p.metaKey()}
}

// metaKey is where the header keeps the image-meta OwnerKey.
func (p Pool) metaKey() string { return "metadata_" + p.OwnerKey }

// selects says whether p selects the image whose header has vals (a shared pool: every image; an
// owner pool: those tagged for Node), its owner and why.
func (p Pool) selects(vals map[string][]byte) (owner, reason string, ok bool) {
	if p.Shared {
		reason = "shared backlog of " + p.where()
		if p.Match != nil {
			reason += fmt.Sprintf(" (name matches %q)", p.Match.String())
		}
		return "", reason, true
	}
	if tag, tagged := vals[p.metaKey()]; !tagged || string(tag) != p.Node {
		return "", "", false
	}
	return p.Node, fmt.Sprintf("image-meta %s = %s", p.OwnerKey, p.Node), true
}

// flat reports an image p selected that has no parent: worth telling when it was tagged for this
// node, not in a shared backlog.
func (p Pool) flat(out *collector, s rbdimage.Spec, reason string) {
	if !p.Shared {
		out.skip(s, p.Name(), "already flat ("+reason+")")
	}
}

// listImages reads the pool's image directory: name → image id. A pool without the directory
// object has no images yet.
func listImages(ioctx *rados.IOContext) (map[string]string, error) {
	vals, err := ioctx.GetAllOmapValues("rbd_directory", "", "name_", 1024)
	if errors.Is(err, rados.ErrNotFound) {
		return map[string]string{}, nil
	}
	if err != nil {
		return nil, err
	}
	ids := make(map[string]string, len(vals))
	for k, v := range vals {
		id, err := decodeString(v)
		if err != nil {
			return nil, fmt.Errorf("rbd_directory entry %q: %w", k, err)
		}
		ids[k[len("name_"):]] = id
	}
	return ids, nil
}

// decodeString reads a Ceph-encoded string: a little-endian 32-bit length, then the bytes.
func decodeString(b []byte) (string, error) {
	if len(b) < 4 || uint64(len(b)-4) < uint64(binary.LittleEndian.Uint32(b)) {
		return "", fmt.Errorf("not an encoded string (%d bytes)", len(b))
	}
	return string(b[4 : 4+binary.LittleEndian.Uint32(b)]), nil
}

// headerKeys reads keys from the omap of an image's header object in one RADOS operation.
func headerKeys(ioctx *rados.IOContext, id string, keys []string) (map[string][]byte, error) {
	op := rados.CreateReadOp()
	defer op.Release()
	step := op.GetOmapValuesByKeys(keys)
	if err := op.Operate(ioctx, "rbd_header."+id, rados.OperationNoFlag); err != nil {
		return nil, err
	}
	vals := map[string][]byte{}
	for {
		kv, err := step.Next()
		if err != nil {
			return nil, err
		}
		if kv == nil {
			return vals, nil
		}
		vals[kv.Key] = append([]byte(nil), kv.Value...)
	}
}
