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
	// Workers bounds how many images are read at once (default 16).
	Workers int
}

// Name implements Source.
func (p Pool) Name() string {
	if p.Namespace != "" {
		return "pool:" + p.Pool + "/" + p.Namespace
	}
	return "pool:" + p.Pool
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
	ioctx, err := cephconn.OpenPool(conn, p.Pool)
	if err != nil {
		return Found{}, err
	}
	defer ioctx.Destroy()
	where := fmt.Sprintf("pool %q", p.Pool)
	if p.Namespace != "" {
		where = fmt.Sprintf("namespace %q of pool %q", p.Namespace, p.Pool)
		// A missing namespace would list as empty: say so instead.
		if err := CheckNamespace(ioctx, p.Pool, p.Namespace); err != nil {
			return Found{}, err
		}
		ioctx.SetNamespace(p.Namespace)
	}
	ids, err := listImages(ioctx)
	if err != nil {
		return Found{}, fmt.Errorf("listing images in %s: %w", where, err)
	}
	var names []string
	for name := range ids {
		if p.Match == nil || p.Match.MatchString(name) {
			names = append(names, name)
		}
	}
	keys := []string{"parent"}
	metaKey := "metadata_" + p.OwnerKey
	if !p.Shared {
		keys = append(keys, metaKey)
	}
	workers := p.Workers
	if workers <= 0 {
		workers = 16
	}

	ps := newPass(conn)
	defer ps.close()
	var (
		found  Found
		report = make(chan func(*Found))
	)
	collected := make(chan struct{})
	go func() {
		for r := range report {
			r(&found)
		}
		close(collected)
	}()
	err = each(ctx, workers, names, func(name string) error {
		id := ids[name]
		vals, err := headerKeys(ioctx, id, keys)
		if errors.Is(err, rados.ErrNotFound) {
			return nil // removed since the listing
		}
		if err != nil {
			return fmt.Errorf("reading the header of %s: %w", spec(p.Pool, p.Namespace, name), err)
		}
		_, maybeClone := vals["parent"]
		var reason, owner string
		if p.Shared {
			if !maybeClone {
				return nil
			}
			reason = "shared backlog of " + where
			if p.Match != nil {
				reason += fmt.Sprintf(" (name matches %q)", p.Match.String())
			}
		} else {
			tag, tagged := vals[metaKey]
			if !tagged || string(tag) != p.Node {
				return nil
			}
			owner = p.Node
			reason = fmt.Sprintf("image-meta %s = %s", p.OwnerKey, p.Node)
			if !maybeClone {
				report <- func(f *Found) {
					f.Skipped = append(f.Skipped, Skipped{Image: spec(p.Pool, p.Namespace, name), Source: p.Name(), Reason: "already flat (" + reason + ")"})
				}
				return nil
			}
		}
		im, err := ps.open(p.Pool, p.Namespace, name, id, false)
		if errors.Is(err, errGone) {
			return nil
		}
		if err != nil {
			return err
		}
		if im.parent == nil {
			if !p.Shared {
				report <- func(f *Found) {
					f.Skipped = append(f.Skipped, Skipped{Image: im.spec(), Source: p.Name(), Reason: "already flat (" + reason + ")"})
				}
			}
			return nil
		}
		c := ps.clone(im, p.Name(), owner, reason)
		report <- func(f *Found) { f.Clones = append(f.Clones, c) }
		return nil
	})
	close(report)
	<-collected
	if err != nil {
		return Found{}, err
	}
	return found, nil
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
