// Package flattener flattens one RBD clone, reporting progress and stopping when its context is
// cancelled. It knows nothing of locks or windows: the caller hands it a connection it may write
// on and a context that ends when it must stop.
package flattener

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"syscall"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"

	"github.com/flattend/flattend/internal/cephconn"
)

// ErrCancelled is returned (wrapped, with the context's cause) when the flatten was stopped by
// its context. The clone keeps what was copied: the next flatten skips those objects.
var ErrCancelled = errors.New("flatten cancelled")

// ErrNotFound is returned when the image no longer exists (deleted or renamed since discovery).
var ErrNotFound = errors.New("image not found")

// Target names one image.
type Target struct {
	Pool      string
	Namespace string
	Image     string
}

func (t Target) String() string {
	if t.Namespace != "" {
		return t.Pool + "/" + t.Namespace + "/" + t.Image
	}
	return t.Pool + "/" + t.Image
}

// Info is what Inspect learns about an image.
type Info struct {
	Size    uint64 // bytes
	Overlap uint64 // bytes still shared with the parent (0 when flat)
	Parent  string // "pool/image@snap", empty when flat
}

// Progress receives (objects done, objects in all) as the flatten goes.
type Progress func(done, total uint64)

// Inspect reads an image's size and parent without changing it.
func Inspect(conn *rados.Conn, t Target) (Info, error) {
	ioctx, err := openPool(conn, t)
	if err != nil {
		return Info{}, err
	}
	defer ioctx.Destroy()
	img, err := rbd.OpenImageReadOnly(ioctx, t.Image, rbd.NoSnapshot)
	if err != nil {
		if errors.Is(err, rbd.ErrNotFound) {
			return Info{}, fmt.Errorf("%s: %w", t, ErrNotFound)
		}
		return Info{}, fmt.Errorf("opening %s: %w", t, err)
	}
	defer img.Close()
	var info Info
	if info.Size, err = img.GetSize(); err != nil {
		return Info{}, fmt.Errorf("size of %s: %w", t, err)
	}
	p, err := img.GetParent()
	switch {
	case errors.Is(err, rbd.ErrNotFound):
		return info, nil
	case err != nil:
		return Info{}, fmt.Errorf("parent of %s: %w", t, err)
	}
	info.Parent = p.Image.PoolName + "/" + p.Image.ImageName + "@" + p.Snap.SnapName
	if p.Image.PoolNamespace != "" {
		info.Parent = p.Image.PoolName + "/" + p.Image.PoolNamespace + "/" + p.Image.ImageName + "@" + p.Snap.SnapName
	}
	if info.Overlap, err = img.GetOverlap(); err != nil {
		return Info{}, fmt.Errorf("parent overlap of %s: %w", t, err)
	}
	return info, nil
}

// Flatten copies up every object t still shares with its parent and detaches it, on conn.
// An already flat image is success. When ctx ends, librbd is told to stop (it finishes the copy-ups
// in flight) and the error wraps ErrCancelled and context.Cause(ctx).
func Flatten(ctx context.Context, conn *rados.Conn, t Target, progress Progress) error {
	return FlattenPaced(ctx, conn, t, 0, progress)
}

// FlattenPaced is Flatten at no more than bytesPerSecond (0: as fast as librbd goes). librbd
// calls the progress callback as it starts each object, and the callback holds the next object
// back until the objects started so far fit the rate. The rate is of the walk through the image:
// objects the parent never had, or that an interrupted flatten already copied, count too.
func FlattenPaced(ctx context.Context, conn *rados.Conn, t Target, bytesPerSecond uint64, progress Progress) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%s: %w: %w", t, ErrCancelled, context.Cause(ctx))
	}
	ioctx, err := openPool(conn, t)
	if err != nil {
		return err
	}
	defer ioctx.Destroy()
	var p *pacer
	if bytesPerSecond > 0 {
		size, err := objectSize(ioctx, t)
		if err != nil {
			return err
		}
		p = &pacer{start: time.Now(), perObject: time.Duration(float64(size) / float64(bytesPerSecond) * float64(time.Second))}
	}

	var objects uint64
	stage, errno := flattenWithProgress(ioctx, t.Image, func(done, total uint64) bool {
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
		return fmt.Errorf("%s: %w", t, ErrNotFound)
	case stage == "flatten" && errno == syscall.EINVAL:
		// librbd says EINVAL for an image without a parent: someone else finished it.
		if info, err := Inspect(conn, t); err == nil && info.Parent == "" {
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

// objectSize reads the size of t's RADOS objects, which flatten copies one at a time.
func objectSize(ioctx *rados.IOContext, t Target) (uint64, error) {
	img, err := rbd.OpenImageReadOnly(ioctx, t.Image, rbd.NoSnapshot)
	if errors.Is(err, rbd.ErrNotFound) {
		return 0, fmt.Errorf("%s: %w", t, ErrNotFound)
	}
	if err != nil {
		return 0, fmt.Errorf("opening %s: %w", t, err)
	}
	defer img.Close()
	st, err := img.Stat()
	if err != nil {
		return 0, fmt.Errorf("object size of %s: %w", t, err)
	}
	return st.Obj_size, nil
}

// ParseTarget reads "pool/image" or "pool/namespace/image".
func ParseTarget(spec string) (Target, error) {
	parts := strings.Split(spec, "/")
	switch {
	case len(parts) == 2 && parts[0] != "" && parts[1] != "":
		return Target{Pool: parts[0], Image: parts[1]}, nil
	case len(parts) == 3 && parts[0] != "" && parts[2] != "":
		return Target{Pool: parts[0], Namespace: parts[1], Image: parts[2]}, nil
	}
	return Target{}, fmt.Errorf("%q is not pool/image or pool/namespace/image", spec)
}

func openPool(conn *rados.Conn, t Target) (*rados.IOContext, error) {
	ioctx, err := cephconn.OpenPool(conn, t.Pool)
	if err != nil {
		return nil, err
	}
	ioctx.SetNamespace(t.Namespace)
	return ioctx, nil
}

// Users lists the other clients that have t open: the owners of its exclusive lock and its
// watchers (a running VM's qemu is both). Empty means nobody else uses it. If a client holds the
// lock, librbd would hand our flatten over to it (and our throttle, fencing and cancel would not
// apply); if it only watches, our flatten would take the lock and stall the client's writes.
func Users(conn *rados.Conn, t Target) ([]string, error) {
	ioctx, err := openPool(conn, t)
	if err != nil {
		return nil, err
	}
	defer ioctx.Destroy()
	// Read-only opens register no watch, so the list holds only the others.
	img, err := rbd.OpenImageReadOnly(ioctx, t.Image, rbd.NoSnapshot)
	if err != nil {
		if errors.Is(err, rbd.ErrNotFound) {
			return nil, fmt.Errorf("%s: %w", t, ErrNotFound)
		}
		return nil, fmt.Errorf("opening %s: %w", t, err)
	}
	defer img.Close()
	var users []string
	// The lockers list shows the managed exclusive lock too (rbd_lock_get_owners refuses
	// read-only images).
	_, lockers, err := img.ListLockers()
	if err != nil {
		return nil, fmt.Errorf("lockers of %s: %w", t, err)
	}
	for _, l := range lockers {
		users = append(users, "lock owner "+l.Client+" at "+l.Addr)
	}
	watchers, err := img.ListWatchers()
	if err != nil {
		return nil, fmt.Errorf("watchers of %s: %w", t, err)
	}
	for _, w := range watchers {
		users = append(users, "watcher "+w.Addr)
	}
	return users, nil
}
