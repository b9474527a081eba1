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
//  2. A holder that releases a slot notifies the first entry's wake object "grant <key>". Only
//     that node tries the lock now; it takes its entry off once it holds a slot, so the waiters
//     behind it keep deferring to it meanwhile. A waiter that does not ack (dead, cut off) loses
//     its place, and the next entry is tried.
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
//
// The queue entry is written by one goroutine (sync): callers only say whether they want to be
// queued, so they never wait on RADOS, and h.mu is never held across I/O that the notification
// handler would wait behind.
type handover struct {
	ioctx   *rados.IOContext
	queue   string // the handover object
	wakeOID string
	node    string
	self    uint64
	watcher *rados.Watcher
	wake    chan struct{}
	kick    chan struct{}
	quit    chan struct{}
	done    sync.WaitGroup
	onWake  func()

	mu      sync.Mutex
	want    string // the entry this node wants in the queue; empty when it is not waiting
	written string // the entry sync last wrote (or is writing); empty when none
	grants  int    // grants answered since the last takeGrants
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
		watcher: w, wake: make(chan struct{}, 1), kick: make(chan struct{}, 1), quit: make(chan struct{}), onWake: onWake}
	h.done.Add(2)
	go h.listen() // both end when stop closes quit
	go h.writer()
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
			// Watch errors surface through watcher.Check in the lease monitor and in TryLock.
		}
	}
}

func (h *handover) handle(ev rados.NotifyEvent) {
	msg := string(ev.Data)
	// A notification names a queue entry. Only the process that is waiting under that entry
	// answers: two processes of one node share a wake object, and an entry may outlive its wait.
	// A grantee keeps its entry until it holds a slot (TryLock then takes it off): meanwhile the
	// waiters behind it still see it first in line and do not poll.
	h.mu.Lock()
	mine := h.want != "" && (msg == msgGrant+h.want || msg == msgPing+h.want)
	granted := mine && strings.HasPrefix(msg, msgGrant)
	if granted {
		h.grants++
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

// enqueue asks for this node's entry, in the place its waiting start gives it.
func (h *handover) enqueue(since time.Time) {
	h.setWant(queueKey(since, h.self))
}

// dequeue asks for this node's entry to go.
func (h *handover) dequeue() { h.setWant("") }

func (h *handover) setWant(key string) {
	h.mu.Lock()
	changed := h.want != key || h.written != key
	h.want = key
	h.mu.Unlock()
	if changed {
		select {
		case h.kick <- struct{}{}:
		default:
		}
	}
}

// queued returns the entry this node wants, empty when it is not waiting.
func (h *handover) queued() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.want
}

// takeGrants returns how many grants this node answered since the last call.
func (h *handover) takeGrants() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := h.grants
	h.grants = 0
	return n
}

// writer brings the queue in line with what this node wants, one write at a time.
func (h *handover) writer() {
	defer h.done.Done()
	for {
		select {
		case <-h.quit:
			return
		case <-h.kick:
		}
		h.sync()
	}
}

// sync writes the wanted entry and removes the one written before, until they agree. A failed
// write is left for the next kick: the node still polls meanwhile.
func (h *handover) sync() {
	for range 4 {
		h.mu.Lock()
		want, written := h.want, h.written
		h.mu.Unlock()
		if want == written {
			return
		}
		if written != "" {
			if err := h.ioctx.RmOmapKeys(h.queue, []string{written}); err != nil {
				return
			}
		}
		if want != "" {
			v, _ := json.Marshal(queueEntry{Node: h.node, Wake: h.wakeOID})
			if err := h.ioctx.SetOmap(h.queue, map[string][]byte{want: v}); err != nil {
				h.mu.Lock()
				if h.written == written {
					h.written = ""
				}
				h.mu.Unlock()
				return
			}
		}
		h.mu.Lock()
		if h.written == written {
			h.written = want
		}
		h.mu.Unlock()
	}
}

// head reads the first n entries of the queue, in order, and whether key is still queued.
// Entries that do not decode keep their place and have no wake object: nobody answers for them,
// so the next release or poller drops them.
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
		_ = json.Unmarshal(kv.Value, &e)
		keys = append(keys, kv.Key)
		values[kv.Key] = e
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
	if e.Wake == "" {
		return false
	}
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
	own := h.queued()
	tries := 0
	for _, k := range keys {
		if tries == grantTries {
			break
		}
		if k == own {
			continue
		}
		tries++
		notifies++
		if h.answers(k, values[k], msgGrant) {
			// The grantee takes its entry off when it holds the slot; until then it stays first.
			return true, notifies
		}
		// A waiter that does not answer is gone for good.
		if h.ioctx.RmOmapKeys(h.queue, []string{k}) != nil {
			return false, notifies
		}
	}
	return false, notifies
}

// mayPoll says whether this node, queued, should try the lock images now: yes when fewer than
// `slots` live waiters are ahead of it, or when it is no longer queued (a releaser or a poller
// took its entry; it queues again when it finds every slot busy). Entries ahead of it whose node
// does not answer a ping are dropped.
func (h *handover) mayPoll(slots int) bool {
	key := h.queued()
	if key == "" {
		return true
	}
	for range 3 {
		keys, values, queued, err := h.head(slots, key)
		if err != nil || !queued {
			if err == nil {
				h.mu.Lock()
				if h.written == key {
					h.written = "" // gone from the queue: the next Wait writes it again
				}
				h.mu.Unlock()
			}
			return true
		}
		if slices.Contains(keys, key) {
			return true
		}
		dropped := false
		for _, k := range keys {
			if !h.answers(k, values[k], msgPing) {
				_ = h.ioctx.RmOmapKeys(h.queue, []string{k})
				dropped = true
			}
		}
		if !dropped {
			return false // live waiters ahead
		}
	}
	return true
}

func (h *handover) stop() {
	// On a blocklisted connection the unwatch fails and go-ceph leaves the watch's channels open:
	// quit, not their closing, ends the listener.
	_ = h.watcher.Delete()
	close(h.quit)
	h.done.Wait()
	h.dequeue()
	h.sync() // best effort: a dead connection leaves the entry for the others to drop
	if h.node == "" {
		_ = h.ioctx.Delete(h.wakeOID) // named after this connection: nobody will use it again
	}
	h.ioctx.Destroy()
}
