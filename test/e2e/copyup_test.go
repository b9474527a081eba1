package e2e

import (
	"bytes"
	"errors"
	"slices"
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

// flatten.in_use: allow with a running VM that owns its clone's exclusive lock, on a clone with a
// lost copy-up: the verification redoes the copy-up without taking the VM's lock (before, the
// repair took it with rbd_lock_acquire, refusing the VM's writes), flattend says the flatten is
// handed to the VM's client, and the clone ends flat with the VM's write and the parent's data.
func TestInUseAllowKeepsTheVMsLock(t *testing.T) {
	conn := cephtest.Connect(t)
	ioctx := cephtest.IOContext(t, conn)
	node := cephtest.Name(t, "n")
	p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 8<<20, 16) // 128 objects of 64 KiB
	clone := node + "-c"
	cephtest.Clone(t, ioctx, p, clone, node)
	cephtest.LoseCopyup(t, ioctx, clone, 100)

	vm, err := rbd.OpenImage(cephtest.IOContext(t, cephtest.Connect(t)), clone, rbd.NoSnapshot) // qemu's client
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close()
	if _, err := vm.WriteAt([]byte("vm"), 5<<16); err != nil { // takes the clone's exclusive lock
		t.Fatal(err)
	}
	owner := cephtest.Lockers(t, ioctx, clone)
	if len(owner) != 1 {
		t.Fatalf("lockers %q, want the VM", owner)
	}
	code, out := runCmd(t, 2*time.Minute, "once", "--config", nodeConfig(t, node, cephtest.Name(t, "lock"), "flatten: {in_use: allow}\n"))
	if code != 0 {
		t.Fatalf("once: exit %d\n%s", code, out)
	}
	if !strings.Contains(out, "librbd hands the flatten to the client that owns its lock") {
		t.Error("once did not say that the VM's client runs the flatten")
	}
	if got := cephtest.Lockers(t, ioctx, clone); !slices.Equal(got, owner) {
		t.Errorf("the clone's lock moved from the VM: %q before, %q after", owner, got)
	}
	if cephtest.IsClone(t, ioctx, clone) {
		t.Fatal("clone not flat")
	}
	if _, err := vm.WriteAt([]byte("vm2"), 6<<16); err != nil {
		t.Fatalf("the VM cannot write after the flatten: %v", err)
	}
	vm.Close()
	want, got := make([]byte, 64<<10), make([]byte, 64<<10)
	readImage(t, ioctx, p.Name, p.Snap, 100<<16, want)
	readImage(t, ioctx, clone, "", 100<<16, got)
	if !bytes.Equal(got, want) {
		t.Error("object 100 lost its parent data (lost copy-up not redone)")
	}
	readImage(t, ioctx, clone, "", 5<<16, got[:2])
	if string(got[:2]) != "vm" {
		t.Errorf("the VM's write reads %q", got[:2])
	}
}

func readImage(t *testing.T, ioctx *rados.IOContext, image, snap string, off int64, b []byte) {
	t.Helper()
	if snap == "" {
		snap = rbd.NoSnapshot
	}
	img, err := rbd.OpenImageReadOnly(ioctx, image, snap)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if _, err := img.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
}
