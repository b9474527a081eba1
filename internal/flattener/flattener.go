// Package flattener flattens one RBD clone, reporting progress and stopping when its context is
// cancelled. It knows nothing of locks or windows: the caller hands it a connection it may write
// on and a context that ends when it must stop.
package flattener

import (
	"context"
	"errors"
	"fmt"
	"syscall"
	"time"

	"github.com/ceph/go-ceph/rados"

	"github.com/flattend/flattend/internal/cephconn"
	"github.com/flattend/flattend/internal/librbd"
	"github.com/flattend/flattend/internal/rbdimage"
)

// ErrCancelled is returned (wrapped, with the context's cause) when the flatten was stopped by
// its context. The clone keeps what was copied: the next flatten skips those objects.
var ErrCancelled = errors.New("flatten cancelled")

// Progress receives (objects done, objects in all) as the flatten goes.
type Progress func(done, total uint64)

// Flatten copies up every object t still shares with its parent and detaches it, on conn.
// An already flat image is success. When ctx ends, librbd is told to stop (it finishes the copy-ups
// in flight) and the error wraps ErrCancelled and context.Cause(ctx).
func Flatten(ctx context.Context, conn *rados.Conn, t rbdimage.Spec, progress Progress) error {
	return FlattenPaced(ctx, conn, t, 0, progress)
}

// FlattenPaced is Flatten at no more than bytesPerSecond (0: as fast as librbd goes). librbd
// calls the progress callback as it starts each object, and the callback holds the next object
// back until the objects started so far fit the rate. The rate is of the walk through the image:
// objects the parent never had, or that an interrupted flatten already copied, count too.
func FlattenPaced(ctx context.Context, conn *rados.Conn, t rbdimage.Spec, bytesPerSecond uint64, progress Progress) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%s: %w: %w", t, ErrCancelled, context.Cause(ctx))
	}
	ioctx, err := rbdimage.OpenIOContext(conn, t)
	if err != nil {
		return err
	}
	defer ioctx.Destroy()
	p, err := newPacer(conn, t, bytesPerSecond)
	if err != nil {
		return err
	}

	var objects uint64
	stage, errno := librbd.FlattenWithProgress(ioctx, t.Image, func(done, total uint64) bool {
		if ctx.Err() != nil {
			return false
		}
		objects = total
		if progress != nil {
			progress(done, total)
		}
		return p.wait(ctx, done)
	})
	switch {
	case errno == 0:
		// librbd reports the offset of the object it starts on; say "all done" at the end.
		if progress != nil && objects > 0 {
			progress(objects, objects)
		}
		return nil
	case errno == syscall.ECANCELED && ctx.Err() != nil:
		return fmt.Errorf("%s: %w: %w", t, ErrCancelled, context.Cause(ctx))
	case stage == "open" && errno == syscall.ENOENT:
		return fmt.Errorf("%s: %w", t, rbdimage.ErrNotFound)
	case stage == "flatten" && errno == syscall.EINVAL:
		// librbd says EINVAL for an image without a parent: someone else finished it.
		if info, err := rbdimage.Inspect(conn, t); err == nil && info.Parent == nil {
			return nil
		}
	}
	return cephconn.WithHint(fmt.Errorf("%s: %s: %w", t, stage, errno))
}

// maxPause bounds one pause of a paced flatten: it blocks a librbd thread that the lock's
// connection shares. With objects over 4 MiB at 1 MiB/s the pace then runs faster than asked.
const maxPause = 4 * time.Second

// pacer holds a flatten to a rate: object n may start perObject × n after start. librbd calls
// it from one thread at a time.
type pacer struct {
	start     time.Time
	perObject time.Duration
}

// newPacer returns the pacer for bytesPerSecond over t's objects; nil (no pace) for 0.
func newPacer(conn *rados.Conn, t rbdimage.Spec, bytesPerSecond uint64) (*pacer, error) {
	if bytesPerSecond == 0 {
		return nil, nil
	}
	info, err := rbdimage.Inspect(conn, t)
	if err != nil {
		return nil, err
	}
	perObject := time.Duration(float64(info.ObjectSize) / float64(bytesPerSecond) * float64(time.Second))
	return &pacer{start: time.Now(), perObject: perObject}, nil
}

// wait returns when object n may start, or false when ctx ends first. It runs on a librbd
// thread, which it blocks: that is what holds the next copy-up back.
func (p *pacer) wait(ctx context.Context, n uint64) bool {
	if p == nil {
		return true
	}
	due := p.start.Add(time.Duration(n) * p.perObject)
	if late := time.Since(due); late > p.perObject {
		// Behind (a slow stretch, or objects skipped fast): no burst to catch up.
		p.start = p.start.Add(late - p.perObject)
		return true
	}
	d := min(time.Until(due), maxPause)
	if d <= 0 {
		return true
	}
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
		return true
	case <-ctx.Done():
		return false
	}
}
