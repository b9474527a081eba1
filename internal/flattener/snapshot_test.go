package flattener_test

import (
	"context"
	"encoding/json"
	"os/exec"
	"strings"
	"testing"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"

	"github.com/flattend/flattend/internal/flattener"
	"github.com/flattend/flattend/internal/rbdimage"
	"github.com/flattend/flattend/test/cephtest"
)

// The parent-snapshot cleanup races (cleanup.parent_snapshots). The code under test connects with
// the daemon's key; the evidence is read with the rbd CLI as admin, never from flattend.

// rbdSnap is one line of `rbd snap ls --all --format json`.
type rbdSnap struct {
	Name      string `json:"name"`
	Protected string `json:"protected"`
	Namespace struct {
		Type string `json:"type"`
	} `json:"namespace"`
}

// snapList is `rbd snap ls --all` of image: every snapshot, the trash namespace's too.
func snapList(t *testing.T, image string) []rbdSnap {
	t.Helper()
	var snaps []rbdSnap
	rbdJSON(t, &snaps, "snap", "ls", "--all", cephtest.Pool+"/"+image)
	return snaps
}

// children is `rbd children --all` of image@snap: clones in the trash included.
func children(t *testing.T, image, snap string) []string {
	t.Helper()
	var cs []struct {
		Image string `json:"image"`
		Trash bool   `json:"trash"`
	}
	rbdJSON(t, &cs, "children", "--all", cephtest.Pool+"/"+image+"@"+snap)
	var out []string
	for _, c := range cs {
		out = append(out, c.Image)
	}
	return out
}

// trashIDs maps the names of the test pool's trashed images to their ids (`rbd trash ls`).
func trashIDs(t *testing.T) map[string]string {
	t.Helper()
	var ts []struct {
		ID   string `json:"id"`
		Name string `json:"name"`
	}
	rbdJSON(t, &ts, "trash", "ls", "--all", cephtest.Pool)
	m := map[string]string{}
	for _, e := range ts {
		m[e.Name] = e.ID
	}
	return m
}

func rbdJSON(t *testing.T, v any, args ...string) {
	t.Helper()
	args = append([]string{"--conf", cephtest.ConfPath(t), "--format", "json"}, args...)
	out, err := exec.Command("rbd", args...).Output()
	if err != nil {
		t.Fatalf("rbd %s: %v", strings.Join(args, " "), err)
	}
	if err := json.Unmarshal(out, v); err != nil {
		t.Fatalf("rbd %s: %v in %q", strings.Join(args, " "), err, out)
	}
}

// hasUserSnap reports whether image still shows snap to its users (not moved to the trash
// namespace), and whether it is protected.
func hasUserSnap(t *testing.T, image, snap string) (exists, protected bool) {
	t.Helper()
	for _, s := range snapList(t, image) {
		if s.Name == snap && s.Namespace.Type == "user" {
			return true, s.Protected == "true"
		}
	}
	return false, false
}

// A clone created between the children check and the unprotect (the hook makes the race happen
// there) keeps the snapshot, with the new clone as its child and reading its content. It is
// reported as kept, not as a failure. Clone format 1 (protected snapshot: librbd's unprotect
// refuses) and 2 (unprotected snapshot: librbd parks a snapshot with clones in its trash
// namespace, where it stays until the last clone is flat).
func TestRemoveSnapshotCloneInTheWindow(t *testing.T) {
	for _, format := range []int{1, 2} {
		t.Run(map[int]string{1: "clone v1", 2: "clone v2"}[format], func(t *testing.T) {
			admin := cephtest.Connect(t)
			ioctx := cephtest.IOContext(t, admin)
			p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 4<<20, 22)
			if format == 2 {
				unprotect(t, ioctx, p.Name, p.Snap)
			}
			late := cephtest.Name(t, "late")
			spec := rbdimage.Spec{Pool: cephtest.Pool, Image: p.Name, Snap: p.Snap}

			removed, why, err := flattener.RemoveIfUnusedPausing(dial(t, 1), spec, func() {
				if format == 1 {
					cephtest.Clone(t, ioctx, p, late, "")
				} else {
					cephtest.CloneV2(t, ioctx, p, ioctx, late)
				}
			})
			t.Logf("removed %v, reason %q, rbd snap ls --all: %+v", removed, why, snapList(t, p.Name))
			if err != nil || removed {
				t.Errorf("RemoveIfUnused with a clone made in its window = removed %v, %q, %v; want kept without an error", removed, why, err)
			}
			if format == 1 {
				if ok, prot := hasUserSnap(t, p.Name, p.Snap); !ok || !prot {
					t.Errorf("%s@%s: exists %v, protected %v; want it kept protected", p.Name, p.Snap, ok, prot)
				}
				if got := children(t, p.Name, p.Snap); len(got) != 1 || got[0] != late {
					t.Errorf("children of %s@%s = %v, want the new clone %s", p.Name, p.Snap, got, late)
				}
			} else {
				// librbd gives no atomic "remove unless cloned" for clone v2: the snapshot survives
				// in its trash namespace, and the report must say so rather than "removed".
				snaps := snapList(t, p.Name)
				if len(snaps) != 1 || snaps[0].Namespace.Type != "trash" || !strings.Contains(why, "trash namespace") {
					t.Errorf("rbd snap ls --all = %+v, reason %q; want the snapshot in the trash namespace and the reason to say so", snaps, why)
				}
			}
			if !cephtest.IsClone(t, ioctx, late) {
				t.Errorf("%s lost its parent", late)
			}
			if got := cephtest.Digest(t, ioctx, late, p.Size); got != p.Digest {
				t.Errorf("%s reads %s, want its parent snapshot's %s", late, got[:12], p.Digest[:12])
			}
		})
	}
}

// Two nodes remove the same snapshot at once, each after flattening its last clone: the one that
// loses the race reports it kept ("already gone"), not a failure; the snapshot is gone, and the
// parent's other snapshot, the parent and both flat clones are untouched. Two interleavings: the
// other node finished the removal, or only unprotected, while this one was between its check and
// its unprotect.
func TestRemoveSnapshotTwoNodesAtOnce(t *testing.T) {
	for _, tc := range []struct {
		name  string
		other func(t *testing.T, conn *rados.Conn, spec rbdimage.Spec)
	}{
		{"other removed it", func(t *testing.T, conn *rados.Conn, spec rbdimage.Spec) {
			if removed, why, err := flattener.RemoveIfUnused(conn, spec); err != nil || !removed {
				t.Fatalf("other node's RemoveIfUnused = %v, %q, %v; want removed", removed, why, err)
			}
		}},
		{"other only unprotected it", func(t *testing.T, conn *rados.Conn, spec rbdimage.Spec) {
			img, err := rbdimage.Open(conn, spec.Head(), rbdimage.ReadWrite)
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			if err := img.GetSnapshot(spec.Snap).Unprotect(); err != nil {
				t.Fatalf("other node's unprotect: %v", err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			admin := cephtest.Connect(t)
			ioctx := cephtest.IOContext(t, admin)
			p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 4<<20, 22)
			cephtest.SnapProtect(t, ioctx, p.Name, "keep")
			a, b := cephtest.Name(t, "a"), cephtest.Name(t, "b")
			nodeA, nodeB := dial(t, 4), dial(t, 4)
			spec := rbdimage.Spec{Pool: cephtest.Pool, Image: p.Name, Snap: p.Snap}
			for clone, conn := range map[string]*rados.Conn{a: nodeA, b: nodeB} {
				cephtest.Clone(t, ioctx, p, clone, "")
				if err := flattener.Flatten(context.Background(), conn, rbdimage.Spec{Pool: cephtest.Pool, Image: clone}, nil); err != nil {
					t.Fatalf("flatten %s: %v", clone, err)
				}
			}

			removed, why, err := flattener.RemoveIfUnusedPausing(nodeB, spec, func() { tc.other(t, nodeA, spec) })
			if err != nil {
				t.Errorf("RemoveIfUnused racing another node = removed %v, %q, %v; want no error", removed, why, err)
			}
			t.Logf("removed %v, reason %q", removed, why)
			// Whoever removed it, the snapshot is gone for good (not parked in the trash namespace).
			if snaps := snapList(t, p.Name); len(snaps) != 1 || snaps[0].Name != "keep" || snaps[0].Protected != "true" {
				t.Errorf("rbd snap ls --all %s = %+v; want only the protected snapshot keep", p.Name, snaps)
			}
			for _, clone := range []string{a, b} {
				cephtest.AssertFlatAndIntact(t, ioctx, p, clone)
			}
			if got := cephtest.Digest(t, ioctx, p.Name, p.Size); got != p.Digest {
				t.Errorf("parent %s reads %s, want %s", p.Name, got[:12], p.Digest[:12])
			}
			trash := trashIDs(t)
			for _, img := range []string{p.Name, a, b} {
				if _, ok := trash[img]; ok {
					t.Errorf("%s was moved to the trash", img)
				}
			}
		})
	}
}

// A clone in the trash (rbd trash mv) still reads from the snapshot: the snapshot is kept, and the
// clone can be restored and read back whole. Clone formats 1 (protected snapshot) and 2
// (unprotected snapshot: only the children list stands between it and removal).
func TestRemoveSnapshotKeepsTrashedChildren(t *testing.T) {
	for _, format := range []int{1, 2} {
		t.Run(map[int]string{1: "clone v1", 2: "clone v2"}[format], func(t *testing.T) {
			admin := cephtest.Connect(t)
			ioctx := cephtest.IOContext(t, admin)
			p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 4<<20, 22)
			clone := cephtest.Name(t, "trashed")
			if format == 1 {
				cephtest.Clone(t, ioctx, p, clone, "")
			} else {
				unprotect(t, ioctx, p.Name, p.Snap)
				cephtest.CloneV2(t, ioctx, p, ioctx, clone)
			}
			img, err := rbd.OpenImage(ioctx, clone, rbd.NoSnapshot)
			if err != nil {
				t.Fatal(err)
			}
			err = img.Trash(0)
			img.Close()
			if err != nil {
				t.Fatalf("rbd trash mv %s: %v", clone, err)
			}
			id, ok := trashIDs(t)[clone]
			if !ok {
				t.Fatalf("%s is not in rbd trash ls", clone)
			}

			spec := rbdimage.Spec{Pool: cephtest.Pool, Image: p.Name, Snap: p.Snap}
			removed, why, err := flattener.RemoveIfUnused(dial(t, 1), spec)
			if err != nil || removed || !strings.Contains(why, "(in the trash)") {
				t.Errorf("RemoveIfUnused with a trashed child = removed %v, %q, %v; want kept because of the trashed clone", removed, why, err)
			}
			if ok, prot := hasUserSnap(t, p.Name, p.Snap); !ok || prot != (format == 1) {
				t.Errorf("%s@%s: exists %v, protected %v; want it kept as it was (rbd snap ls --all: %+v)", p.Name, p.Snap, ok, prot, snapList(t, p.Name))
			}
			if err := rbd.TrashRestore(ioctx, id, clone); err != nil {
				t.Fatalf("rbd trash restore %s: %v", clone, err)
			}
			if !cephtest.IsClone(t, ioctx, clone) {
				t.Errorf("restored %s has no parent", clone)
			}
			if got := cephtest.Digest(t, ioctx, clone, p.Size); got != p.Digest {
				t.Errorf("restored %s reads %s, want its parent snapshot's %s", clone, got[:12], p.Digest[:12])
			}
		})
	}
}

func unprotect(t *testing.T, ioctx *rados.IOContext, image, snap string) {
	t.Helper()
	img, err := rbd.OpenImage(ioctx, image, rbd.NoSnapshot)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if err := img.GetSnapshot(snap).Unprotect(); err != nil {
		t.Fatal(err)
	}
}
