package lock

import (
	"context"
	"fmt"
	"time"
)

// wait queues this node for a slot (if it was not already), so that releasing holders hand it
// one in turn. TryLock does it by itself when it finds every slot busy. A failure to queue is
// not an error: the node still polls.
func (m *Mutex) wait() {
	m.mu.Lock()
	if m.waitingSince.IsZero() {
		m.waitingSince = m.now()
	}
	h, since := m.hand, m.waitingSince
	m.mu.Unlock()
	if h != nil {
		h.enqueue(since)
	}
}

// StopWaiting takes this node out of the queue of waiters (it has a slot, or nothing left to
// do). A grant that reached it meanwhile is passed on to the next waiter.
func (m *Mutex) StopWaiting() {
	m.mu.Lock()
	m.waitingSince = time.Time{}
	h := m.hand
	m.mu.Unlock()
	if h == nil {
		return
	}
	h.dequeue()
	if h.takeGrants() > 0 {
		m.passOn(h)
	}
}

// passOn hands a slot that this node was granted but does not use to the next waiter, in the
// background: a grant that arrives while the node takes another slot or stops waiting would
// otherwise leave that slot to the polls.
func (m *Mutex) passOn(h *handover) { m.grantNext(h, nil) }

// grantNext hands a freed slot to the longest-waiting node in the background, then tells after
// (if set) whether one took it. It reports false, and does nothing, once the Mutex is closing.
func (m *Mutex) grantNext(h *handover, after func(granted bool)) bool {
	m.mu.Lock()
	if m.closing {
		m.mu.Unlock()
		return false
	}
	m.inflight.Add(1)
	m.mu.Unlock()
	go func() {
		defer m.inflight.Done()
		granted, notifies := h.release()
		m.count(func(s *Stats) {
			s.NotifiesSent += int64(notifies)
			if granted {
				s.Grants++
			}
		})
		if after != nil {
			after(granted)
		}
	}()
	return true
}

// handedOver waits (until ctx ends) for the handover of this node's last release and reports
// whether the slot went to a waiting node. A node with more work then waits its turn instead of
// taking the slot straight back.
func (m *Mutex) handedOver(ctx context.Context) bool {
	m.mu.Lock()
	ch := m.handingOver
	m.mu.Unlock()
	if ch == nil {
		return false
	}
	select {
	case <-ch:
	case <-ctx.Done():
		return false
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.handingOver == ch {
		m.handingOver = nil // answer once per release
	}
	return m.granted
}

// Wake returns a channel that receives when a releasing holder granted this node a slot: the
// moment to try again, without waiting for the backoff.
func (m *Mutex) Wake() <-chan struct{} {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.hand == nil {
		return nil
	}
	return m.hand.wake
}

// released hands the freed slot to the longest-waiting node, in the background (HandedOver
// tells how it went).
func (m *Mutex) released() {
	m.mu.Lock()
	h := m.hand
	if h == nil || m.closing {
		m.mu.Unlock()
		return
	}
	done := make(chan struct{})
	m.handingOver, m.granted = done, false
	m.mu.Unlock()
	if !m.grantNext(h, func(granted bool) {
		m.mu.Lock()
		m.granted = granted
		m.mu.Unlock()
		close(done)
	}) {
		close(done)
	}
}

// Close stops watching for releases and waits, at most until ctx ends, for librbd calls that
// callers gave up on. The connection may be shut down only after Close returned nil.
func (m *Mutex) Close(ctx context.Context) error {
	m.mu.Lock()
	m.closing = true
	h := m.hand
	m.hand = nil
	m.mu.Unlock()
	done := make(chan struct{})
	go func() {
		m.inflight.Wait() // notifications use the handover's I/O context: they end first
		if h != nil {
			h.stop()
		}
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("lock %s: a librbd call is still running: %w", m.Name(), context.Cause(ctx))
	}
}

// watchHealth says how long ago this connection's watch was last confirmed by the OSD, or why it
// is broken. A client cut off from the cluster, or blocklisted, finds out here.
func (m *Mutex) watchHealth() (time.Duration, error) {
	m.mu.Lock()
	h := m.hand
	m.mu.Unlock()
	if h == nil {
		return 0, nil
	}
	return h.watcher.Check()
}
