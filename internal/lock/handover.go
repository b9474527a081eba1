package lock

import (
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ceph/go-ceph/rados"
)

// The handover protocol: a queue of waiters in the omap of one RADOS object beside the lock
// images, and a small "wake" object per node that only that node watches.
//
//  1. A node that finds every slot busy queues itself: one omap key on the handover object,
//     "w.<since>.<client id>", so that keys sort by when their node began waiting.
//  2. A holder that releases a slot takes the first entry off the queue and notifies that node's
//     wake object "grant <key>". Only that node tries the lock now. A waiter that does not
//     ack (dead, cut off) has lost its place, and the next entry is tried.
//  3. Waiters still poll with their backoff (a lost notification, a holder that died), but a
//     queued waiter touches the lock images only when it is among the first `slots` entries; the
//     others read the head of the queue, and drop entries there whose node does not answer a ping,
//     so a dead waiter at the head cannot stall the queue behind a dead holder.
//
// A handover so costs the same few operations however many nodes wait (an omap read and removal,
// one notification and its ack), and nodes are served in the order they began waiting.

// notifyTimeout bounds how long a notification waits for its ack: a live watcher acks at once, a
// dead node's watch lingers until it times out and would otherwise hold the notifier.
const notifyTimeout = time.Second

const (
	msgGrant    = "grant "
	msgPing     = "ping "
	queuePrefix = "w."
	// grantTries bounds how many queue entries one release tries before leaving the slot to polls.
	grantTries = 3
)

// queueEntry is the value of a waiter's omap key: where to wake it, and who it is for people.
type queueEntry struct {
	Node string `json:"node,omitempty"`
	Wake string `json:"wake"`
}

func queueKey(since time.Time, id uint64) string {
	return fmt.Sprintf("%s%019d.%020d", queuePrefix, since.UnixNano(), id)
}

// parseQueueKey returns the client id and the waiting start of a queue key.
func parseQueueKey(key string) (id uint64, since time.Time, ok bool) {
	ns, i, found := strings.Cut(strings.TrimPrefix(key, queuePrefix), ".")
	if !found {
		return 0, time.Time{}, false
	}
	n, err1 := strconv.ParseInt(ns, 10, 64)
	id, err2 := strconv.ParseUint(i, 10, 64)
	return id, time.Unix(0, n), err1 == nil && err2 == nil
}

// handover is this node's place in the queue and its watch on its wake object. The watch doubles
// as this connection's health check (see Lease.confirm).
type handover struct {
	ioctx   *rados.IOContext
	queue   string // the handover object
	wakeOID string
	node    string
	self    uint64
	watcher *rados.Watcher
	wake    chan struct{}
	quit    chan struct{}
	done    sync.WaitGroup
	onWake  func()

	mu  sync.Mutex
	key string // this node's queue entry; empty when it is not queued
}

func startHandover(conn *rados.Conn, pool, queue, wakeOID, node string, onWake func()) (*handover, error) {
	ioctx, err := conn.OpenIOContext(pool)
	if err != nil {
		return nil, err
	}
	for _, oid := range []string{queue, wakeOID} {
		if err := ioctx.Create(oid, rados.CreateIdempotent); err != nil {
			ioctx.Destroy()
			return nil, err
		}
	}
	w, err := ioctx.Watch(wakeOID)
	if err != nil {
		ioctx.Destroy()
		return nil, err
	}
	h := &handover{ioctx: ioctx, queue: queue, wakeOID: wakeOID, node: node, self: conn.GetInstanceID(),
		watcher: w, wake: make(chan struct{}, 1), quit: make(chan struct{}), onWake: onWake}
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
	// A notification names a queue entry. Only the process that is waiting under that entry
	// answers: two processes of one node share a wake object, and an entry may outlive its wait.
	h.mu.Lock()
	mine := h.key != "" && (msg == msgGrant+h.key || msg == msgPing+h.key)
	granted := mine && strings.HasPrefix(msg, msgGrant)
	if granted {
		h.key = "" // the releaser took the entry off the queue
	}
	h.mu.Unlock()
	if !mine {
		_ = ev.Ack(nil)
		return
	}
	_ = ev.Ack([]byte("ok"))
	if granted {
		h.onWake()
		select {
		case h.wake <- struct{}{}:
		default:
		}
	}
}

// enqueue puts this node in the queue, in the place its waiting start gives it.
func (h *handover) enqueue(since time.Time) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.key != "" {
		return nil
	}
	key := queueKey(since, h.self)
	v, _ := json.Marshal(queueEntry{Node: h.node, Wake: h.wakeOID})
	if err := h.ioctx.SetOmap(h.queue, map[string][]byte{key: v}); err != nil {
		return err
	}
	h.key = key
	return nil
}

// dequeue takes this node out of the queue.
func (h *handover) dequeue() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.key == "" {
		return nil
	}
	key := h.key
	h.key = ""
	return h.ioctx.RmOmapKeys(h.queue, []string{key})
}

// head reads the first n entries of the queue, in order, and whether key is still queued.
func (h *handover) head(n int, key string) (keys []string, values map[string]queueEntry, queued bool, err error) {
	op := rados.CreateReadOp()
	defer op.Release()
	first := op.GetOmapValues("", queuePrefix, uint64(n))
	var mine *rados.ReadOpOmapGetValsByKeysStep
	if key != "" {
		mine = op.GetOmapValuesByKeys([]string{key})
	}
	if err := op.Operate(h.ioctx, h.queue, rados.OperationNoFlag); err != nil {
		return nil, nil, false, err
	}
	values = map[string]queueEntry{}
	for {
		kv, err := first.Next()
		if err != nil {
			return nil, nil, false, err
		}
		if kv == nil {
			break
		}
		var e queueEntry
		if json.Unmarshal(kv.Value, &e) == nil && e.Wake != "" {
			keys = append(keys, kv.Key)
			values[kv.Key] = e
		}
	}
	slices.Sort(keys)
	if mine != nil {
		kv, err := mine.Next()
		if err != nil {
			return nil, nil, false, err
		}
		queued = kv != nil
	}
	return keys, values, queued, nil
}

// answers notifies a queued node's wake object and reports whether it answered for that entry.
func (h *handover) answers(key string, e queueEntry, msg string) bool {
	acks, _, _ := h.ioctx.NotifyWithTimeout(e.Wake, []byte(msg+key), notifyTimeout)
	for _, a := range acks {
		if len(a.Response) > 0 {
			return true
		}
	}
	return false
}

// release hands a freed slot to the first waiter that answers, and reports whether one did and
// how many notifications that took.
func (h *handover) release() (granted bool, notifies int) {
	keys, values, _, err := h.head(grantTries+1, "")
	if err != nil {
		return false, 0
	}
	h.mu.Lock()
	own := h.key
	h.mu.Unlock()
	tries := 0
	for _, k := range keys {
		if tries == grantTries {
			break
		}
		if k == own {
			continue
		}
		tries++
		// Off the queue first: a grantee that then finds the slot taken queues again in the same
		// place, and a waiter that does not answer is gone for good.
		if h.ioctx.RmOmapKeys(h.queue, []string{k}) != nil {
			return false, notifies
		}
		notifies++
		if h.answers(k, values[k], msgGrant) {
			return true, notifies
		}
	}
	return false, notifies
}

// mayPoll says whether this node, queued, should try the lock images now: yes when it is among
// the first `slots` waiters (or no longer queued: a releaser or a poller dropped it, and it has
// queued again). Entries ahead of it whose node does not answer are dropped.
func (h *handover) mayPoll(slots int, since time.Time) (bool, error) {
	h.mu.Lock()
	key := h.key
	h.mu.Unlock()
	if key == "" {
		return true, nil
	}
	keys, values, queued, err := h.head(slots, key)
	if err != nil {
		return true, err
	}
	if !queued {
		h.mu.Lock()
		if h.key == key {
			h.key = ""
		}
		h.mu.Unlock()
		return true, h.enqueue(since)
	}
	if slices.Contains(keys, key) {
		return true, nil
	}
	dropped := false
	for _, k := range keys {
		if !h.answers(k, values[k], msgPing) {
			_ = h.ioctx.RmOmapKeys(h.queue, []string{k})
			dropped = true
		}
	}
	return dropped, nil
}

func (h *handover) stop() {
	_ = h.dequeue()
	// On a blocklisted connection the unwatch fails and go-ceph leaves the watch's channels open:
	// quit, not their closing, ends the listener.
	_ = h.watcher.Delete()
	close(h.quit)
	h.done.Wait()
	if h.node == "" {
		_ = h.ioctx.Delete(h.wakeOID) // named after this connection: nobody will use it again
	}
	h.ioctx.Destroy()
}
