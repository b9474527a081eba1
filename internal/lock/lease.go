package lock

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/ceph/go-ceph/rbd"
)

// RecordKey is the image-meta key on a lock image under which its holder describes itself.
const RecordKey = "flattend.holder"

// recordEvery bounds how often a holder rewrites its record while it makes progress;
// heartbeatEvery is how often it rewrites it anyway, so that readers can tell a live holder
// from a dead one whose lock nobody has broken yet (StaleAfter).
const (
	recordEvery    = 3 * time.Second
	heartbeatEvery = 10 * time.Second
	// StaleAfter is how old a holder record may get before readers call it stale.
	StaleAfter = 3 * heartbeatEvery
)

// maxUnconfirmed is how long this connection's watch may go unconfirmed by the OSD before the
// lease is given up. Other nodes break a holder's lock only after its watch timed out
// (osd_client_watch_timeout, 30 s by default): giving up well before keeps two flattens from
// ever overlapping even on a cut link. (Blocklisting would fence a late one anyway.)
const maxUnconfirmed = 12 * time.Second

// Record is what a holder tells the cluster about itself, on its lock image.
type Record struct {
	Node    string    `json:"node"`
	Version string    `json:"version,omitempty"` // the holder's flattend; "unknown" when read from an older one
	PID     int       `json:"pid"`
	Client  string    `json:"client"` // the holder's client address, as the lock's owner shows it
	Since   time.Time `json:"since"`
	Clone   string    `json:"clone,omitempty"`
	Done    uint64    `json:"objects_done"`
	Total   uint64    `json:"objects"`
	Started time.Time `json:"clone_started,omitzero"`
	Updated time.Time `json:"updated"`
}

// Lease is a held slot. Done closes when the lock is lost; Unlock releases it.
type Lease struct {
	m     *Mutex
	img   *rbd.Image
	slot  int
	since time.Time

	done      chan struct{}
	stop      chan struct{}
	monitored sync.WaitGroup

	mu       sync.Mutex
	err      error // why done closed
	unlocked bool
	record   Record
	dirty    bool // record changed since written
	written  time.Time
	// interrupted is the record a previous holder left behind: it lost the lock (killed, cut
	// off, fenced) before it could clear it.
	interrupted *Record
}

func (m *Mutex) newLease(img *rbd.Image, slot int) *Lease {
	l := &Lease{m: m, img: img, slot: slot, since: time.Now(), done: make(chan struct{}), stop: make(chan struct{})}
	client := ""
	if owners, err := img.LockGetOwners(); err == nil && len(owners) == 1 {
		client = owners[0].Owner
	}
	if v, err := img.GetMetadata(RecordKey); err == nil {
		var r Record
		if json.Unmarshal([]byte(v), &r) == nil {
			l.interrupted = &r
		}
	}
	l.record = Record{Node: m.o.Node, Version: m.o.Version, PID: os.Getpid(), Client: client, Since: l.since.UTC()}
	// Not written yet: Working writes it before any flatten, and a handover is a few
	// milliseconds faster without a second write.
	l.dirty = true
	l.monitored.Add(1)
	go l.monitor()
	return l
}

// Interrupted returns the record of a previous holder that lost this slot without releasing it
// (nil after a clean release). Its Clone, if any, was being flattened when it stopped.
func (l *Lease) Interrupted() *Record { return l.interrupted }

// Slot is the index of the held slot.
func (l *Lease) Slot() int { return l.slot }

// Image is the held slot's lock image, "pool/image".
func (l *Lease) Image() string { return l.m.o.Pool + "/" + SlotImage(l.m.o.Image, l.slot) }

// Since is when the lock was taken.
func (l *Lease) Since() time.Time { return l.since }

// Done closes when the lock is lost (not on Unlock).
func (l *Lease) Done() <-chan struct{} { return l.done }

// Err says why Done closed: an error wrapping ErrLost. Nil while the lease holds.
func (l *Lease) Err() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.err
}

// Context returns a context that is cancelled, with the lease's Err as cause, when the lock is
// lost or parent ends. Call cancel when done with it.
func (l *Lease) Context(parent context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancelCause(parent)
	go func() { // ends with ctx, at the latest when the caller cancels it
		select {
		case <-l.done:
			cancel(l.Err())
		case <-ctx.Done():
		}
	}()
	return ctx, func() { cancel(context.Canceled) }
}

// Working records, on the lock image and before the flatten starts, the clone about to be
// flattened under this lease. `flattend status` shows it, and if this holder dies or is fenced
// mid-way, the next holder learns from it which clone to repair (Interrupted). Do not flatten
// if it fails.
func (l *Lease) Working(clone string) error {
	l.mu.Lock()
	l.record.Clone, l.record.Done, l.record.Total, l.record.Started = clone, 0, 0, time.Now().UTC()
	l.dirty = true
	l.mu.Unlock()
	if err := l.writeRecord(); err != nil {
		return fmt.Errorf("recording the clone on lock image %s: %w", l.Image(), wrapErr(err))
	}
	return nil
}

// Progress records the flatten's progress. It never calls into librbd (it runs in librbd's
// progress callback); the monitor writes the record out at most every few seconds.
func (l *Lease) Progress(done, total uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.record.Done, l.record.Total = done, total
	l.dirty = true
}

// writeRecord stores the record on the lock image if it changed. Only the holder can write it:
// image-meta changes need the exclusive lock.
func (l *Lease) writeRecord() error {
	l.mu.Lock()
	if !l.dirty {
		l.mu.Unlock()
		return nil
	}
	r := l.record
	r.Updated = time.Now().UTC()
	l.dirty = false
	l.written = time.Now()
	l.mu.Unlock()
	b, _ := json.Marshal(r)
	return l.img.SetMetadata(RecordKey, string(b))
}

// monitor confirms ownership every CheckInterval; any doubt ends the lease. It also writes the
// holder record.
func (l *Lease) monitor() {
	defer l.monitored.Done()
	t := time.NewTicker(l.m.o.CheckInterval)
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-t.C:
		}
		if err := l.confirm(); err != nil {
			l.lose(err)
			return
		}
		l.mu.Lock()
		age := time.Since(l.written)
		due := (l.dirty && age >= recordEvery) || age >= heartbeatEvery
		l.dirty = l.dirty || due
		l.mu.Unlock()
		if due {
			_ = l.writeRecord() // progress for status only
		}
	}
}

func (l *Lease) confirm() error {
	// The watch is checked first: it is local, and it is what notices a cut link or a blocklist
	// (librbd's own view of ownership only changes when it hears from the cluster).
	if since, err := l.m.watchHealth(); err != nil {
		return fmt.Errorf("%w: this client's watch failed (%v): cut off from the cluster or blocklisted", ErrLost, err)
	} else if since > maxUnconfirmed {
		return fmt.Errorf("%w: the cluster has not confirmed this client for %s", ErrLost, since.Round(time.Second))
	}
	owner, err := l.img.LockIsExclusiveOwner()
	switch {
	case err != nil:
		return fmt.Errorf("%w: checking ownership of %s: %w", ErrLost, l.Image(), err)
	case !owner:
		return fmt.Errorf("%w: %s is no longer ours (another node broke it)", ErrLost, l.Image())
	}
	return nil
}

func (l *Lease) lose(err error) {
	l.mu.Lock()
	first := l.err == nil && !l.unlocked
	if first {
		l.err = err
		close(l.done)
	}
	l.mu.Unlock()
	if first && l.m.lost != nil {
		l.m.lost(err)
	}
}

// Unlock stops the ownership checks, clears the holder record, releases the lock, closes the lock
// image and wakes waiting nodes. After a loss it only closes the image and returns the loss.
func (l *Lease) Unlock() error {
	l.mu.Lock()
	if l.unlocked {
		l.mu.Unlock()
		return nil
	}
	l.unlocked = true
	lost := l.err
	l.mu.Unlock()
	close(l.stop)
	l.monitored.Wait()

	var err error
	if lost == nil {
		_ = l.img.RemoveMetadata(RecordKey)
		if rerr := l.img.LockRelease(); rerr != nil {
			err = fmt.Errorf("releasing lock on %s: %w", l.Image(), wrapErr(rerr))
		} else {
			// The slot is free: wake the next waiter now, not after closing the image.
			l.m.released()
		}
	} else {
		err = lost
	}
	if cerr := l.img.Close(); cerr != nil && err == nil {
		err = fmt.Errorf("closing lock image %s: %w", l.Image(), cerr)
	}
	if lost != nil && !errors.Is(err, ErrLost) {
		err = fmt.Errorf("%w: %w", ErrLost, err)
	}
	if err != nil && l.m.lost != nil {
		// A lock that could not be released cleanly is not to be trusted on this connection.
		l.m.lost(fmt.Errorf("%w: %w", ErrLost, err))
	}
	return err
}
