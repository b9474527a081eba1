package lock_test

import (
	"testing"
	"time"

	"github.com/flattend/flattend/internal/lock"
	"github.com/flattend/flattend/test/cephtest"
)

// Fence blocklists a client that librbd did not (as on a node whose librbd was told not to),
// with flattend's own key, and reads it back from the OSD map.
func TestFenceAddsMissingEntry(t *testing.T) {
	victim := cephtest.Connect(t)
	vio := cephtest.IOContext(t, victim)
	addr, err := victim.GetAddrs()
	if err != nil {
		t.Fatal(err)
	}
	conn := cephtest.DaemonConnect(t)
	if ok, _, err := lock.Blocklisted(conn, addr); err != nil || ok {
		t.Fatalf("blocklisted before Fence: %v, %v", ok, err)
	}
	until, err := lock.Fence(conn, addr)
	if err != nil || time.Until(until) < time.Minute {
		t.Fatalf("Fence(%s) = %s, %v", addr, until, err)
	}
	if ok, _, err := lock.Blocklisted(cephtest.Connect(t), addr); err != nil || !ok {
		t.Fatalf("not in the blocklist after Fence: %v, %v", ok, err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for vio.WriteFull(cephtest.Name(t, "probe"), []byte("x")) == nil {
		if time.Now().After(deadline) {
			t.Fatal("the fenced client can still write")
		}
		time.Sleep(200 * time.Millisecond)
	}
}
