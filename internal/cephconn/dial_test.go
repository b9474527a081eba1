package cephconn_test

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ceph/go-ceph/rados"

	"github.com/flattend/flattend/internal/cephconn"
	"github.com/flattend/flattend/test/cephtest"
)

// closedPort returns a loopback address nothing listens on.
func closedPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

func writeConf(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "ceph.conf")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// Every way Dial can fail before it has a connection is ErrUnreachable (exit 3), with what to fix.
func TestDialErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		o    func(t *testing.T) cephconn.Options
		want string
	}{
		{"missing ceph.conf", func(t *testing.T) cephconn.Options {
			return cephconn.Options{ConfPath: filepath.Join(t.TempDir(), "nope.conf"), User: "admin"}
		}, "check ceph.conf"},
		{"monitor on a closed port", func(t *testing.T) cephconn.Options {
			conf := writeConf(t, "[global]\nmon host = "+closedPort(t)+"\nauth_client_required = none\n")
			return cephconn.Options{ConfPath: conf, User: "admin", ConnectTimeout: 2 * time.Second, OpTimeout: 2 * time.Second}
		}, "timed out after 2s: are the monitors in"},
		{"no keyring", func(t *testing.T) cephconn.Options {
			dir := t.TempDir()
			conf := writeConf(t, "[global]\nmon host = "+closedPort(t)+"\nauth_client_required = cephx\n")
			return cephconn.Options{ConfPath: conf, User: "flattend", Keyring: filepath.Join(dir, "missing.keyring"), ConnectTimeout: 2 * time.Second}
		}, "no key found for client.flattend: set ceph.keyring"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			conn, err := cephconn.Dial(tc.o(t))
			if err == nil {
				conn.Shutdown()
				t.Fatal("Dial succeeded")
			}
			if !errors.Is(err, cephconn.ErrUnreachable) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Dial: %v\nwant ErrUnreachable saying %q", err, tc.want)
			}
		})
	}
}

// A key the monitors refuse (cephx clusters only: without cephx every key is accepted). Pacific's
// monitors do not tell the client: it retries until client_mount_timeout, so the error must name
// the key as well as the monitors.
func TestDialRefusedKey(t *testing.T) {
	conf := cephtest.ConfPath(t)
	if os.Getenv("FLATTEND_TEST_CEPH_AUTH") != "cephx" {
		t.Skip("needs FLATTEND_TEST_AUTH=cephx")
	}
	kr := filepath.Join(t.TempDir(), "wrong.keyring")
	// A well-formed secret that is not client.flattend's.
	if err := os.WriteFile(kr, []byte("[client.flattend]\n\tkey = AQBvaWxkAAAAABAAAAAAAAAAAAAAAAAAAAAAAA==\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	conn, err := cephconn.Dial(cephconn.Options{ConfPath: conf, User: "flattend", Keyring: kr, ConnectTimeout: 3 * time.Second})
	if err == nil {
		conn.Shutdown()
		t.Fatal("Dial with a wrong key succeeded")
	}
	if !errors.Is(err, cephconn.ErrUnreachable) || !strings.Contains(err.Error(), "check ceph.user and ceph.keyring") {
		t.Errorf("Dial with a wrong key: %v\nwant ErrUnreachable naming the key to check", err)
	}
}

// Dial applies the options flattend depends on: fencing on lock breaks whatever ceph.conf says,
// the timeouts, the copy-ups in flight.
func TestDialSetsOptions(t *testing.T) {
	// The cluster's ceph.conf with a node's settings that would turn fencing off.
	base, err := os.ReadFile(cephtest.ConfPath(t))
	if err != nil {
		t.Fatal(err)
	}
	conf := writeConf(t, string(base)+"\n[client]\nrbd blocklist on break lock = false\nrbd blocklist expire seconds = 3600\nlibrados thread count = 4\n")
	threadsBefore := cephtest.ThreadsNamed(t, os.Getpid(), "io_context_pool")
	conn, err := cephconn.Dial(cephconn.Options{ConfPath: conf, User: cephtest.DaemonUser(), Keyring: cephtest.DaemonKeyring(),
		ConnectTimeout: 20 * time.Second, OpTimeout: 7 * time.Second, ConcurrentOps: 3, IOThreads: cephconn.ReaderThreads})
	if err != nil {
		t.Fatalf("test cluster unreachable: %v", err)
	}
	defer conn.Shutdown()
	for k, want := range map[string]string{
		"rbd_blocklist_on_break_lock":   "true",
		"rbd_blocklist_expire_seconds":  "0",
		"client_mount_timeout":          "20",
		"rados_osd_op_timeout":          "7",
		"rados_mon_op_timeout":          "7",
		"rbd_concurrent_management_ops": "3",
		"librados_thread_count":         "1", // ceph.conf says 4
	} {
		if got, err := conn.GetConfigOption(k); err != nil || got != want {
			t.Errorf("%s = %q (%v), want %q", k, got, err, want)
		}
	}
	// What the kernel shows, not only what librados was told: a reader runs librados and librbd
	// completions on one thread (cephconn.ReaderThreads: librbd's open race).
	if got := cephtest.ThreadsNamed(t, os.Getpid(), "io_context_pool") - threadsBefore; got != cephconn.ReaderThreads {
		t.Errorf("the connection started %d io_context_pool threads, want %d", got, cephconn.ReaderThreads)
	}
	if _, err := cephconn.OpenPool(conn, "no-such-pool-"+cephtest.Name(t, "p")); err == nil || !strings.Contains(err.Error(), "does not exist: create it") {
		t.Errorf("OpenPool of a missing pool: %v", err)
	}
}

// Errno reads go-ceph's negative errnos and plain syscall ones; WithHint names the fix for
// missing caps and for a fenced client, and leaves other errors alone.
func TestErrnoAndHints(t *testing.T) {
	eperm := rados.ErrPermissionDenied
	if e, ok := cephconn.Errno(eperm); !ok || e != syscall.EPERM {
		t.Errorf("Errno(%v) = %v, %v", eperm, e, ok)
	}
	wrapped := errors.Join(errors.New("ctx"), syscall.ESHUTDOWN)
	if !cephconn.IsBlocklisted(wrapped) || cephconn.IsNotFound(wrapped) {
		t.Errorf("IsBlocklisted/IsNotFound(%v) wrong", wrapped)
	}
	if !cephconn.IsNotFound(rados.ErrNotFound) {
		t.Error("rados.ErrNotFound is not ENOENT")
	}
	if _, ok := cephconn.Errno(errors.New("plain")); ok {
		t.Error("a plain error has an errno")
	}
	for _, c := range []struct {
		err  error
		want string
	}{
		{eperm, "the cephx key lacks caps"},
		{syscall.EACCES, "the cephx key lacks caps"},
		{syscall.ESHUTDOWN, "this client was blocklisted"},
	} {
		got := cephconn.WithHint(c.err)
		if !strings.Contains(got.Error(), c.want) || !errors.Is(got, c.err) {
			t.Errorf("WithHint(%v) = %v, want it wrapped with %q", c.err, got, c.want)
		}
	}
	plain := errors.New("plain")
	if cephconn.WithHint(plain) != plain {
		t.Error("WithHint changed an error it has no hint for")
	}
}
