package libvirturi_test

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/flattend/flattend/internal/libvirturi"
)

func TestParse(t *testing.T) {
	t.Setenv("XDG_RUNTIME_DIR", "/run/user/7")
	for uri, want := range map[string]string{
		"qemu:///system":                         "/run/libvirt/libvirt-sock-ro",
		"qemu+unix:///system":                    "/run/libvirt/libvirt-sock-ro",
		"qemu:///session":                        "/run/user/7/libvirt/libvirt-sock",
		"qemu+unix:///session":                   "/run/user/7/libvirt/libvirt-sock",
		"qemu:///system?socket=/tmp/x/sock":      "/tmp/x/sock",
		"qemu+unix:///session?socket=/tmp/x/s-2": "/tmp/x/s-2",
	} {
		ep, err := libvirturi.Parse(uri)
		if err != nil || ep.Sockets[0] != want || !strings.HasPrefix(ep.Open, "qemu:///s") || strings.Contains(ep.Open, "?") {
			t.Errorf("%s: %+v %v, want first socket %s", uri, ep, err, want)
		}
	}
}

func TestParseSockets(t *testing.T) {
	ep, err := libvirturi.Parse("qemu:///system")
	want := []string{"/run/libvirt/libvirt-sock-ro", "/run/libvirt/virtqemud-sock-ro", "/run/libvirt/libvirt-sock", "/run/libvirt/virtqemud-sock"}
	if err != nil || ep.Open != "qemu:///system" || !slices.Equal(ep.Sockets, want) {
		t.Errorf("system: %+v %v, want sockets %v", ep, err, want)
	}

	t.Setenv("XDG_RUNTIME_DIR", "")
	t.Setenv("HOME", "/home/u")
	ep, err = libvirturi.Parse("qemu:///session")
	want = []string{"/home/u/.cache/libvirt/libvirt-sock", "/home/u/.cache/libvirt/virtqemud-sock"}
	if err != nil || ep.Open != "qemu:///session" || !slices.Equal(ep.Sockets, want) {
		t.Errorf("session without XDG_RUNTIME_DIR: %+v %v, want sockets %v", ep, err, want)
	}

	ep, err = libvirturi.Parse("qemu:///session?socket=/x/sock")
	if err != nil || ep.Open != "qemu:///session" || !slices.Equal(ep.Sockets, []string{"/x/sock"}) {
		t.Errorf("socket parameter: %+v %v, want only /x/sock", ep, err)
	}
}

// Parse's errors are what config prints after "discovery.libvirt.uri: ".
func TestParseErrors(t *testing.T) {
	for uri, want := range map[string]string{
		"qemu+ssh://host/system":             `"qemu+ssh://host/system": use a local qemu URI: qemu:///system or qemu:///session, optionally with ?socket=PATH`,
		"xen:///system":                      `"xen:///system": use a local qemu URI`,
		"qemu+tcp:///system":                 `"qemu+tcp:///system": use a local qemu URI`,
		"qemu://host/system":                 `"qemu://host/system": remote hosts are not supported: flattend reads the VMs of its own host`,
		"qemu://user@/system":                `"qemu://user@/system": remote hosts are not supported`,
		"qemu:///embed":                      `"qemu:///embed": use qemu:///system or qemu:///session`,
		"qemu:///system/":                    `"qemu:///system/": use qemu:///system or qemu:///session`,
		"qemu:system":                        `"qemu:system": use qemu:///system or qemu:///session`,
		"qemu:///embed?socket=rel":           `"qemu:///embed?socket=rel": use qemu:///system or qemu:///session`,
		"qemu:///system?mode=legacy":         `"qemu:///system?mode=legacy": the only parameter supported is socket=/absolute/path`,
		"qemu:///system?socket=rel":          `"qemu:///system?socket=rel": the only parameter supported is socket=/absolute/path`,
		"qemu:///system?socket=":             `"qemu:///system?socket=": the only parameter supported is socket=/absolute/path`,
		"qemu:///system?socket=/a&socket=/b": `"qemu:///system?socket=/a&socket=/b": the only parameter supported is socket=/absolute/path`,
		"qemu:///system?socket=/a&x=1":       `"qemu:///system?socket=/a&x=1": the only parameter supported is socket=/absolute/path`,
		"qemu:///system?socket=/a;b":         `"qemu:///system?socket=/a;b": the only parameter supported is socket=/absolute/path`,
		":///system":                         `":///system": not a URI: missing protocol scheme`,
		"qemu://[::1/system":                 `"qemu://[::1/system": not a URI: `,
		"":                                   `"": use a local qemu URI`,
	} {
		_, err := libvirturi.Parse(uri)
		if err == nil || !strings.HasPrefix(err.Error(), want) {
			t.Errorf("%s: error %v, want it to start with %s", uri, err, want)
		}
	}
}

func TestSocket(t *testing.T) {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	ep := libvirturi.Endpoint{Sockets: []string{a, b}}
	if got := ep.Socket(); got != a {
		t.Errorf("none exists: %s, want the first, %s", got, a)
	}
	if err := os.WriteFile(b, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if got := ep.Socket(); got != b {
		t.Errorf("only the second exists: %s, want %s", got, b)
	}
	if got := (libvirturi.Endpoint{}).Socket(); got != "" {
		t.Errorf("no sockets: %q, want \"\"", got)
	}
}
