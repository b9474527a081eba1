package lock

import "time"

// SetClock replaces m's clock: a node whose clock is off.
func SetClock(m *Mutex, now func() time.Time) { m.now = now }

// QueueKey is the omap key a waiter with client id id would write at queue position seq.
func QueueKey(seq, id uint64) string { return queueKey(seq, id) }
