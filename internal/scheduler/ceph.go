package scheduler

import (
	"context"
	"sync/atomic"
	"time"

	"github.com/ceph/go-ceph/rados"
	"go.uber.org/zap"

	"github.com/flattend/flattend/internal/discovery"
	"github.com/flattend/flattend/internal/flattener"
	"github.com/flattend/flattend/internal/fleet"
	"github.com/flattend/flattend/internal/gate"
	"github.com/flattend/flattend/internal/lock"
	"github.com/flattend/flattend/internal/rbdimage"
)

// CephConnector makes real sessions: each dials a new RADOS connection, on which it takes the
// lock (lock.Session) and does every clone operation that writes. Discovery and the read-only
// look at a clone go through a second connection from dialReader, with one completion thread
// (cephconn.ReaderThreads: librbd's open race); reads need no fencing.
func CephConnector(dial, dialReader lock.Dialer, log *zap.Logger) Connector {
	return func(o lock.Options) (Locker, Flattener, error) {
		log := log.With(zap.String("node", o.Node))
		l := cephLocker{busy: new(atomic.Pointer[func(time.Duration)])}
		busy := func(wait time.Duration) {
			log.Debug("lock busy, backing off", zap.String("lock", o.Pool+"/"+o.Image), zap.Duration("wait", wait))
			if f := l.busy.Load(); f != nil {
				(*f)(wait)
			}
		}
		warn := func(msg string) { log.Warn(msg, zap.String("lock", o.Pool+"/"+o.Image)) }
		reader, err := dialReader()
		if err != nil {
			return nil, nil, err
		}
		sess, err := lock.NewSession(dial, o, lock.Hooks{Busy: busy, Warn: warn})
		if err != nil {
			reader.Shutdown()
			return nil, nil, err
		}
		l.s, l.reader = sess, reader
		return l, cephFlattener{conn: sess.Conn(), reader: reader, lock: o}, nil
	}
}

type cephLocker struct {
	s      *lock.Session
	reader *rados.Conn                               // the session's reader: shut down with it
	busy   *atomic.Pointer[func(wait time.Duration)] // told each wait for a busy slot
}

func (l cephLocker) onBusy(f func(wait time.Duration)) { l.busy.Store(&f) }

func (l cephLocker) Lock(ctx context.Context) (Lease, error) {
	lease, err := l.s.Lock(ctx)
	if err != nil {
		return nil, err
	}
	return lease, nil
}

func (l cephLocker) StopWaiting() { l.s.Mutex().StopWaiting() }
func (l cephLocker) Close(ctx context.Context) error {
	defer l.reader.Shutdown()
	return l.s.Close(ctx)
}

type cephFlattener struct {
	conn   *rados.Conn  // the lock's: every write, so that a broken lock fences them
	reader *rados.Conn  // discovery and read-only looks (cephconn.ReaderThreads)
	lock   lock.Options // where the fleet summary goes
}

// WriteSummary stores this node's fleet summary beside the lock (summaryWriter).
func (f cephFlattener) WriteSummary(e fleet.Entry) error {
	return fleet.Write(f.conn, f.lock.Pool, f.lock.Image, f.lock.Node, e)
}

func (f cephFlattener) Discover(ctx context.Context, sources []discovery.Source) ([]discovery.Clone, error) {
	found, err := discovery.Find(ctx, f.reader, sources)
	return found.Clones, err
}

func (f cephFlattener) CheckGates(g gate.Config, pool string, need uint64) error {
	return gate.Check(f.conn, g, pool, need)
}

func (f cephFlattener) WatchGates(ctx context.Context, g gate.Config, pool string, every time.Duration, need func() uint64) (context.Context, context.CancelFunc) {
	return gate.Watch(ctx, f.conn, g, pool, every, need)
}

func (f cephFlattener) Inspect(s rbdimage.Spec) (rbdimage.Info, error) {
	return rbdimage.Inspect(f.reader, s)
}
func (f cephFlattener) Users(s rbdimage.Spec) ([]string, error) { return rbdimage.Users(f.reader, s) }
func (f cephFlattener) VerifyCopyups(ctx context.Context, s rbdimage.Spec) (flattener.Verified, error) {
	return flattener.VerifyCopyups(ctx, f.conn, s)
}

func (f cephFlattener) MarkFlattening(s rbdimage.Spec, note string) (string, error) {
	return flattener.MarkFlattening(f.conn, s, note)
}

func (f cephFlattener) ClearFlattening(s rbdimage.Spec) error {
	return flattener.ClearFlattening(f.conn, s)
}

func (f cephFlattener) MarkInterrupted(s rbdimage.Spec, note string) error {
	return flattener.MarkInterrupted(f.conn, s, note)
}

func (f cephFlattener) Interrupted(s rbdimage.Spec) (string, error) {
	return flattener.Interrupted(f.conn, s)
}

func (f cephFlattener) Flatten(ctx context.Context, s rbdimage.Spec, bytesPerSecond uint64, progress func(done, total uint64)) error {
	return flattener.FlattenPaced(ctx, f.conn, s, bytesPerSecond, progress)
}

func (f cephFlattener) RemoveSnapshotIfUnused(snap rbdimage.Spec) (bool, string, error) {
	return flattener.RemoveIfUnused(f.conn, snap)
}
