package lock

import (
	"encoding/json"
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
//     "q.<seq>.<client id>". The seq is the object version the OSD returned for the node's
//     ticket write on that object, so keys sort by when the OSD saw their node arrive, whatever
//     the nodes' clocks say (entries.go).
//  2. A holder that releases a slot notifies the first entry's wake object "grant <key>". Only
//     that node tries the lock now; it takes its entry off once it holds a slot, so the waiters
//     behind it keep deferring to it meanwhile. A waiter that does not ack (dead, cut off) loses
//     its place, and the next entry is tried. Entries flattend did not write are skipped and
//     removed, never notified.
//  3. Waiters still poll with their backoff (a lost notification, a holder that died), but a
//     queued waiter touches the lock images only when it is among the first `slots` entries; the
//     others read the head of the queue, and drop entries there whose node does not answer a ping,
//     so a dead waiter at the head cannot stall the queue behind a dead holder.
//
// A handover so costs the same few operations however many nodes wait (an omap read and removal,
// one notification and its ack), and nodes are served in the order they arrived.

// defaultNotifyTimeout bounds how long a notification waits for its ack: a live watcher acks at
// once, a dead node's watch lingers until it times out and would otherwise hold the notifier.
const defaultNotifyTimeout = time.Second

const (
	msgGrant = "grant "
	msgPing  = "ping "
	// grantTries bounds how many waiters that do not answer (each costs the notify timeout) one release
	// tries before leaving the slot to polls.
	grantTries = 3
	// grantEntries bounds how many entries one release looks at, answering or not.
	grantEntries = 32
	// ticketAttr is the xattr each waiter writes on the handover object to get its place.
	ticketAttr = "flattend.ticket"
)

// handover is this node's place in the queue and its watch on its wake object. The watch doubles
// as this connection's health check (see Lease.confirm).
//
// The queue entry is written by one goroutine (sync): callers only say whether they want to be
// queued, so they never wait on RADOS, and h.mu is never held across I/O that the notification
// handler would wait behind.
type handover struct {
	ioctx   *rados.IOContext
	wctx    *rados.IOContext // the writer's own: its last object version is the ticket's
	image   string
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
	warn    func(string)

	notifyTimeout time.Duration // how long answers waits for an ack

	mu      sync.Mutex
	waiting bool      // this node wants a place in the queue
	since   time.Time // when it began waiting, by its own clock: shown, never ordered by
	key     string    // its entry while waiting: set by the first write of the wait, kept till it ends
	written string    // the entry sync last wrote (or is writing); empty when none
	grants  int       // grants answered since the last takeGrants
}

func startHandover(conn *rados.Conn, pool, image, wakeOID, node string, notifyTimeout time.Duration, onWake func(), warn func(string)) (*handover, error) {
	ioctx, err := conn.OpenIOContext(pool)
	if err != nil {
		return nil, err
	}
	wctx, err := conn.OpenIOContext(pool)
	if err != nil {
		ioctx.Destroy()
		return nil, err
	}
	fail := func(err error) (*handover, error) {
		wctx.Destroy()
		ioctx.Destroy()
		return nil, err
	}
	if notifyTimeout <= 0 {
		notifyTimeout = defaultNotifyTimeout
	}
	queue := HandoverObject(image)
	for _, oid := range []string{queue, wakeOID} {
		if err := ioctx.Create(oid, rados.CreateIdempotent); err != nil {
			return fail(err)
		}
	}
	w, err := ioctx.Watch(wakeOID)
	if err != nil {
		return fail(err)
	}
	h := &handover{ioctx: ioctx, wctx: wctx, image: image, queue: queue, wakeOID: wakeOID, node: node, notifyTimeout: notifyTimeout,
		self: conn.GetInstanceID(), watcher: w, wake: make(chan struct{}, 1), kick: make(chan struct{}, 1),
		quit: make(chan struct{}), onWake: onWake, warn: warn}
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
	want := h.queuedLocked()
	mine := want != "" && (msg == msgGrant+want || msg == msgPing+want)
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

// enqueue asks for a place in the queue for this node; a node already waiting keeps its place.
func (h *handover) enqueue(since time.Time) {
	h.mu.Lock()
	if !h.waiting {
		h.waiting, h.since = true, since
	}
	h.mu.Unlock()
	h.poke()
}

// dequeue asks for this node's entry to go.
func (h *handover) dequeue() {
	h.mu.Lock()
	h.waiting, h.key = false, ""
	h.mu.Unlock()
	h.poke()
}

func (h *handover) poke() {
	select {
	case h.kick <- struct{}{}:
	default:
	}
}

// queued returns this node's entry, empty when it is not waiting or not written yet.
func (h *handover) queued() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.queuedLocked()
}

func (h *handover) queuedLocked() string {
	if !h.waiting {
		return ""
	}
	return h.key
}

// lostEntry notes that key is no longer in the queue (someone dropped it while this node was
// alive): the next enqueue writes it again, in its old place.
func (h *handover) lostEntry(key string) {
	h.mu.Lock()
	if h.written == key {
		h.written = ""
	}
	h.mu.Unlock()
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
		waiting, key, written, since := h.waiting, h.key, h.written, h.since
		h.mu.Unlock()
		if waiting && key == "" {
			k, err := h.ticket()
			if err != nil {
				return
			}
			h.mu.Lock()
			if h.waiting && h.key == "" {
				h.key = k
			}
			h.mu.Unlock()
			continue
		}
		want := ""
		if waiting {
			want = key
		}
		if want == written {
			return
		}
		op := rados.CreateWriteOp()
		if written != "" {
			op.RmOmapKeys([]string{written})
		}
		if want != "" {
			v, _ := json.Marshal(queueEntry{Node: h.node, Wake: h.wakeOID, Since: since.UTC()})
			op.SetOmap(map[string][]byte{want: v})
		}
		err := op.Operate(h.wctx, h.queue, rados.OperationNoFlag)
		op.Release()
		h.mu.Lock()
		if h.written == written {
			h.written = want
			if err != nil {
				h.written = "" // unknown: the next kick writes it again
			}
		}
		h.mu.Unlock()
		if err != nil {
			return
		}
	}
}

// ticket writes to the handover object and returns the key of this node's place: the version
// the OSD gave the object for that write orders it after every earlier write, whoever made it.
func (h *handover) ticket() (string, error) {
	op := rados.CreateWriteOp()
	defer op.Release()
	op.SetXattr(ticketAttr, []byte(strconv.FormatUint(h.self, 10)))
	if err := op.Operate(h.wctx, h.queue, rados.OperationNoFlag); err != nil {
		return "", err
	}
	v, err := h.wctx.GetLastVersion()
	if err != nil {
		return "", err
	}
	return queueKey(v, h.self), nil
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
	h.wctx.Destroy()
	h.ioctx.Destroy()
}
