package discovery

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/ceph/go-ceph/rados"
	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket/dialers"
	"libvirt.org/go/libvirtxml"
)

// DefaultLibvirtURI is the URI of the system QEMU driver, where a hypervisor's VMs live.
const DefaultLibvirtURI = "qemu:///system"

// Libvirt selects the clones made from the snapshots of the RBD disks of every domain defined on
// this host (running or not), and their clones in turn; and, with IncludeVMDisks, those disks
// themselves when they are clones.
type Libvirt struct {
	URI            string // qemu:///system, qemu:///session, optionally with ?socket=PATH
	IncludeVMDisks bool
	Node           string
	// Timeout bounds the whole conversation with libvirt (default 30 s).
	Timeout time.Duration
	// Workers bounds how many images are read at once (default 8).
	Workers int
}

// Name implements Source.
func (l Libvirt) Name() string { return "libvirt" }

// Disk is one RBD disk of a libvirt domain.
type Disk struct {
	Domain    string
	Target    string // vda, sdb …
	Pool      string
	Namespace string
	Image     string
	Snap      string // set when the disk reads a snapshot
	// StoragePool is the libvirt storage pool of a <disk type='volume'>, whose volume is Image;
	// Pool and Namespace are then filled in from the storage pool's definition.
	StoragePool string
}

// Spec is "pool/image" or "pool/namespace/image".
func (d Disk) Spec() string { return spec(d.Pool, d.Namespace, d.Image) }

func (d Disk) String() string { return fmt.Sprintf("disk %s of domain %s", d.Target, d.Domain) }

// Endpoint is where a libvirt URI leads: the unix socket to dial (the first of Sockets that
// exists) and the URI to open once connected.
type Endpoint struct {
	Sockets []string
	Open    string
}

// ParseURI resolves a local libvirt URI as virsh does: qemu:///system or qemu:///session
// (qemu+unix:// too), with an optional ?socket=PATH. Without a socket, system URIs go to the
// read-only socket (flattend only reads; any local user may use it) of libvirtd or, failing
// that, of the modular virtqemud, then to their read-write sockets; session URIs go to
// $XDG_RUNTIME_DIR/libvirt (or ~/.cache/libvirt without XDG_RUNTIME_DIR).
func ParseURI(uri string) (Endpoint, error) {
	u, err := url.Parse(uri)
	if err != nil {
		return Endpoint{}, fmt.Errorf("%q is not a URI: %w", uri, err)
	}
	if u.Scheme != "qemu" && u.Scheme != "qemu+unix" {
		return Endpoint{}, fmt.Errorf("%q: only local qemu URIs are supported (qemu:///system, qemu:///session, optionally ?socket=PATH)", uri)
	}
	if u.Host != "" || u.User != nil {
		return Endpoint{}, fmt.Errorf("%q: remote hosts are not supported: flattend reads the VMs of its own host", uri)
	}
	var socket string
	for k, v := range u.Query() {
		if k != "socket" || len(v) != 1 || v[0] == "" {
			return Endpoint{}, fmt.Errorf("%q: the only parameter supported is socket=PATH", uri)
		}
		socket = v[0]
	}
	ep := Endpoint{Open: "qemu://" + u.Path}
	switch u.Path {
	case "/system":
		for _, d := range []string{"libvirt-sock-ro", "virtqemud-sock-ro", "libvirt-sock", "virtqemud-sock"} {
			ep.Sockets = append(ep.Sockets, "/run/libvirt/"+d)
		}
	case "/session":
		dir := os.Getenv("XDG_RUNTIME_DIR")
		if dir == "" {
			home, _ := os.UserHomeDir()
			dir = filepath.Join(home, ".cache")
		}
		ep.Sockets = []string{filepath.Join(dir, "libvirt", "libvirt-sock"), filepath.Join(dir, "libvirt", "virtqemud-sock")}
	default:
		return Endpoint{}, fmt.Errorf("%q: use qemu:///system or qemu:///session", uri)
	}
	if socket != "" {
		ep.Sockets = []string{socket}
	}
	return ep, nil
}

// Disks lists the RBD disks of every domain defined on this host, running or shut off: of the
// live definition of a running domain and of its persistent one, which may differ.
func (l Libvirt) Disks(ctx context.Context) ([]Disk, int, error) {
	uri := l.URI
	if uri == "" {
		uri = DefaultLibvirtURI
	}
	ep, err := ParseURI(uri)
	if err != nil {
		return nil, 0, err
	}
	socket := ep.Sockets[0]
	for _, s := range ep.Sockets {
		if _, err := os.Stat(s); err == nil {
			socket = s
			break
		}
	}
	timeout := l.Timeout
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	type result struct {
		disks   []Disk
		domains int
		err     error
	}
	lv := golibvirt.NewWithDialer(dialers.NewLocal(dialers.WithSocket(socket), dialers.WithLocalTimeout(timeout)))
	done := make(chan result, 1)
	go func() {
		var r result
		r.disks, r.domains, r.err = readDisks(lv, ep.Open)
		done <- r
	}()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	var r result
	select {
	case r = <-done:
	case <-ctx.Done():
		_ = lv.Disconnect() // unblocks the calls in flight
		return nil, 0, context.Cause(ctx)
	case <-timer.C:
		_ = lv.Disconnect()
		r.err = fmt.Errorf("no answer within %s", timeout)
	}
	if r.err != nil {
		return nil, 0, fmt.Errorf("libvirt %s (socket %s): %w", uri, socket, r.err)
	}
	return r.disks, r.domains, nil
}

func readDisks(lv *golibvirt.Libvirt, uri string) ([]Disk, int, error) {
	if err := lv.ConnectToURI(golibvirt.ConnectURI(uri)); err != nil {
		return nil, 0, fmt.Errorf("cannot connect (is libvirtd running, and may this user use its socket?): %w", err)
	}
	defer func() { _ = lv.Disconnect() }()
	doms, _, err := lv.ConnectListAllDomains(1, golibvirt.ConnectListDomainsActive|golibvirt.ConnectListDomainsInactive)
	if err != nil {
		return nil, 0, fmt.Errorf("listing domains: %w", err)
	}
	var disks []Disk
	seen := map[Disk]bool{}
	pools := storagePools{lv: lv, rbd: map[string]*[2]string{}}
	for _, d := range doms {
		flags := []golibvirt.DomainXMLFlags{0}
		if d.ID > 0 { // running: its persistent definition may have other disks
			flags = append(flags, golibvirt.DomainXMLInactive)
		}
		for _, f := range flags {
			xml, err := lv.DomainGetXMLDesc(d, f)
			if err != nil {
				if f != 0 {
					continue // a transient domain has no persistent definition
				}
				return nil, 0, fmt.Errorf("definition of domain %s: %w", d.Name, err)
			}
			ds, err := DomainDisks(xml)
			if err != nil {
				return nil, 0, fmt.Errorf("domain %s: %w", d.Name, err)
			}
			if ds, err = pools.resolve(ds); err != nil {
				return nil, 0, fmt.Errorf("domain %s: %w", d.Name, err)
			}
			for _, disk := range ds {
				if !seen[disk] {
					seen[disk] = true
					disks = append(disks, disk)
				}
			}
		}
	}
	return disks, len(doms), nil
}

// storagePools resolves the volumes of libvirt storage pools to RBD images, reading each pool's
// definition once per pass.
type storagePools struct {
	lv  *golibvirt.Libvirt
	rbd map[string]*[2]string // libvirt pool → Ceph pool and namespace; nil: not an rbd pool
}

// resolve fills in the Ceph pool of every volume disk and drops the volumes of pools that are
// not RBD (file, LVM …) or no longer defined (such a domain cannot start).
func (s storagePools) resolve(disks []Disk) ([]Disk, error) {
	out := disks[:0]
	for _, d := range disks {
		if d.StoragePool == "" {
			out = append(out, d)
			continue
		}
		ceph, known := s.rbd[d.StoragePool]
		if !known {
			var err error
			if ceph, err = s.read(d.StoragePool); err != nil {
				return nil, fmt.Errorf("storage pool %s of %s: %w", d.StoragePool, d, err)
			}
			s.rbd[d.StoragePool] = ceph
		}
		if ceph != nil {
			d.Pool, d.Namespace = ceph[0], ceph[1]
			out = append(out, d)
		}
	}
	return out, nil
}

func (s storagePools) read(name string) (*[2]string, error) {
	pool, err := s.lv.StoragePoolLookupByName(name)
	if err != nil {
		var lerr golibvirt.Error
		if errors.As(err, &lerr) && lerr.Code == uint32(golibvirt.ErrNoStoragePool) {
			return nil, nil
		}
		return nil, err
	}
	xml, err := s.lv.StoragePoolGetXMLDesc(pool, 0)
	if err != nil {
		return nil, err
	}
	var def libvirtxml.StoragePool
	if err := def.Unmarshal(xml); err != nil {
		return nil, fmt.Errorf("parsing its XML: %w", err)
	}
	if def.Type != "rbd" || def.Source == nil || def.Source.Name == "" {
		return nil, nil
	}
	// The source name is the Ceph pool, or pool/namespace.
	cephPool, ns, _ := strings.Cut(def.Source.Name, "/")
	return &[2]string{cephPool, ns}, nil
}

// DomainDisks reads the RBD disks (<disk type='network'><source protocol='rbd'
// name='pool/image'>, or pool/namespace/image, optionally @snap) out of a domain's XML, and the
// volume disks (<disk type='volume'><source pool='P' volume='V'>) with their libvirt storage
// pool, which only libvirt can map to a Ceph pool.
func DomainDisks(xml string) ([]Disk, error) {
	var dom libvirtxml.Domain
	if err := dom.Unmarshal(xml); err != nil {
		return nil, fmt.Errorf("parsing the domain XML: %w", err)
	}
	if dom.Devices == nil {
		return nil, nil
	}
	var disks []Disk
	for _, d := range dom.Devices.Disks {
		if d.Source != nil && d.Source.Volume != nil && d.Source.Volume.Pool != "" && d.Source.Volume.Volume != "" {
			disk := Disk{Domain: dom.Name, StoragePool: d.Source.Volume.Pool, Image: d.Source.Volume.Volume}
			if d.Target != nil {
				disk.Target = d.Target.Dev
			}
			disks = append(disks, disk)
			continue
		}
		if d.Source == nil || d.Source.Network == nil || d.Source.Network.Protocol != "rbd" {
			continue
		}
		disk := Disk{Domain: dom.Name}
		if d.Target != nil {
			disk.Target = d.Target.Dev
		}
		name := d.Source.Network.Name
		if i := strings.IndexByte(name, '@'); i >= 0 {
			name, disk.Snap = name[:i], name[i+1:]
		}
		if s := d.Source.Network.Snapshot; s != nil && s.Name != "" {
			disk.Snap = s.Name
		}
		parts := strings.Split(name, "/")
		switch {
		case len(parts) == 2 && parts[0] != "" && parts[1] != "":
			disk.Pool, disk.Image = parts[0], parts[1]
		case len(parts) == 3 && parts[0] != "" && parts[1] != "" && parts[2] != "":
			disk.Pool, disk.Namespace, disk.Image = parts[0], parts[1], parts[2]
		default:
			return nil, fmt.Errorf("disk %s: rbd source name %q is not pool/image or pool/namespace/image", disk.Target, d.Source.Network.Name)
		}
		disks = append(disks, disk)
	}
	return disks, nil
}

// Discover implements Source: it reads the disks from libvirt, then walks the clone tree below
// each disk (children of every snapshot, in any pool and namespace, and their children in turn),
// opening each image read-only once.
func (l Libvirt) Discover(ctx context.Context, conn *rados.Conn) (Found, error) {
	disks, _, err := l.Disks(ctx)
	if err != nil {
		return Found{}, err
	}
	workers := l.Workers
	if workers <= 0 {
		workers = 8
	}
	ps := newPass(conn)
	defer ps.close()

	var (
		mu      sync.Mutex
		found   Found
		visited = map[string]bool{} // pool/namespace/id
	)
	skip := func(image, reason string) {
		mu.Lock()
		found.Skipped = append(found.Skipped, Skipped{Image: image, Source: l.Name(), Reason: reason})
		mu.Unlock()
	}
	// node is an image to read, and how it relates to this host's disks.
	type node struct {
		pool, ns, name, id string
		disks              []Disk // set for a VM disk itself
		via                string // for a descendant: "descendant of disk vda (vms/x) of domain vm1"
	}
	byImage := map[string][]Disk{}
	var level []node
	for _, d := range disks {
		if d.Snap != "" {
			skip(d.Spec(), fmt.Sprintf("%s reads snapshot %s: a shared read-only source, its clones are not this node's", d, d.Snap))
			continue
		}
		if byImage[d.Spec()] == nil {
			level = append(level, node{pool: d.Pool, ns: d.Namespace, name: d.Image})
		}
		byImage[d.Spec()] = append(byImage[d.Spec()], d)
	}
	for i := range level {
		level[i].disks = byImage[spec(level[i].pool, level[i].ns, level[i].name)]
	}

	for len(level) > 0 {
		var next []node
		err := each(ctx, workers, level, func(n node) error {
			im, err := ps.open(n.pool, n.ns, n.name, n.id, true)
			switch {
			case errors.Is(err, errGone) && n.disks != nil:
				skip(spec(n.pool, n.ns, n.name), fmt.Sprintf("%s: no such image in this cluster", describe(n.disks)))
				return nil
			case errors.Is(err, errGone):
				return nil // removed since its parent listed it
			case isNoPool(err) && n.disks != nil:
				skip(spec(n.pool, n.ns, n.name), fmt.Sprintf("%s: no such pool or namespace in this cluster", describe(n.disks)))
				return nil
			case err != nil:
				return err
			}
			key := im.pool + "/" + im.ns + "/" + im.id
			mu.Lock()
			dup := visited[key]
			visited[key] = true
			mu.Unlock()
			if dup {
				return nil
			}
			via := n.via
			if n.disks != nil {
				via = fmt.Sprintf("descendant of %s (%s)", describe(n.disks), im.spec())
			}
			if im.parent != nil {
				switch {
				case n.disks == nil:
					c := ps.clone(im, l.Name(), l.Node, fmt.Sprintf("clone of %s, %s", parentSpec(im.parent), via))
					mu.Lock()
					found.Clones = append(found.Clones, c)
					mu.Unlock()
				case l.IncludeVMDisks:
					c := ps.clone(im, l.Name(), l.Node, describe(n.disks)+", itself a clone (discovery.libvirt.include_vm_disks)")
					mu.Lock()
					found.Clones = append(found.Clones, c)
					mu.Unlock()
				default:
					skip(im.spec(), fmt.Sprintf("%s, a clone of %s: discovery.libvirt.include_vm_disks is false",
						describe(n.disks), parentSpec(im.parent)))
				}
			}
			for _, ch := range im.children {
				if ch.Trash {
					skip(spec(ch.PoolName, ch.PoolNamespace, ch.ImageName), "in the trash (clone of "+im.spec()+", "+via+")")
					continue
				}
				mu.Lock()
				next = append(next, node{pool: ch.PoolName, ns: ch.PoolNamespace, name: ch.ImageName, id: ch.ImageID, via: via})
				mu.Unlock()
			}
			return nil
		})
		if err != nil {
			return Found{}, err
		}
		level = next
	}
	return found, nil
}

// Check connects to libvirt and counts the domains and their RBD disks, for `flattend check`.
func (l Libvirt) Check(ctx context.Context) (domains, disks int, err error) {
	ds, n, err := l.Disks(ctx)
	return n, len(ds), err
}

func describe(disks []Disk) string {
	var s []string
	for _, d := range disks {
		s = append(s, d.String())
	}
	slices.Sort(s)
	return strings.Join(s, " and ")
}

func isNoPool(err error) bool { return errors.Is(err, errNoPool) }
