package discovery

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket/dialers"
	"libvirt.org/go/libvirtxml"

	"github.com/flattend/flattend/internal/libvirturi"
	"github.com/flattend/flattend/internal/rbdimage"
)

// Disk is one RBD disk of a libvirt domain. Its embedded Spec is the image it reads (d.Pool,
// d.Namespace, d.Image; d.Snap set when the disk reads a snapshot); d.Spec.String() prints that,
// d.String() the disk itself.
type Disk struct {
	Domain string
	Target string // vda, sdb …
	rbdimage.Spec
	// StoragePool is the libvirt storage pool of a <disk type='volume'>, whose volume is Image;
	// Pool and Namespace are then filled in from the storage pool's definition.
	StoragePool string
}

// String is "disk vda of domain vm1".
func (d Disk) String() string { return fmt.Sprintf("disk %s of domain %s", d.Target, d.Domain) }

// Disks lists the RBD disks of every domain defined on this host, running or shut off: of the
// live definition of a running domain and of its persistent one, which may differ. It also
// returns how many domains there are.
func (l Libvirt) Disks(ctx context.Context) ([]Disk, int, error) {
	l = l.withDefaults()
	ep, err := libvirturi.Parse(l.URI)
	if err != nil {
		return nil, 0, err
	}
	socket := ep.Socket()
	type result struct {
		disks   []Disk
		domains int
		err     error
	}
	lv := golibvirt.NewWithDialer(dialers.NewLocal(dialers.WithSocket(socket), dialers.WithLocalTimeout(l.Timeout)))
	done := make(chan result, 1)
	go func() {
		var r result
		r.disks, r.domains, r.err = readDisks(lv, ep.Open)
		done <- r
	}()
	timer := time.NewTimer(l.Timeout)
	defer timer.Stop()
	var r result
	select {
	case r = <-done:
	case <-ctx.Done():
		_ = lv.Disconnect() // unblocks the calls in flight
		return nil, 0, context.Cause(ctx)
	case <-timer.C:
		_ = lv.Disconnect()
		r.err = fmt.Errorf("no answer within %s", l.Timeout)
	}
	if r.err != nil {
		return nil, 0, fmt.Errorf("libvirt %s (socket %s): %w", l.URI, socket, r.err)
	}
	return r.disks, r.domains, nil
}

// readDisks connects lv to uri and reads the disks of every domain, each disk once.
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
		ds, err := domainDisks(lv, d, pools)
		if err != nil {
			return nil, 0, err
		}
		for _, disk := range ds {
			if !seen[disk] {
				seen[disk] = true
				disks = append(disks, disk)
			}
		}
	}
	return disks, len(doms), nil
}

// domainDisks reads the RBD disks of domain d: of its live definition and, when it runs, of its
// persistent one (which may have other disks), volumes resolved to their Ceph pools.
func domainDisks(lv *golibvirt.Libvirt, d golibvirt.Domain, pools storagePools) ([]Disk, error) {
	flags := []golibvirt.DomainXMLFlags{0}
	if d.ID > 0 {
		flags = append(flags, golibvirt.DomainXMLInactive)
	}
	var disks []Disk
	for _, f := range flags {
		xml, err := lv.DomainGetXMLDesc(d, f)
		if err != nil {
			if f != 0 {
				continue // a transient domain has no persistent definition
			}
			return nil, fmt.Errorf("definition of domain %s: %w", d.Name, err)
		}
		ds, err := DomainDisks(xml)
		if err != nil {
			return nil, fmt.Errorf("domain %s: %w", d.Name, err)
		}
		if ds, err = pools.resolve(ds); err != nil {
			return nil, fmt.Errorf("domain %s: %w", d.Name, err)
		}
		disks = append(disks, ds...)
	}
	return disks, nil
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
		disk := Disk{Domain: dom.Name}
		if d.Target != nil {
			disk.Target = d.Target.Dev
		}
		switch src := d.Source; {
		case src != nil && src.Volume != nil && src.Volume.Pool != "" && src.Volume.Volume != "":
			disk.StoragePool, disk.Image = src.Volume.Pool, src.Volume.Volume
		case src != nil && src.Network != nil && src.Network.Protocol == "rbd":
			var err error
			if disk.Spec, err = rbdSource(src.Network); err != nil {
				return nil, fmt.Errorf("disk %s: %w", disk.Target, err)
			}
		default:
			continue
		}
		disks = append(disks, disk)
	}
	return disks, nil
}

// rbdSource is the image an rbd network source reads: its name is pool/image or
// pool/namespace/image, optionally @snap; a <snapshot name='…'/> element names the snapshot too.
func rbdSource(src *libvirtxml.DomainDiskSourceNetwork) (rbdimage.Spec, error) {
	name, snap, _ := strings.Cut(src.Name, "@")
	if src.Snapshot != nil && src.Snapshot.Name != "" {
		snap = src.Snapshot.Name
	}
	s, err := rbdimage.Parse(name)
	// rbdimage.Parse reads "pool//image" as the default namespace; libvirt's name must not.
	if err != nil || s.Namespace == "" && strings.Count(name, "/") == 2 {
		return rbdimage.Spec{}, fmt.Errorf("rbd source name %q is not pool/image or pool/namespace/image", src.Name)
	}
	s.Snap = snap
	return s, nil
}
