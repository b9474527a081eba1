package main

import (
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"

	"github.com/ceph/go-ceph/rados"

	"github.com/flattend/flattend/internal/cephconn"
	"github.com/flattend/flattend/internal/config"
)

// lockPoolMissing reports, with what to run, when lock.pool does not exist. Its default, rbd,
// is Ceph's default RBD pool, but OpenStack clusters often have only vms, volumes, images and
// backups. The default stays: a node upgraded to another default would take another lock than
// the nodes not yet upgraded, and two flattens would run at once.
func lockPoolMissing(cfg *config.Config, conn *rados.Conn, stderr io.Writer) bool {
	_, err := conn.GetPoolByName(cfg.Lock.Pool)
	if !errors.Is(err, rados.ErrNotFound) && !cephconn.IsNotFound(err) {
		return false
	}
	p := cfg.Lock.Pool
	fmt.Fprintf(stderr, "lock: pool %q (lock.pool) does not exist. Create it, as an admin:\n", p)
	fmt.Fprintf(stderr, "    ceph osd pool create %s 32 && rbd pool init %s\n", p, p)
	fmt.Fprintf(stderr, "  and give client.%s access to it beside the pools it flattens in:\n", cfg.Ceph.User)
	fmt.Fprintf(stderr, "    %s\n", capsCommand(cfg))
	fmt.Fprintf(stderr, "  (caps replaces the key's caps: add the grants `ceph auth get client.%s` shows that this line lacks, such as profile rbd-read-only pool=images for parents elsewhere)\n", cfg.Ceph.User)
	fmt.Fprintln(stderr, "  or set lock.pool (and --lock-pool of status and unlock) to an existing pool, the same on every node.")
	return true
}

// capsCommand is the `ceph auth caps` line for cfg's key: profile rbd on the lock pool and on
// every discovery pool (libvirt's pools are the domains' and are not known here).
func capsCommand(cfg *config.Config) string {
	pools := []string{cfg.Lock.Pool}
	for _, s := range cfg.Discovery.Pools {
		if !slices.Contains(pools, s.Pool) {
			pools = append(pools, s.Pool)
		}
	}
	grants := make([]string, len(pools))
	for i, p := range pools {
		grants[i] = "profile rbd pool=" + p
	}
	more := ""
	if cfg.Discovery.Libvirt != nil {
		more = "   # and every pool your domains' disks are in"
	}
	return fmt.Sprintf("ceph auth caps client.%s mon 'profile rbd' osd '%s'%s", cfg.Ceph.User, strings.Join(grants, ", "), more)
}
