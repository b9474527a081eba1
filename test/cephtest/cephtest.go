// Package cephtest is the shared harness of flattend's integration tests: it connects to the
// throwaway cluster started by test/run.sh (FLATTEND_TEST_CEPH_CONF), and makes parents with known
// content, clones of them, and checks on the outcome. A test told about a cluster it cannot reach
// fails; a test not told about any skips (make test always tells).
package cephtest

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"
	"github.com/flattend/flattend/internal/cephconn"
	"github.com/flattend/flattend/internal/lock"
	"github.com/flattend/flattend/internal/rbdimage"
)

// Pool is the pool the tests put their images in (created on first use).
const Pool = "flattend-test"

// ConfPath returns the test cluster's ceph.conf, or skips the test when none was given.
func ConfPath(t testing.TB) string {
	t.Helper()
	conf := os.Getenv("FLATTEND_TEST_CEPH_CONF")
	if conf == "" {
		t.Skip("FLATTEND_TEST_CEPH_CONF is not set: run `make test`, which starts a local cluster")
	}
	return conf
}

// WatchTimeout is the cluster's osd_client_watch_timeout: how long a dead holder blocks takeover.
func WatchTimeout() time.Duration {
	var s int
	if _, err := fmt.Sscan(os.Getenv("FLATTEND_TEST_WATCH_TIMEOUT"), &s); err != nil || s <= 0 {
		s = 30
	}
	return time.Duration(s) * time.Second
}

// DaemonUser is the cephx id flattend itself uses in the tests: FLATTEND_TEST_CEPH_USER (on a
// cephx test cluster, the least-privilege client.flattend that test/cluster.sh creates) or admin.
func DaemonUser() string {
	if u := os.Getenv("FLATTEND_TEST_CEPH_USER"); u != "" {
		return u
	}
	return "admin"
}

// DaemonKeyring is DaemonUser's keyring file, "" for the default.
func DaemonKeyring() string { return os.Getenv("FLATTEND_TEST_CEPH_KEYRING") }

// Connect opens a new admin connection (a new RADOS instance) to the test cluster, or fails:
// for the test's own set-up and checks.
func Connect(t testing.TB) *rados.Conn { return connectAs(t, "admin", "") }

// DaemonConnect opens a connection with flattend's own key (DaemonUser): for the code under test,
// so that a suite on a cephx cluster proves its caps are enough.
func DaemonConnect(t testing.TB) *rados.Conn { return connectAs(t, DaemonUser(), DaemonKeyring()) }

// DaemonReader is DaemonConnect for what flattend only reads (discovery): one completion thread,
// as flattend's own readers (cephconn.ReaderThreads).
func DaemonReader(t testing.TB) *rados.Conn {
	return connectWith(t, DaemonUser(), DaemonKeyring(), cephconn.ReaderThreads)
}

func connectAs(t testing.TB, user, keyring string) *rados.Conn {
	t.Helper()
	return connectWith(t, user, keyring, 0)
}

// readers holds each test's reader (openReadOnly), by testing.TB.
var readers sync.Map

// openReadOnly opens ioctx's image name (at snap) read-only for a helper's check, on the test's
// own reader: an admin connection with one completion thread (cephconn.ReaderThreads). The
// helpers open and close images often, and on a connection with more threads librbd's open race
// can abort the test binary under load. A missing image or snapshot wraps rbdimage.ErrNotFound.
func openReadOnly(t testing.TB, ioctx *rados.IOContext, name, snap string) (*rbdimage.Image, error) {
	t.Helper()
	pool, err := ioctx.GetPoolName()
	if err != nil {
		t.Fatalf("pool of an I/O context: %v", err)
	}
	ns, err := ioctx.GetNamespace()
	if err != nil {
		t.Fatalf("namespace of an I/O context: %v", err)
	}
	conn, ok := readers.Load(t)
	if !ok {
		c := connectWith(t, "admin", "", cephconn.ReaderThreads)
		t.Cleanup(func() { readers.Delete(t) })
		conn, _ = readers.LoadOrStore(t, c)
	}
	return rbdimage.Open(conn.(*rados.Conn), rbdimage.Spec{Pool: pool, Namespace: ns, Image: name, Snap: snap}, rbdimage.ReadOnly)
}

// connectWith is connectAs with librados_thread_count ioThreads (0: librados' default).
func connectWith(t testing.TB, user, keyring string, ioThreads int) *rados.Conn {
	t.Helper()
	conf := ConfPath(t)
	conn, err := rados.NewConnWithUser(user)
	if err == nil {
		err = conn.ReadConfigFile(conf)
	}
	if err == nil && keyring != "" {
		err = conn.SetConfigOption("keyring", keyring)
	}
	if err == nil {
		err = conn.SetConfigOption("client_mount_timeout", "20")
	}
	if err == nil && ioThreads > 0 {
		err = conn.SetConfigOption("librados_thread_count", strconv.Itoa(ioThreads))
	}
	if err == nil {
		err = conn.Connect()
	}
	if err != nil {
		t.Fatalf("test cluster %s unreachable as client.%s: %v", conf, user, err)
	}
	t.Cleanup(conn.Shutdown)
	return conn
}

var poolOnce sync.Mutex

// IOContext returns an I/O context on the test pool, creating the pool if needed.
func IOContext(t testing.TB, conn *rados.Conn) *rados.IOContext {
	t.Helper()
	poolOnce.Lock()
	defer poolOnce.Unlock()
	ioctx, err := conn.OpenIOContext(Pool)
	if err != nil {
		// Created with an admin connection: conn may be the daemon's, which may not create pools.
		EnsurePool(t, Connect(t), Pool)
		ioctx, err = conn.OpenIOContext(Pool)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ioctx.Destroy)
	return ioctx
}

// EnsurePool creates an RBD pool with few PGs (one OSD allows only so many) if it is missing.
func EnsurePool(t testing.TB, conn *rados.Conn, name string) {
	t.Helper()
	MonCommand(t, conn, map[string]any{"prefix": "osd pool create", "pool": name, "pg_num": 8})
	ioctx, err := conn.OpenIOContext(name)
	if err != nil {
		t.Fatal(err)
	}
	defer ioctx.Destroy()
	if err := rbd.PoolInit(ioctx, false); err != nil {
		t.Fatalf("rbd pool init %s: %v", name, err)
	}
}

// MonCommand runs a JSON mon command and returns its output.
func MonCommand(t testing.TB, conn *rados.Conn, cmd map[string]any) []byte {
	t.Helper()
	b, _ := json.Marshal(cmd)
	out, status, err := conn.MonCommand(b)
	if err != nil {
		t.Fatalf("mon command %s: %v (%s)", b, err, status)
	}
	return out
}

var nameCleaner = regexp.MustCompile(`[^A-Za-z0-9]+`)

// Name returns a name unique to this test run, for images, lock images and nodes.
func Name(t testing.TB, suffix string) string {
	base := strings.ToLower(nameCleaner.ReplaceAllString(t.Name(), "-"))
	if len(base) > 40 {
		base = base[:40]
	}
	return fmt.Sprintf("%s-%s-%04x", base, suffix, rand.N(1<<16))
}

// Parent is an image filled with deterministic data and a protected snapshot "s" of it.
type Parent struct {
	Name   string
	Snap   string
	Size   uint64
	Digest string // sha256 of the whole snapshot content
}

// MakeParent writes size bytes of pseudo-random data into a new image with 2^order-byte objects,
// snapshots and protects it.
func MakeParent(t testing.TB, ioctx *rados.IOContext, name string, size uint64, order int) Parent {
	t.Helper()
	opts := rbd.NewRbdImageOptions()
	defer opts.Destroy()
	if err := opts.SetUint64(rbd.ImageOptionOrder, uint64(order)); err != nil {
		t.Fatal(err)
	}
	if err := rbd.CreateImage(ioctx, name, size, opts); err != nil {
		t.Fatalf("create %s: %v", name, err)
	}
	img, err := rbd.OpenImage(ioctx, name, rbd.NoSnapshot)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	rng := rand.NewChaCha8(sha256.Sum256([]byte(name)))
	h := sha256.New()
	buf := make([]byte, 4<<20)
	for off := uint64(0); off < size; off += uint64(len(buf)) {
		chunk := buf[:min(uint64(len(buf)), size-off)]
		_, _ = rng.Read(chunk)
		if n, err := img.WriteAt(chunk, int64(off)); err != nil || n != len(chunk) {
			t.Fatalf("write %s at %d: %d of %d bytes, %v", name, off, n, len(chunk), err)
		}
		h.Write(chunk)
	}
	snap, err := img.CreateSnapshot("s")
	if err != nil {
		t.Fatal(err)
	}
	if err := snap.Protect(); err != nil {
		t.Fatal(err)
	}
	return Parent{Name: name, Snap: "s", Size: size, Digest: hex.EncodeToString(h.Sum(nil))}
}

// SnapProtect snapshots image name as snap and protects the snapshot, so it can be cloned.
func SnapProtect(t testing.TB, ioctx *rados.IOContext, name, snap string) Parent {
	t.Helper()
	img, err := rbd.OpenImage(ioctx, name, rbd.NoSnapshot)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	s, err := img.CreateSnapshot(snap)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Protect(); err != nil {
		t.Fatal(err)
	}
	return Parent{Name: name, Snap: snap}
}

// LoseCopyup puts clone's object obj in the state a flattening client leaves when it dies between
// marking the object as existing in the object map and writing it: copied up, then removed from
// RADOS behind librbd's back. The map says "exists"; there is no object.
func LoseCopyup(t testing.TB, ioctx *rados.IOContext, clone string, obj uint64) {
	t.Helper()
	LoseCopyupIn(t, ioctx, ioctx, clone, obj)
}

// LoseCopyupIn is LoseCopyup for a clone whose data objects live in the data pool that data
// opens (rbd create --data-pool); it follows the clone's striping.
func LoseCopyupIn(t testing.TB, ioctx, data *rados.IOContext, clone string, obj uint64) {
	t.Helper()
	if err := data.Delete(CopyUp(t, ioctx, clone, obj)); err != nil {
		t.Fatal(err)
	}
}

// CopyUp makes librbd copy object obj of clone up from its parent (a one-byte rewrite of what
// the clone reads there), following the clone's striping, and returns the object's name.
func CopyUp(t testing.TB, ioctx *rados.IOContext, clone string, obj uint64) string {
	t.Helper()
	img, err := rbd.OpenImage(ioctx, clone, rbd.NoSnapshot)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	info, err := img.Stat()
	if err != nil {
		t.Fatal(err)
	}
	unit, err1 := img.GetStripeUnit()
	count, err2 := img.GetStripeCount()
	if err := errors.Join(err1, err2); err != nil {
		t.Fatal(err)
	}
	// The first stripe unit of object obj (RADOS striping: units round-robin over count objects).
	perObject := info.Obj_size / unit
	set, pos := obj/count, obj%count
	b := make([]byte, 1)
	off := int64((set*perObject*count + pos) * unit)
	if _, err := img.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%s.%016x", info.Block_name_prefix, obj)
}

// HasSnapshot reports whether image name has a snapshot snap.
func HasSnapshot(t testing.TB, ioctx *rados.IOContext, name, snap string) bool {
	t.Helper()
	img, err := openReadOnly(t, ioctx, name, snap)
	if errors.Is(err, rbdimage.ErrNotFound) {
		return false
	}
	if err != nil {
		t.Fatalf("open %s@%s: %v", name, snap, err)
	}
	img.Close()
	return true
}

// Clone makes name a clone of p and, if owner is not empty, tags it flattend.owner=owner.
func Clone(t testing.TB, ioctx *rados.IOContext, p Parent, name, owner string) {
	t.Helper()
	CloneTo(t, ioctx, p, ioctx, name, owner)
}

// CloneTo is Clone into another pool: p lives in pioctx's pool, the clone in cioctx's.
func CloneTo(t testing.TB, pioctx *rados.IOContext, p Parent, cioctx *rados.IOContext, name, owner string) {
	t.Helper()
	opts := rbd.NewRbdImageOptions()
	defer opts.Destroy()
	if err := rbd.CloneImage(pioctx, p.Name, p.Snap, cioctx, name, opts); err != nil {
		t.Fatalf("clone %s@%s to %s: %v", p.Name, p.Snap, name, err)
	}
	if owner != "" {
		SetMeta(t, cioctx, name, "flattend.owner", owner)
	}
}

// CloneDataPool is Clone with the clone's data objects in dataPool (rbd clone --data-pool). It
// sets no owner.
func CloneDataPool(t testing.TB, ioctx *rados.IOContext, p Parent, name, dataPool string) {
	t.Helper()
	opts := rbd.NewRbdImageOptions()
	defer opts.Destroy()
	if err := opts.SetString(rbd.ImageOptionDataPool, dataPool); err != nil {
		t.Fatal(err)
	}
	if err := rbd.CloneImage(ioctx, p.Name, p.Snap, ioctx, name, opts); err != nil {
		t.Fatalf("clone %s@%s to %s (data pool %s): %v", p.Name, p.Snap, name, dataPool, err)
	}
}

// CloneV2 is CloneTo with clone format 2, which clones across namespaces need (the test cluster's
// default is format 1). It sets no owner.
func CloneV2(t testing.TB, pioctx *rados.IOContext, p Parent, cioctx *rados.IOContext, name string) {
	t.Helper()
	opts := rbd.NewRbdImageOptions()
	defer opts.Destroy()
	if err := opts.SetUint64(rbd.ImageOptionCloneFormat, 2); err != nil {
		t.Fatal(err)
	}
	if err := rbd.CloneImage(pioctx, p.Name, p.Snap, cioctx, name, opts); err != nil {
		t.Fatalf("clone %s@%s to %s: %v", p.Name, p.Snap, name, err)
	}
}

// PoolIOContext opens an I/O context on another pool, closed when the test ends.
func PoolIOContext(t testing.TB, conn *rados.Conn, pool string) *rados.IOContext {
	t.Helper()
	ioctx, err := conn.OpenIOContext(pool)
	if err != nil {
		t.Fatalf("open pool %s: %v", pool, err)
	}
	t.Cleanup(ioctx.Destroy)
	return ioctx
}

// SetMeta sets image-meta key=value on name.
func SetMeta(t testing.TB, ioctx *rados.IOContext, name, key, value string) {
	t.Helper()
	img, err := rbd.OpenImage(ioctx, name, rbd.NoSnapshot)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if err := img.SetMetadata(key, value); err != nil {
		t.Fatal(err)
	}
}

// IsClone reports whether name still has a parent.
func IsClone(t testing.TB, ioctx *rados.IOContext, name string) bool {
	t.Helper()
	img, err := openReadOnly(t, ioctx, name, rbd.NoSnapshot)
	if err != nil {
		t.Fatalf("open %s: %v", name, err)
	}
	defer img.Close()
	_, err = img.GetParent()
	if errors.Is(err, rbd.ErrNotFound) {
		return false
	}
	if err != nil {
		t.Fatalf("parent of %s: %v", name, err)
	}
	return true
}

// Digest returns the sha256 of name's first size bytes.
func Digest(t testing.TB, ioctx *rados.IOContext, name string, size uint64) string {
	t.Helper()
	img, err := openReadOnly(t, ioctx, name, rbd.NoSnapshot)
	if err != nil {
		t.Fatalf("open %s: %v", name, err)
	}
	defer img.Close()
	h := sha256.New()
	buf := make([]byte, 4<<20)
	for off := uint64(0); off < size; off += uint64(len(buf)) {
		chunk := buf[:min(uint64(len(buf)), size-off)]
		if n, err := img.ReadAt(chunk, int64(off)); err != nil || n != len(chunk) {
			t.Fatalf("read %s at %d: %d of %d bytes, %v", name, off, n, len(chunk), err)
		}
		h.Write(chunk)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// AssertFlatAndIntact fails unless name is flat and holds exactly p's snapshot content.
func AssertFlatAndIntact(t testing.TB, ioctx *rados.IOContext, p Parent, name string) {
	t.Helper()
	if IsClone(t, ioctx, name) {
		t.Errorf("%s still has a parent", name)
	}
	if got := Digest(t, ioctx, name, p.Size); got != p.Digest {
		t.Errorf("%s content %s differs from its parent snapshot %s", name, got[:12], p.Digest[:12])
	}
}

// HoldLock opens image on conn and takes its managed exclusive lock, for a test that stands in
// for another node. The returned function releases it.
func HoldLock(t testing.TB, ioctx *rados.IOContext, image string) (release func()) {
	t.Helper()
	img, err := rbd.OpenImage(ioctx, image, rbd.NoSnapshot)
	if err != nil {
		t.Fatalf("open lock image %s: %v", image, err)
	}
	if err := img.LockAcquire(rbd.LockModeExclusive); err != nil {
		img.Close()
		t.Fatalf("lock %s: %v", image, err)
	}
	var once sync.Once
	release = func() {
		once.Do(func() {
			_ = img.LockRelease()
			_ = img.Close()
		})
	}
	t.Cleanup(release)
	return release
}

// Mutex is lock.New with the options a test leaves out set as the config package's defaults
// (one slot, 2 s checks, backoff 2 s to 2 min).
func Mutex(t testing.TB, conn *rados.Conn, o lock.Options) *lock.Mutex {
	t.Helper()
	o.Slots = max(o.Slots, 1)
	if o.CheckInterval == 0 {
		o.CheckInterval = 2 * time.Second
	}
	if o.BackoffMin == 0 {
		o.BackoffMin, o.BackoffMax = 2*time.Second, 2*time.Minute
	}
	m, err := lock.New(conn, o)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// Lockers lists image's lock owners as "client cookie" (a running VM's librbd owns its clone's
// exclusive lock), read from RADOS.
func Lockers(t testing.TB, ioctx *rados.IOContext, image string) []string {
	t.Helper()
	img, err := openReadOnly(t, ioctx, image, rbd.NoSnapshot)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	_, ls, err := img.ListLockers()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, l := range ls {
		out = append(out, l.Client+" "+l.Cookie)
	}
	return out
}

// Binary is the flattend the tests run: FLATTEND_BIN, or cmd/flattend built (with GO_TAGS) into a
// temporary directory that cleanup removes. For a TestMain: it has no *testing.T.
func Binary() (path string, cleanup func(), err error) {
	if bin := os.Getenv("FLATTEND_BIN"); bin != "" {
		return bin, func() {}, nil
	}
	dir, err := os.MkdirTemp("", "flattend-test")
	if err != nil {
		return "", nil, err
	}
	path = filepath.Join(dir, "flattend")
	args := []string{"build", "-o", path}
	if tags := os.Getenv("GO_TAGS"); tags != "" {
		args = append(args, "-tags", tags)
	}
	cmd := exec.Command("go", append(args, "github.com/flattend/flattend/cmd/flattend")...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		os.RemoveAll(dir)
		return "", nil, fmt.Errorf("building flattend: %w", err)
	}
	return path, func() { os.RemoveAll(dir) }, nil
}

// ThreadsNamed counts the threads of process pid called name (/proc/PID/task/*/comm): what the
// kernel shows, e.g. librados' io_context_pool threads of each connection.
func ThreadsNamed(t testing.TB, pid int, name string) int {
	t.Helper()
	comms, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/comm", pid))
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, c := range comms {
		if b, err := os.ReadFile(c); err == nil && strings.TrimSpace(string(b)) == name {
			n++
		}
	}
	return n
}
