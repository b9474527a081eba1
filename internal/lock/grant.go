package lock

import (
	"fmt"
	"strings"
)

// answers notifies a queued node's wake object and reports whether it answered for that entry,
// and whether asking took the notify timeout (a watcher that did not ack: dead or cut off).
func (h *handover) answers(e waiterEntry, msg string) (answered, slow bool) {
	acks, timeouts, _ := h.ioctx.NotifyWithTimeout(e.Wake, []byte(msg+e.key), h.notifyTimeout)
	for _, a := range acks {
		if len(a.Response) > 0 {
			return true, false
		}
	}
	return false, len(timeouts) > 0
}

// head reads the first n valid entries of the queue and whether key is queued, and removes the
// junk it met on the way (entries no flattend wrote: they are never notified).
func (h *handover) head(n int, key string) (queueRead, error) {
	r, err := readQueue(h.ioctx, h.queue, h.image, n, key)
	if err == nil && len(r.junk) > 0 {
		h.dropJunk(r.junk)
	}
	return r, err
}

func (h *handover) dropJunk(keys []string) {
	if h.ioctx.RmOmapKeys(h.queue, keys) != nil || h.warn == nil {
		return
	}
	shown := keys[:min(len(keys), 3)]
	more := ""
	if len(keys) > len(shown) {
		more = fmt.Sprintf(" and %d more", len(keys)-len(shown))
	}
	h.warn(fmt.Sprintf("removed %d entries that flattend did not write from the queue on %s: %s%s",
		len(keys), h.queue, strings.Trim(fmt.Sprintf("%q", shown), "[]"), more))
}

// release hands a freed slot to the first waiter that answers, and reports whether one did and
// how many notifications that took.
func (h *handover) release() (granted bool, notifies int) {
	own := h.queued()
	slow := 0
	for notifies < grantEntries && slow < grantTries {
		r, err := h.head(grantTries+2, "")
		if err != nil {
			return false, notifies
		}
		tried := false
		for _, e := range r.entries {
			if e.key == own || notifies == grantEntries || slow == grantTries {
				continue
			}
			tried = true
			notifies++
			ok, timedOut := h.answers(e, msgGrant)
			if ok {
				// The grantee takes its entry off when it holds the slot; until then it stays first.
				return true, notifies
			}
			if timedOut {
				slow++
			}
			// A waiter that does not answer is gone for good.
			if h.ioctx.RmOmapKeys(h.queue, []string{e.key}) != nil {
				return false, notifies
			}
		}
		if !tried {
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
		r, err := h.head(slots, key)
		if err != nil {
			return true
		}
		if !r.queued {
			h.lostEntry(key) // gone from the queue: the next Wait writes it again
			return true
		}
		for _, e := range r.entries {
			if e.key == key {
				return true // among the first `slots`
			}
		}
		dropped := false
		for _, e := range r.entries {
			if ok, _ := h.answers(e, msgPing); !ok {
				_ = h.ioctx.RmOmapKeys(h.queue, []string{e.key})
				dropped = true
			}
		}
		if !dropped {
			return false // live waiters ahead
		}
	}
	return true
}
