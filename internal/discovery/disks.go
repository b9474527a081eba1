package discovery

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"
	"unicode"

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

// IgnoredDisk is an RBD disk that discovery does not follow, and why.
type IgnoredDisk struct {
	Disk          // its domain and target; its image too unless the name is malformed
	Name   string // the source as the domain names it: "pool/image", or "storagepool:volume"
	Reason string // "is read-only: …", "malformed: …"
	// Malformed says the definition is wrong (worth a warning), not merely a disk whose image
	// other hosts may use as well.
	Malformed bool
}

// String is "disk vdb of domain vm1 is read-only: …", the name quoted when malformed.
func (ig IgnoredDisk) String() string {
	if ig.Malformed {
		return fmt.Sprintf("%s skipped: %s", ig.Disk, ig.Reason)
	}
	return fmt.Sprintf("%s %s", ig.Disk, ig.Reason)
}

// HostDisks is what libvirt says of this host: its domains and their RBD disks.
type HostDisks struct {
	Domains int
	Disks   []Disk        // the disks whose images are this node's roots, each once
	Ignored []IgnoredDisk // the RBD disks left out, each once
}

// Disks lists the RBD disks of every domain defined on this host, running or shut off: of the
// live definition of a running domain and of its persistent one, which may differ. It uses only
// calls that libvirt allows on its read-only socket.
func (l Libvirt) Disks(ctx context.Context) (HostDisks, error) {
	l = l.withDefaults()
	ep, err := libvirturi.Parse(l.URI)
	if err != nil {
		return HostDisks{}, err
	}
	socket := ep.Socket()
	type result struct {
		hd  HostDisks
		err error
	}
	lv := golibvirt.NewWithDialer(dialers.NewLocal(dialers.WithSocket(socket), dialers.WithLocalTimeout(l.Timeout)))
	done := make(chan result, 1)
	go func() {
		var r result
		r.hd, r.err = readDisks(lv, ep.Open)
		done <- r
	}()
	timer := time.NewTimer(l.Timeout)
	defer timer.Stop()
	var r result
	select {
	case r = <-done:
	case <-ctx.Done():
		_ = lv.Disconnect() // unblocks the calls in flight
		return HostDisks{}, context.Cause(ctx)
	case <-timer.C:
		_ = lv.Disconnect()
		r.err = fmt.Errorf("no answer within %s", l.Timeout)
	}
	if r.err != nil {
		return HostDisks{}, fmt.Errorf("libvirt %s (socket %s): %w", l.URI, socket, r.err)
	}
	return r.hd, nil
}

// readDisks connects lv to uri and reads the disks of every domain, each disk once.
func readDisks(lv *golibvirt.Libvirt, uri string) (HostDisks, error) {
	var hd HostDisks
	if err := lv.ConnectToURI(golibvirt.ConnectURI(uri)); err != nil {
		return hd, fmt.Errorf("cannot connect (is libvirtd running, and may this user use its socket?): %w", err)
	}
	defer func() { _ = lv.Disconnect() }()
	doms, _, err := lv.ConnectListAllDomains(1, golibvirt.ConnectListDomainsActive|golibvirt.ConnectListDomainsInactive)
	if err != nil {
		return hd, fmt.Errorf("listing domains: %w", err)
	}
	hd.Domains = len(doms)
	seen := map[Disk]bool{}
	seenIgnored := map[IgnoredDisk]bool{}
	pools := storagePools{lv: lv, rbd: map[string]*[2]string{}}
	for _, d := range doms {
		ds, ignored, err := domainDisks(lv, d, pools)
		if err != nil {
			return HostDisks{}, err
		}
		for _, disk := range ds {
			if !seen[disk] {
				seen[disk] = true
				hd.Disks = append(hd.Disks, disk)
			}
		}
		for _, ig := range ignored {
			if !seenIgnored[ig] {
				seenIgnored[ig] = true
				hd.Ignored = append(hd.Ignored, ig)
			}
		}
	}
	return hd, nil
}

// domainDisks reads the RBD disks of domain d: of its live definition and, when it runs, of its
// persistent one (which may have other disks), volumes resolved to their Ceph pools.
func domainDisks(lv *golibvirt.Libvirt, d golibvirt.Domain, pools storagePools) ([]Disk, []IgnoredDisk, error) {
	flags := []golibvirt.DomainXMLFlags{0}
	if d.ID > 0 {
		flags = append(flags, golibvirt.DomainXMLInactive)
	}
	var disks []Disk
	var ignored []IgnoredDisk
	for _, f := range flags {
		xml, err := lv.DomainGetXMLDesc(d, f)
		if err != nil {
			if f != 0 {
				continue // a transient domain has no persistent definition
			}
			return nil, nil, fmt.Errorf("definition of domain %s: %w", d.Name, err)
		}
		ds, ig, err := DomainDisks(xml)
		if err != nil {
			return nil, nil, fmt.Errorf("domain %s: %w", d.Name, err)
		}
		if ds, err = pools.resolve(ds); err != nil {
			return nil, nil, fmt.Errorf("domain %s: %w", d.Name, err)
		}
		if ig, err = pools.resolveIgnored(ig); err != nil {
			return nil, nil, fmt.Errorf("domain %s: %w", d.Name, err)
		}
		disks, ignored = append(disks, ds...), append(ignored, ig...)
	}
	return disks, ignored, nil
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

// resolveIgnored resolves the volume disks among ignored as resolve does, for their messages.
func (s storagePools) resolveIgnored(ignored []IgnoredDisk) ([]IgnoredDisk, error) {
	out := ignored[:0]
	for _, ig := range ignored {
		if ig.StoragePool != "" {
			ds, err := s.resolve([]Disk{ig.Disk})
			if err != nil {
				return nil, err
			}
			if len(ds) == 0 {
				continue // not an RBD volume: not a disk discovery looks at
			}
			ig.Disk = ds[0]
		}
		out = append(out, ig)
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
// pool, which only libvirt can map to a Ceph pool. Disks that are no roots of ownership
// (read-only, shareable, cdrom) or whose name is malformed come back as ignored, with why.
func DomainDisks(xml string) ([]Disk, []IgnoredDisk, error) {
	var dom libvirtxml.Domain
	if err := dom.Unmarshal(xml); err != nil {
		return nil, nil, fmt.Errorf("parsing the domain XML: %w", err)
	}
	if dom.Devices == nil {
		return nil, nil, nil
	}
	var disks []Disk
	var ignored []IgnoredDisk
	for _, d := range dom.Devices.Disks {
		disk, ig, ok := domainDisk(dom.Name, d)
		switch {
		case !ok:
		case ig != nil:
			ignored = append(ignored, *ig)
		default:
			disks = append(disks, disk)
		}
	}
	return disks, ignored, nil
}

// domainDisk reads one <disk>: ok is false when it is no RBD disk at all, ig set when it is one
// discovery does not follow.
func domainDisk(domain string, d libvirtxml.DomainDisk) (disk Disk, ig *IgnoredDisk, ok bool) {
	disk = Disk{Domain: domain}
	if d.Target != nil {
		disk.Target = d.Target.Dev
	}
	var name string
	var err error
	switch src := d.Source; {
	case src != nil && src.Volume != nil && src.Volume.Pool != "" && src.Volume.Volume != "":
		disk.StoragePool, disk.Image = src.Volume.Pool, src.Volume.Volume
		name = src.Volume.Pool + ":" + src.Volume.Volume
		if strings.Contains(disk.Image, "/") || hasControl(name) {
			err = fmt.Errorf("volume name %q is no RBD image name", src.Volume.Volume)
		}
	case src != nil && src.Network != nil && src.Network.Protocol == "rbd":
		name = src.Network.Name
		disk.Spec, err = rbdSource(src.Network)
	default:
		return Disk{}, nil, false
	}
	if err != nil {
		return Disk{}, &IgnoredDisk{Disk: Disk{Domain: domain, Target: disk.Target}, Name: name, Malformed: true,
			Reason: fmt.Sprintf("malformed: %v", err)}, true
	}
	if why := notARoot(d); why != "" {
		return Disk{}, &IgnoredDisk{Disk: disk, Name: name, Reason: why}, true
	}
	return disk, nil, true
}

// notARoot says why a disk's image is a shared source that other hosts may use as well, so
// that the clones of its snapshots are not this node's; "" for a disk this node's VM writes.
func notARoot(d libvirtxml.DomainDisk) string {
	const shared = "a shared source (such as a golden image), the clones of its snapshots are not this node's"
	switch {
	case d.Device == "cdrom":
		return "is a cdrom: " + shared
	case d.ReadOnly != nil:
		return "is read-only: " + shared
	case d.Shareable != nil:
		return "is shareable: other hosts may use it too; " + shared
	}
	return ""
}

// rbdSource is the image an rbd network source reads: its name is pool/image or
// pool/namespace/image, optionally @snap; a <snapshot name='…'/> element names the snapshot too.
func rbdSource(src *libvirtxml.DomainDiskSourceNetwork) (rbdimage.Spec, error) {
	name, snap, at := strings.Cut(src.Name, "@")
	emptySnap := at && snap == ""
	if src.Snapshot != nil && src.Snapshot.Name != "" {
		snap = src.Snapshot.Name
	}
	s, err := rbdimage.Parse(name)
	// rbdimage.Parse reads "pool//image" as the default namespace; libvirt's name must not.
	if err != nil || s.Namespace == "" && strings.Count(name, "/") == 2 || emptySnap || hasControl(src.Name+snap) {
		return rbdimage.Spec{}, fmt.Errorf("rbd source name %q is not pool/image or pool/namespace/image", src.Name)
	}
	s.Snap = snap
	return s, nil
}

// hasControl says whether s has a control character, which no sane image name has.
func hasControl(s string) bool {
	return strings.ContainsFunc(s, unicode.IsControl)
}
