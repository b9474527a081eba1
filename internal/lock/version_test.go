package lock_test

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"github.com/flattend/flattend/internal/lock"
	"github.com/flattend/flattend/internal/status"
	"github.com/flattend/flattend/test/cephtest"
)

// The holder record names the holder's flattend version, and `status` (JSON and table) shows it,
// so that a mixed fleet is visible; a record without one (an older holder) reads as unknown.
func TestHolderVersionInStatus(t *testing.T) {
	reader := cephtest.DaemonConnect(t)
	cephtest.IOContext(t, reader) // the test pool
	for _, c := range []struct{ version, want string }{{"9.8.7-test", "9.8.7-test"}, {"", "unknown"}} {
		image := cephtest.Name(t, "ver")
		m := newMutex(t, cephtest.DaemonConnect(t), lock.Options{Pool: cephtest.Pool, Image: image, Node: "node-v",
			Version: c.version, CheckInterval: 200 * time.Millisecond})
		if err := m.Ensure(); err != nil {
			t.Fatal(err)
		}
		l, err := m.TryLock(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if err := l.Working("pool/clone"); err != nil {
			t.Fatal(err)
		}
		st, err := lock.ReadStatus(reader, cephtest.Pool, image, 1)
		if err != nil || st[0].Holder == nil {
			t.Fatalf("status: %+v, %v", st, err)
		}
		if got := st[0].Holder.Version; got != c.want {
			t.Errorf("holder written with version %q reads %q, want %q", c.version, got, c.want)
		}
		r := status.Build(st, nil, time.Now())
		var js, text bytes.Buffer
		if err := status.WriteJSON(&js, r); err != nil {
			t.Fatal(err)
		}
		if err := status.WriteText(&text, r); err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(js.String(), `"version": "`+c.want+`"`) {
			t.Errorf("status JSON lacks the holder's version %q:\n%s", c.want, js.String())
		}
		if !strings.Contains(text.String(), "VERSION") || !strings.Contains(text.String(), " "+c.want+" ") {
			t.Errorf("status table lacks the holder's version %q:\n%s", c.want, text.String())
		}
		if err := l.Unlock(); err != nil {
			t.Fatal(err)
		}
	}
}
