package flattener_test

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ceph/go-ceph/rados"

	"github.com/flattend/flattend/internal/cephconn"
	"github.com/flattend/flattend/internal/flattener"
	"github.com/flattend/flattend/internal/rbdimage"
	"github.com/flattend/flattend/test/cephtest"
)

func dial(t *testing.T, ops int) *rados.Conn {
	t.Helper()
	conn, err := cephconn.Dial(cephconn.Options{ConfPath: cephtest.ConfPath(t), User: cephtest.DaemonUser(), Keyring: cephtest.DaemonKeyring(),
		ConnectTimeout: 20 * time.Second, ConcurrentOps: ops})
	if err != nil {
		t.Fatalf("test cluster unreachable: %v", err)
	}
	t.Cleanup(conn.Shutdown)
	return conn
}

func TestFlattenWithProgress(t *testing.T) {
	conn := dial(t, 10)
	ioctx := cephtest.IOContext(t, conn)
	p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 32<<20, 22)
	clone := cephtest.Name(t, "clone")
	cephtest.Clone(t, ioctx, p, clone, "")
	target := rbdimage.Spec{Pool: cephtest.Pool, Image: clone}

	info, err := rbdimage.Inspect(conn, target)
	if err != nil {
		t.Fatal(err)
	}
	if info.Parent == nil || info.Parent.String() != cephtest.Pool+"/"+p.Name+"@s" || info.Overlap != p.Size {
		t.Fatalf("Inspect = %+v", info)
	}
	var calls, lastDone, lastTotal atomic.Uint64
	err = flattener.Flatten(context.Background(), conn, target, func(done, total uint64) {
		calls.Add(1)
		lastDone.Store(done)
		lastTotal.Store(total)
	})
	if err != nil {
		t.Fatalf("Flatten: %v", err)
	}
	if calls.Load() == 0 || lastTotal.Load() != 8 || lastDone.Load() != 8 {
		t.Errorf("progress: %d calls, last %d/%d; want it to reach 8/8 objects", calls.Load(), lastDone.Load(), lastTotal.Load())
	}
	cephtest.AssertFlatAndIntact(t, ioctx, p, clone)

	// Flattening a flat image again is success, not EINVAL.
	if err := flattener.Flatten(context.Background(), conn, target, nil); err != nil {
		t.Errorf("second Flatten of a flat image: %v", err)
	}
}

func TestFlattenCancelledHalfwayResumes(t *testing.T) {
	conn := dial(t, 1) // one copy-up at a time: slow enough to stop in the middle
	ioctx := cephtest.IOContext(t, conn)
	p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 64<<20, 16) // 1024 objects of 64 KiB
	clone := cephtest.Name(t, "clone")
	cephtest.Clone(t, ioctx, p, clone, "")
	target := rbdimage.Spec{Pool: cephtest.Pool, Image: clone}

	cause := errors.New("test stop at half")
	ctx, cancel := context.WithCancelCause(context.Background())
	var stoppedAt atomic.Uint64
	err := flattener.Flatten(ctx, conn, target, func(done, total uint64) {
		if done*2 >= total && stoppedAt.Load() == 0 {
			stoppedAt.Store(done)
			cancel(cause)
		}
	})
	if !errors.Is(err, flattener.ErrCancelled) || !errors.Is(err, cause) {
		t.Fatalf("Flatten = %v, want ErrCancelled with the cause", err)
	}
	if stoppedAt.Load() == 0 {
		t.Fatal("never reached half way")
	}
	if !cephtest.IsClone(t, ioctx, clone) {
		t.Fatal("a cancelled flatten detached the parent")
	}
	// Content is right even half flattened (copied objects + parent for the rest).
	if got := cephtest.Digest(t, ioctx, clone, p.Size); got != p.Digest {
		t.Fatal("content changed by a cancelled flatten")
	}

	// What the cancelled flatten copied, as RADOS has it: each object with its version.
	admin := cephtest.Connect(t)
	copied := cephtest.DataObjects(t, admin, cephtest.Pool, clone)
	if len(copied) == 0 || len(copied) >= 1024 {
		t.Fatalf("%d of 1024 objects copied before the cancel, want some but not all", len(copied))
	}
	if err := flattener.Flatten(context.Background(), conn, target, nil); err != nil {
		t.Fatalf("resumed Flatten: %v", err)
	}
	cephtest.AssertFlatAndIntact(t, ioctx, p, clone)
	// The resume skipped what was copied: those objects were not written again (a resume that
	// starts over rewrites them, and RADOS raises their versions).
	after := cephtest.DataObjects(t, admin, cephtest.Pool, clone)
	cephtest.AssertResumeSkipped(t, copied, after)
	if len(after) != 1024 {
		t.Errorf("%d objects after the resume, want 1024", len(after))
	}
	t.Logf("stopped at object %d of 1024; %d objects in RADOS then", stoppedAt.Load(), len(copied))
}

// flatten.max_bytes_per_second holds objects back: object n starts no earlier than n object
// sizes' worth of the rate after the start, so the whole flatten cannot take less than that. A
// cancel during a pause ends the flatten, which resumes later.
func TestFlattenPaced(t *testing.T) {
	conn := dial(t, 10)
	ioctx := cephtest.IOContext(t, conn)
	p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 16<<20, 20) // 16 objects of 1 MiB
	clone := cephtest.Name(t, "clone")
	cephtest.Clone(t, ioctx, p, clone, "")
	target := rbdimage.Spec{Pool: cephtest.Pool, Image: clone}

	// 4 MiB/s: object k may start k/4 s after the start. Cancel while the flatten waits.
	ctx, cancel := context.WithCancel(context.Background())
	start := time.Now()
	var early atomic.Int64
	err := flattener.FlattenPaced(ctx, conn, target, 4<<20, func(done, total uint64) {
		// librbd reports an object as it sends it: object done-1 was let go by the pace.
		if done >= 2 && time.Since(start) < time.Duration(done-1)*time.Second/4 {
			early.Add(1)
		}
		if done == 7 {
			go func() { time.Sleep(100 * time.Millisecond); cancel() }()
		}
	})
	if !errors.Is(err, flattener.ErrCancelled) {
		t.Fatalf("paced flatten cancelled mid-way = %v, want ErrCancelled", err)
	}
	if n := early.Load(); n > 0 {
		t.Errorf("%d object(s) started ahead of 4 MiB/s", n)
	}
	if info, err := rbdimage.Inspect(conn, target); err != nil || info.Parent == nil {
		t.Fatalf("after the cancel: %+v, %v; want the clone still attached", info, err)
	}

	// 16 MiB/s over 16 objects: the last starts no earlier than 14/16 s after the start.
	start = time.Now()
	if err := flattener.FlattenPaced(context.Background(), conn, target, 16<<20, nil); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took < 14*time.Second/16 {
		t.Errorf("16 MiB at 16 MiB/s took %s, below the pace", took)
	}
	cephtest.AssertFlatAndIntact(t, ioctx, p, clone)
}

func TestFlattenMissingImage(t *testing.T) {
	conn := dial(t, 10)
	cephtest.IOContext(t, conn)
	err := flattener.Flatten(context.Background(), conn, rbdimage.Spec{Pool: cephtest.Pool, Image: "no-such-image"}, nil)
	if !errors.Is(err, rbdimage.ErrNotFound) {
		t.Fatalf("Flatten = %v, want ErrNotFound", err)
	}
	err = flattener.Flatten(context.Background(), conn, rbdimage.Spec{Pool: "no-such-pool", Image: "x"}, nil)
	if err == nil || !strings.Contains(err.Error(), `pool "no-such-pool" does not exist`) {
		t.Fatalf("Flatten on a missing pool = %v", err)
	}
	t.Logf("missing pool: %v", err)
}

// Users sees another client that has the clone open (a VM's qemu) and nobody otherwise.
func TestUsers(t *testing.T) {
	conn := dial(t, 10)
	ioctx := cephtest.IOContext(t, conn)
	p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 4<<20, 22)
	clone := cephtest.Name(t, "clone")
	cephtest.Clone(t, ioctx, p, clone, "")
	target := rbdimage.Spec{Pool: cephtest.Pool, Image: clone}
	if users, err := rbdimage.Users(conn, target); err != nil || len(users) != 0 {
		t.Fatalf("unused clone: Users = %v, %v; want none", users, err)
	}

	other := cephtest.Connect(t) // another client, standing in for qemu
	release := cephtest.HoldLock(t, cephtest.IOContext(t, other), clone)
	users, err := rbdimage.Users(conn, target)
	if err != nil {
		t.Fatal(err)
	}
	joined := strings.Join(users, ", ")
	if len(users) != 1 || !strings.Contains(joined, "lock owner") {
		t.Errorf("clone held by another client: Users = %q, want its lock owner (which also watches), once", joined)
	}
	release()
	if users, err := rbdimage.Users(conn, target); err != nil || len(users) != 0 {
		t.Errorf("after the other client closed it: Users = %v, %v; want none", users, err)
	}
	if _, err := rbdimage.Users(conn, rbdimage.Spec{Pool: cephtest.Pool, Image: "no-such-image"}); !errors.Is(err, rbdimage.ErrNotFound) {
		t.Errorf("missing image: err = %v, want ErrNotFound", err)
	}
}
