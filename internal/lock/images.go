package lock

import (
	"errors"
	"fmt"
	"strconv"
	"syscall"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"

	"github.com/flattend/flattend/internal/cephconn"
)

// Ensure creates the lock images and the handover object if they are missing, checks that the
// images are fit to be lock images, and starts watching for releases. Many nodes may call it at
// once: creating races are settled by Ceph, "already exists" counts as success.
func (m *Mutex) Ensure() error {
	ioctx, err := cephconn.OpenPool(m.conn, m.o.Pool)
	if err != nil {
		return fmt.Errorf("lock image %s: %w", m.Name(), err)
	}
	defer ioctx.Destroy()
	for i := range m.o.Slots {
		name := SlotImage(m.o.Image, i)
		_, err = rbd.Create2(ioctx, name, lockImageSize, rbd.FeatureLayering|rbd.FeatureExclusiveLock, 22)
		exists := errors.Is(err, rbd.ErrExist) || cephconn.IsErrno(err, syscall.EEXIST)
		if err != nil && !exists {
			return fmt.Errorf("creating lock image %s/%s: %w", m.o.Pool, name, cephconn.WithHint(err))
		}
		err = checkImage(ioctx, m.o.Pool, name)
		// librbd's create claims the name first and writes the header after: a node whose create
		// lost that race can find the header missing for a few milliseconds.
		for wait := 20 * time.Millisecond; exists && cephconn.IsNotFound(err) && wait <= headerWait; wait *= 2 {
			time.Sleep(wait)
			err = checkImage(ioctx, m.o.Pool, name)
		}
		if exists && cephconn.IsNotFound(err) {
			return fmt.Errorf("%w: the name is taken but the image has no header; a create was killed half-way? (rbd rm %s/%s)", err, m.o.Pool, name)
		}
		if err != nil {
			return err
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.hand == nil && !m.closing {
		name := m.o.Node
		if name == "" {
			name = "client." + strconv.FormatUint(m.conn.GetInstanceID(), 10)
		}
		wake := WakeObject(m.o.Image, name)
		h, err := startHandover(m.conn, m.o.Pool, m.o.Image, wake, m.o.Node, m.notifyTimeout,
			func() { m.count(func(s *Stats) { s.WakesReceived++ }) }, m.warn)
		if err != nil {
			return fmt.Errorf("watching %s/%s: %w", m.o.Pool, wake, cephconn.WithHint(err))
		}
		m.hand = h
	}
	return nil
}

// headerWait bounds how long Ensure waits for another node's create to finish (its doubling
// sleeps add up to about 5 s).
const headerWait = 5 * time.Second

// Check verifies, without changing anything, that every slot's lock image exists and is fit: it
// has the exclusive-lock feature, no parent, and no data.
func (m *Mutex) Check() error {
	ioctx, err := cephconn.OpenPool(m.conn, m.o.Pool)
	if err != nil {
		return fmt.Errorf("lock image %s: %w", m.Name(), err)
	}
	defer ioctx.Destroy()
	for i := range m.o.Slots {
		if err := checkImage(ioctx, m.o.Pool, SlotImage(m.o.Image, i)); err != nil {
			return err
		}
	}
	return nil
}

func checkImage(ioctx *rados.IOContext, pool, name string) error {
	spec := pool + "/" + name
	img, err := rbd.OpenImageReadOnly(ioctx, name, rbd.NoSnapshot)
	if err != nil {
		return fmt.Errorf("opening lock image %s: %w", spec, cephconn.WithHint(err))
	}
	defer img.Close()
	features, err := img.GetFeatures()
	if err != nil {
		return fmt.Errorf("features of lock image %s: %w", spec, err)
	}
	if features&rbd.FeatureExclusiveLock == 0 {
		return fmt.Errorf("%s: %w (rbd feature enable %s exclusive-lock)", spec, ErrNoExclusiveLock, spec)
	}
	if _, err := img.GetParent(); err == nil {
		return fmt.Errorf("%s: %w: it is a clone; point lock.image at a dedicated image", spec, ErrNotLockImage)
	}
	size, err := img.GetSize()
	if err != nil {
		return fmt.Errorf("size of lock image %s: %w", spec, err)
	}
	if size > maxLockImageSize {
		return fmt.Errorf("%s: %w: it is %d MiB; point lock.image at a dedicated image (flattend creates a 1 MiB one)", spec, ErrNotLockImage, size>>20)
	}
	hasData := false
	err = img.DiffIterate(rbd.DiffIterateConfig{Offset: 0, Length: size, IncludeParent: rbd.ExcludeParent,
		WholeObject: rbd.EnableWholeObject, Callback: func(_, _ uint64, exists int, _ interface{}) int {
			if exists != 0 {
				hasData = true
			}
			return 0
		}})
	if err != nil {
		return fmt.Errorf("reading lock image %s: %w", spec, cephconn.WithHint(err))
	}
	if hasData {
		return fmt.Errorf("%s: %w: it holds data; point lock.image at a dedicated image", spec, ErrNotLockImage)
	}
	return nil
}
