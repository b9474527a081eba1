// Package cephconn makes the RADOS connections flattend works on and explains Ceph's errors.
//
// One connection carries a node's lock and its flatten I/O (see internal/lock): when another node
// breaks a stale lock, Ceph blocklists that connection, which fences the old holder's writes too.
// A blocklisted connection never recovers, so callers dial a fresh one instead of repairing it.
package cephconn

import (
	"errors"
	"fmt"
	"strconv"
	"syscall"
	"time"

	"github.com/ceph/go-ceph/rados"
)

// ErrUnreachable wraps every failure to read the Ceph configuration, reach the monitors or
// authenticate: the daemon cannot do anything without them (exit code 3).
var ErrUnreachable = errors.New("cannot reach or authenticate to Ceph")

// ReaderThreads is librados_thread_count for a reader: a connection that only opens images
// read-only, reads them and closes them again (discovery, and inspecting a clone). librbd
// (16.2.15, and the same code since) ends an image open on one of these threads: it wakes the
// opener, then locks the image's state once more. With two threads the opener can close the
// image, and librbd free it, before that thread takes the lock: a use-after-free that aborts
// the process ("std::system_error ... Invalid argument", or "The futex facility returned an
// unexpected error code") when the CPU is busy, and discovery opens thousands of images. With
// one thread the opener is woken only after it. Not for the lock's connection: some librbd
// operations wait on that thread for another (snapshot unprotect hangs with one).
// docs/operations.md ("librbd's open race") has the evidence.
const ReaderThreads = 1

// Options says how to connect.
type Options struct {
	ConfPath       string
	User           string // cephx id, without "client."
	Keyring        string // empty: what ceph.conf says
	ConnectTimeout time.Duration
	// OpTimeout bounds every OSD op and mon command on the connection (rados_osd_op_timeout,
	// rados_mon_op_timeout): a call to a cluster that stops answering fails with ETIMEDOUT
	// instead of blocking for ever. 0 leaves OSD ops unbounded and mon commands at
	// ConnectTimeout.
	OpTimeout time.Duration
	// IOThreads is librados_thread_count, the threads that run librados and librbd completions
	// (ReaderThreads for a reader); 0 leaves librados' default (2).
	IOThreads int
	// ConcurrentOps is rbd_concurrent_management_ops for images opened on this connection: the
	// number of object copy-ups a flatten keeps in flight.
	ConcurrentOps int
}

// Dial connects to the cluster. The caller owns the connection and must Shutdown it.
func Dial(o Options) (*rados.Conn, error) {
	conn, err := rados.NewConnWithUser(o.User)
	if err != nil {
		return nil, fmt.Errorf("%w: creating client.%s: %v", ErrUnreachable, o.User, err)
	}
	if err := conn.ReadConfigFile(o.ConfPath); err != nil {
		return nil, fmt.Errorf("%w: reading %s: %v (check ceph.conf)", ErrUnreachable, o.ConfPath, err)
	}
	set := map[string]string{
		// Fencing must not depend on a node's ceph.conf: a lock this client breaks blocklists
		// its holder, for the monitors' default time (see internal/lock/fence.go).
		"rbd_blocklist_on_break_lock":  "true",
		"rbd_blocklist_expire_seconds": "0",
	}
	if o.Keyring != "" {
		set["keyring"] = o.Keyring
	}
	if o.ConnectTimeout > 0 {
		// Without these a dead monitor makes Connect and mon commands wait for minutes.
		set["client_mount_timeout"] = seconds(o.ConnectTimeout)
		set["rados_mon_op_timeout"] = seconds(o.ConnectTimeout)
	}
	if o.OpTimeout > 0 {
		// Without these, paused or unreachable OSDs block librbd and librados calls for ever.
		set["rados_osd_op_timeout"] = seconds(o.OpTimeout)
		set["rados_mon_op_timeout"] = seconds(o.OpTimeout)
	}
	if o.ConcurrentOps > 0 {
		set["rbd_concurrent_management_ops"] = strconv.Itoa(o.ConcurrentOps)
	}
	if o.IOThreads > 0 {
		set["librados_thread_count"] = strconv.Itoa(o.IOThreads)
	}
	for k, v := range set {
		if err := conn.SetConfigOption(k, v); err != nil {
			return nil, fmt.Errorf("%w: setting %s=%s: %v", ErrUnreachable, k, v, err)
		}
	}
	if err := conn.Connect(); err != nil {
		hint := "are the monitors in " + o.ConfPath + " up and reachable?"
		switch {
		case IsErrno(err, syscall.EACCES), IsErrno(err, syscall.EPERM):
			hint = "check ceph.user and ceph.keyring: the key was refused"
		case IsErrno(err, syscall.ENOENT):
			hint = "no key found for client." + o.User + ": set ceph.keyring or add it to ceph.conf"
		case IsErrno(err, syscall.ETIMEDOUT):
			// Monitors that refuse the key (msgr2: handle_auth_bad_method) never say so to the
			// client: it retries until it times out, exactly as with monitors it cannot reach.
			hint = "timed out after " + o.ConnectTimeout.String() + ": " + hint +
				" If they are, check ceph.user and ceph.keyring: a key the monitors refuse also ends in this timeout"
		}
		return nil, fmt.Errorf("%w: connecting as client.%s: %v (%s)", ErrUnreachable, o.User, err, hint)
	}
	return conn, nil
}

// seconds is d for a librados option: whole seconds, at least 1.
func seconds(d time.Duration) string {
	return strconv.Itoa(max(1, int(d.Round(time.Second)/time.Second)))
}

// Errno returns the errno a go-ceph error carries. go-ceph errors hold the negative errno and do
// not match syscall.Errno with errors.Is.
func Errno(err error) (syscall.Errno, bool) {
	var ec interface{ ErrorCode() int }
	if errors.As(err, &ec) {
		c := ec.ErrorCode()
		if c < 0 {
			c = -c
		}
		return syscall.Errno(c), true
	}
	var en syscall.Errno
	if errors.As(err, &en) {
		return en, true
	}
	return 0, false
}

// IsErrno reports whether err carries errno e.
func IsErrno(err error, e syscall.Errno) bool {
	got, ok := Errno(err)
	return ok && got == e
}

// IsNotFound reports whether err carries ENOENT.
func IsNotFound(err error) bool { return IsErrno(err, syscall.ENOENT) }

// EBLOCKLISTED is what Ceph returns to a client that was blocklisted (ESHUTDOWN on Linux).
const EBLOCKLISTED = syscall.ESHUTDOWN

// IsBlocklisted reports whether err means this connection was fenced and is dead for good.
func IsBlocklisted(err error) bool { return IsErrno(err, EBLOCKLISTED) }

// WithHint returns err with what to fix appended when an operator can fix it (missing caps) or
// must know it (this client was blocklisted); other errors are returned as they are.
func WithHint(err error) error {
	if h := hint(err); h != "" {
		return fmt.Errorf("%w (%s)", err, h)
	}
	return err
}

func hint(err error) string {
	switch {
	case IsErrno(err, syscall.EPERM), IsErrno(err, syscall.EACCES):
		return "permission denied: the cephx key lacks caps (needs mon 'profile rbd' and osd 'profile rbd pool=…' on every pool flattend touches)"
	case IsBlocklisted(err):
		return "this client was blocklisted (another node broke its lock); reconnecting"
	}
	return ""
}

// OpenPool opens an I/O context on pool, with an error that says what to fix when it is missing.
func OpenPool(conn *rados.Conn, pool string) (*rados.IOContext, error) {
	ioctx, err := conn.OpenIOContext(pool)
	if err != nil {
		if errors.Is(err, rados.ErrNotFound) || IsErrno(err, syscall.ENOENT) {
			return nil, fmt.Errorf("pool %q does not exist: create it (ceph osd pool create %s; rbd pool init %s) or fix the configuration", pool, pool, pool)
		}
		return nil, fmt.Errorf("opening pool %q: %w", pool, WithHint(err))
	}
	return ioctx, nil
}
