package e2e

import (
	"errors"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"

	"github.com/flattend/flattend/internal/flattener"
	"github.com/flattend/flattend/test/cephtest"
)

// A clone whose copy-up was lost by a flatten interrupted outside flattend (no mark on it, no
// holder record names it): `once` flattens it byte-identical to its parent snapshot. On a librbd
// without the fix of Ceph tracker 68998 that takes flattend's verification (before, only clones a
// record or this process's memory named were repaired, and object 100 read as zeros after the
// flatten); with the fix, librbd's own flatten.
func TestOnceVerifiesUnmarkedLostCopyup(t *testing.T) {
	conn := cephtest.Connect(t)
	ioctx := cephtest.IOContext(t, conn)
	node := cephtest.Name(t, "n")
	p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 8<<20, 16) // 128 objects
	clone := node + "-c"
	cephtest.Clone(t, ioctx, p, clone, node)
	cephtest.LoseCopyup(t, ioctx, clone, 100)

	code, out := runCmd(t, 2*time.Minute, "once", "--config", nodeConfig(t, node, cephtest.Name(t, "lock"), ""))
	if code != 0 {
		t.Fatalf("once: exit %d\n%s", code, out)
	}
	cephtest.AssertFlatAndIntact(t, ioctx, p, clone)
	verified := strings.Contains(out, "lost copy-ups found and redone before the flatten")
	if want := !flattener.CopyupFixed(flattener.CephVersion()); verified != want {
		t.Errorf("lost copy-up redone by flattend: %v, want %v with Ceph %s", verified, want, flattener.CephVersion())
	}
	if mark := flatteningMark(t, ioctx, clone); mark != "" {
		t.Errorf("flattening mark %q left on a clone flattened cleanly", mark)
	}
}

// The flattening mark lives on the clone: set before the flatten starts, still there after its
// holder is killed -9 (anyone reads it from the image's metadata), reported when the next flatten
// resumes, and removed by that flatten's clean end.
func TestKilledFlattenLeavesMarkOnClone(t *testing.T) {
	n := newSlowNode(t, cephtest.Connect(t), 64) // 1024 objects of 64 KiB
	// Paced at 1 MiB/s the flatten takes a minute by construction: it is running when killed.
	paced := nodeConfig(t, n.node, n.lockImage, "flatten: {concurrent_ops: 1, max_bytes_per_second: 1MiB}\n")
	a := start(t, "once", "--config", paced)
	a.waitFor(t, time.Minute, "flatten started", func(e event) bool { return e.Msg == "flatten started" })
	if err := a.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	a.wait(t, 10*time.Second)
	mark := flatteningMark(t, n.ioctx, n.clone)
	if !strings.Contains(mark, n.node) {
		t.Fatalf("after the kill the clone's %s is %q, want a mark naming %s", flattener.FlatteningKey, mark, n.node)
	}

	b := start(t, "once", "--config", n.conf)
	if code := b.wait(t, cephtest.WatchTimeout()+2*time.Minute); code != 0 {
		t.Fatalf("resuming once exited %d", code)
	}
	cephtest.AssertFlatAndIntact(t, n.ioctx, n.parent, n.clone)
	if count(b.events(t), "resuming an interrupted flatten") != 1 {
		t.Error("the resumed flatten did not report the interrupted one")
	}
	if mark := flatteningMark(t, n.ioctx, n.clone); mark != "" {
		t.Errorf("flattening mark %q left after a clean flatten", mark)
	}
}

// flatteningMark reads the clone's flattening mark from its image metadata ("" if none).
func flatteningMark(t *testing.T, ioctx *rados.IOContext, image string) string {
	t.Helper()
	img, err := rbd.OpenImageReadOnly(ioctx, image, rbd.NoSnapshot)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	v, err := img.GetMetadata(flattener.FlatteningKey)
	if errors.Is(err, rbd.ErrNotFound) {
		return ""
	}
	if err != nil {
		t.Fatal(err)
	}
	return v
}
