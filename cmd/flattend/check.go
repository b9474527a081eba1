package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/ceph/go-ceph/rados"

	"github.com/flattend/flattend/internal/cephconn"
	"github.com/flattend/flattend/internal/config"
	"github.com/flattend/flattend/internal/discovery"
	"github.com/flattend/flattend/internal/lock"
)

// runCheck is `flattend check`: the config (loaded already), the connection, the lock image and
// every discovery source.
func runCheck(_ context.Context, e *env, _ options) int {
	return check(e.cfg, e.dial, e.stdout, e.stderr)
}

func check(cfg *config.Config, dial func() (*rados.Conn, error), stdout, stderr io.Writer) int {
	fmt.Fprintf(stdout, "config %s: ok (node %s)\n", cfg.Path, cfg.Node)
	for _, w := range cfg.Warnings() {
		fmt.Fprintf(stderr, "warning: %v\n", w)
	}
	conn, err := dial()
	if err != nil {
		fmt.Fprintln(stderr, err)
		return exitCode(err)
	}
	defer conn.Shutdown()
	fmt.Fprintf(stdout, "ceph: connected as client.%s\n", cfg.Ceph.User)
	code := exitOK
	if !checkLock(cfg, conn, stdout, stderr) {
		code = exitFailure
	}
	checkFencing(cfg, conn, stdout, stderr)
	for _, p := range cfg.Discovery.Pools {
		if !checkPool(conn, p, stdout, stderr) {
			code = exitFailure
		}
	}
	if !checkLibvirt(cfg, stdout, stderr) {
		code = exitFailure
	}
	return code
}

// checkLock checks the lock image; one that does not exist yet is fine if its pool does.
func checkLock(cfg *config.Config, conn *rados.Conn, stdout, stderr io.Writer) bool {
	if lockPoolMissing(cfg, conn, stderr) {
		return false
	}
	m, err := lock.New(conn, lockOptions(cfg))
	if err == nil {
		err = m.Check()
	}
	switch {
	case err == nil:
		fmt.Fprintf(stdout, "lock: %s ok\n", m.Name())
	case errors.Is(err, lock.ErrNoExclusiveLock) || errors.Is(err, lock.ErrNotLockImage) || !cephconn.IsNotFound(err):
		fmt.Fprintf(stderr, "lock: %v\n", err)
		return false
	default:
		ioctx, perr := cephconn.OpenPool(conn, cfg.Lock.Pool)
		if perr != nil {
			fmt.Fprintf(stderr, "lock: %v\n", perr)
			return false
		}
		ioctx.Destroy()
		fmt.Fprintf(stdout, "lock: %s does not exist yet; the first run creates it\n", m.Name())
	}
	return true
}

// checkFencing says how long Ceph blocklists a holder whose lock was broken, and warns when that
// is shorter than a flatten may last (window.duration: a flatten ends with its window at the
// latest) or when this key cannot read the blocklist. Warnings do not fail the check.
func checkFencing(cfg *config.Config, conn *rados.Conn, stdout, stderr io.Writer) {
	const opt = "mon_osd_blocklist_default_expire"
	limit := cfg.Window.Duration.D()
	d, known, err := lock.BlocklistExpiry(conn)
	switch {
	case err != nil:
		fmt.Fprintf(stderr, "warning: fencing: cannot read %s: %v\n", opt, err)
	case !known:
		fmt.Fprintf(stdout, "fencing: %s is not in the config database, so it is Ceph's default (1h) unless the monitors' "+
			"own ceph.conf sets it (this key cannot see that); it should be at least window.duration %s\n", opt, limit)
	case d < limit:
		fmt.Fprintf(stderr, "warning: fencing: %s is %s, shorter than window.duration %s (the longest a flatten may last): "+
			"a fenced holder that wakes up after its blocklist expired could write again; raise it: ceph config set mon %s %d\n",
			opt, d, limit, opt, int(limit.Seconds()))
	default:
		fmt.Fprintf(stdout, "fencing: %s %s ok (window.duration %s)\n", opt, d, limit)
	}
	if _, _, err := lock.Blocklisted(conn, ""); err != nil {
		fmt.Fprintf(stderr, "warning: fencing: cannot read the blocklist (%v): a node that takes over from a dead holder "+
			"cannot verify that it is fenced\n", err)
	}
}

// checkPool checks that a discovery pool (and its namespace) can be opened.
func checkPool(conn *rados.Conn, p config.PoolSource, stdout, stderr io.Writer) bool {
	ioctx, err := cephconn.OpenPool(conn, p.Pool)
	if err != nil {
		fmt.Fprintf(stderr, "discovery: %v\n", err)
		return false
	}
	defer ioctx.Destroy()
	if p.Namespace != "" {
		if err := discovery.CheckNamespace(ioctx, p.Pool, p.Namespace); err != nil {
			fmt.Fprintf(stderr, "discovery: %v\n", err)
			return false
		}
	}
	fmt.Fprintf(stdout, "discovery: pool %s ok (%s)\n", p.Pool, poolSelection(p))
	return true
}

// poolSelection says, for `flattend check`, which clones of a pool are selected.
func poolSelection(p config.PoolSource) string {
	s := "owner key " + p.OwnerKey
	if p.Shared {
		s = "shared backlog"
	}
	if p.Match != "" {
		s += fmt.Sprintf(", names matching %q", p.Match)
	}
	if p.Namespace != "" {
		s += fmt.Sprintf(", namespace %q", p.Namespace)
	}
	return s
}

// checkLibvirt asks libvirt for this host's domains, for `flattend check`; false on failure.
func checkLibvirt(cfg *config.Config, stdout, stderr io.Writer) bool {
	l := cfg.Discovery.Libvirt
	if l == nil {
		return true
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	hd, err := discovery.Libvirt{URI: l.URI}.Disks(ctx)
	if err != nil {
		fmt.Fprintf(stderr, "discovery: %v\n", err)
		return false
	}
	fmt.Fprintf(stdout, "discovery: libvirt %s ok (%d domains, %d rbd disks; include_vm_disks %t)\n", l.URI, hd.Domains, len(hd.Disks), l.IncludeVMDisks)
	for _, ig := range hd.Ignored {
		if ig.Malformed {
			fmt.Fprintf(stderr, "warning: discovery: libvirt %s\n", ig)
		} else {
			fmt.Fprintf(stdout, "discovery: libvirt %s; not followed\n", ig)
		}
	}
	return true
}
