package lock

import (
	"encoding/json"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ceph/go-ceph/rados"
)

// The handover protocol, on one RADOS object beside the lock images that every node watches:
//
//  1. A holder that releases a slot notifies "released". Every watching node acks at once, a
//     waiting node with the time it started waiting.
//  2. The releaser picks the longest-waiting node among the acks and notifies "grant <id>".
//     Only that node tries the lock now; the others stay asleep.
//
// So a handover costs two notifications and one lock attempt however many nodes wait, and
// nodes are served in the order they began waiting. Waiters still poll with their backoff, which
// covers lost notifications, a grantee that died, and nodes that started meanwhile.

// notifyTimeout bounds how long a notification waits for acks: live watchers ack at once, a dead
// node's watch lingers until it times out and would otherwise hold the notifier.
const notifyTimeout = time.Second

const (
	msgReleased = "released"
	msgGrant    = "grant "
)

type waitAck struct {
	Since int64 `json:"since"` // unix nanoseconds
}

// handover is this node's watch on the handover object. The watch doubles as this connection's
// health check (see Lease.confirm).
type handover struct {
	ioctx   *rados.IOContext
	oid     string
	self    rados.NotifierID
	watcher *rados.Watcher
	wake    chan struct{}
	quit    chan struct{}
	done    sync.WaitGroup
	// waitingSince returns when this node began waiting for a slot, zero if it is not waiting.
	waitingSince func() time.Time
	onWake       func()
}

func startHandover(conn *rados.Conn, pool, oid string, waitingSince func() time.Time, onWake func()) (*handover, error) {
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
	h := &handover{ioctx: ioctx, oid: oid, self: rados.NotifierID(conn.GetInstanceID()), watcher: w,
		wake: make(chan struct{}, 1), quit: make(chan struct{}), waitingSince: waitingSince, onWake: onWake}
	h.done.Add(1)
	go h.listen() // ends when stop closes quit
	return h, nil
}

func (h *handover) listen() {
	defer h.done.Done()
	events, errs := h.watcher.Events(), h.watcher.Errors()
	for events != nil || errs != nil {
		select {
		case <-h.quit:
			return
		case ev, ok := <-events:
			if !ok {
				events = nil
				continue
			}
			h.handle(ev)
		case _, ok := <-errs:
			if !ok {
				errs = nil
			}
			// Watch errors surface through watcher.Check in the lease monitor.
		}
	}
}

func (h *handover) handle(ev rados.NotifyEvent) {
	msg := string(ev.Data)
	switch {
	case msg == msgReleased:
		var reply []byte
		if since := h.waitingSince(); !since.IsZero() && ev.NotifierID != h.self {
			reply, _ = json.Marshal(waitAck{Since: since.UnixNano()})
		}
		_ = ev.Ack(reply)
	case strings.HasPrefix(msg, msgGrant):
		_ = ev.Ack(nil)
		if id, err := strconv.ParseUint(strings.TrimPrefix(msg, msgGrant), 10, 64); err == nil && rados.NotifierID(id) == h.self {
			h.onWake()
			select {
			case h.wake <- struct{}{}:
			default:
			}
		}
	default:
		_ = ev.Ack(nil)
	}
}

// release runs the protocol's two steps and reports whether a waiting node was granted the slot.
func (h *handover) release() (granted bool, notifies int) {
	acks, _, _ := h.ioctx.NotifyWithTimeout(h.oid, []byte(msgReleased), notifyTimeout)
	notifies = 1
	var best rados.NotifierID
	var bestSince int64
	for _, a := range acks {
		var w waitAck
		if a.NotifierID == h.self || len(a.Response) == 0 || json.Unmarshal(a.Response, &w) != nil || w.Since == 0 {
			continue
		}
		if bestSince == 0 || w.Since < bestSince {
			best, bestSince = a.NotifierID, w.Since
		}
	}
	if bestSince == 0 {
		return false, notifies
	}
	_, _, _ = h.ioctx.NotifyWithTimeout(h.oid, []byte(msgGrant+strconv.FormatUint(uint64(best), 10)), notifyTimeout)
	return true, notifies + 1
}

func (h *handover) stop() {
	// On a blocklisted connection the unwatch fails and go-ceph leaves the watch's channels open:
	// quit, not their closing, ends the listener.
	_ = h.watcher.Delete()
	close(h.quit)
	h.done.Wait()
	h.ioctx.Destroy()
}
