package lock

import (
	"sync"
	"time"

	"github.com/ceph/go-ceph/rados"
)

// notifyTimeout bounds how long a release notification waits for acks; waiters ack at once, a
// dead waiter's watch lingers until it times out and would otherwise hold the notifier.
const notifyTimeout = time.Second

// handover is this node's watch on the handover object: holders notify it on release, waiters
// wake up on it. The watch doubles as this connection's health check.
type handover struct {
	ioctx   *rados.IOContext
	oid     string
	watcher *rados.Watcher
	wake    chan struct{}
	done    sync.WaitGroup
}

func startHandover(conn *rados.Conn, pool, oid string, stats *Stats, mu *sync.Mutex) (*handover, error) {
	ioctx, err := conn.OpenIOContext(pool)
	if err != nil {
		return nil, err
	}
	if err := ioctx.Create(oid, rados.CreateIdempotent); err != nil {
		ioctx.Destroy()
		return nil, err
	}
	w, err := ioctx.Watch(oid)
	if err != nil {
		ioctx.Destroy()
		return nil, err
	}
	self := rados.NotifierID(conn.GetInstanceID())
	h := &handover{ioctx: ioctx, oid: oid, watcher: w, wake: make(chan struct{}, 1)}
	h.done.Add(1)
	go func() { // ends when stop deletes the watch, which closes both channels
		defer h.done.Done()
		events, errs := w.Events(), w.Errors()
		for events != nil || errs != nil {
			select {
			case ev, ok := <-events:
				if !ok {
					events = nil
					continue
				}
				_ = ev.Ack(nil)
				if ev.NotifierID == self {
					continue // our own release
				}
				mu.Lock()
				stats.WakesReceived++
				mu.Unlock()
				select {
				case h.wake <- struct{}{}:
				default:
				}
			case _, ok := <-errs:
				if !ok {
					errs = nil
				}
				// Watch errors surface through watcher.Check in the lease monitor.
			}
		}
	}()
	return h, nil
}

func (h *handover) notify() {
	_, _, _ = h.ioctx.NotifyWithTimeout(h.oid, []byte("released"), notifyTimeout)
}

func (h *handover) stop() {
	_ = h.watcher.Delete()
	h.done.Wait()
	h.ioctx.Destroy()
}
