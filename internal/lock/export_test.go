package lock

import "time"

// SetClock replaces m's clock: a node whose clock is off.
func SetClock(m *Mutex, now func() time.Time) { m.now = now }

// QueueKey is the omap key a waiter with client id id would write at queue position seq.
func QueueKey(seq, id uint64) string { return queueKey(seq, id) }

// SetNotifyTimeout sets how long m's releases wait for a waiter's ack; call it before Ensure. The
// tests of the order of wake-ups raise it: on a loaded machine a live waiter may ack after 1 s,
// and is then taken for dead and skipped, which is right for flattend but not what they test.
func SetNotifyTimeout(m *Mutex, d time.Duration) { m.notifyTimeout = d }
