// Package libvirturi is the one place that knows which libvirt URIs flattend accepts and where
// they lead: the local QEMU drivers as virsh spells them (qemu:///system, qemu:///session, also
// as qemu+unix://), optionally with ?socket=/absolute/path. Pure Go: config validates with it,
// discovery dials with it.
package libvirturi

import (
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
)

// Default is the URI of the system QEMU driver, where a hypervisor's VMs live.
const Default = "qemu:///system"

// Endpoint is where a libvirt URI leads: the unix socket to dial (the first of Sockets that
// exists, see Socket) and the URI to open once connected.
type Endpoint struct {
	Sockets []string
	Open    string // "qemu:///system" or "qemu:///session", without the socket parameter
}

// systemSockets are tried in order for qemu:///system: the read-only socket first (flattend only
// reads; any local user may use it), of libvirtd or, failing that, of the modular virtqemud; then
// their read-write sockets.
var systemSockets = []string{
	"/run/libvirt/libvirt-sock-ro",
	"/run/libvirt/virtqemud-sock-ro",
	"/run/libvirt/libvirt-sock",
	"/run/libvirt/virtqemud-sock",
}

// Parse checks uri and resolves it as virsh does. Without a socket parameter, system URIs go to
// systemSockets, session URIs to $XDG_RUNTIME_DIR/libvirt (~/.cache/libvirt without
// XDG_RUNTIME_DIR). Errors start with the quoted URI and read well after a field name, e.g.
// `discovery.libvirt.uri: "qemu+ssh://h/system": remote hosts are not supported: …`.
func Parse(uri string) (Endpoint, error) {
	u, err := url.Parse(uri)
	if err != nil {
		var uerr *url.Error
		if errors.As(err, &uerr) {
			err = uerr.Err // url.Error repeats the URI
		}
		return Endpoint{}, fmt.Errorf("%q: not a URI: %w", uri, err)
	}
	if msg := problem(u); msg != "" {
		return Endpoint{}, fmt.Errorf("%q: %s", uri, msg)
	}
	ep := Endpoint{Open: "qemu://" + u.Path}
	if socket := u.Query().Get("socket"); socket != "" {
		ep.Sockets = []string{socket}
	} else if u.Path == "/system" {
		ep.Sockets = append([]string(nil), systemSockets...)
	} else {
		ep.Sockets = sessionSockets()
	}
	return ep, nil
}

// problem says what is wrong with u, or "" if nothing is.
func problem(u *url.URL) string {
	switch {
	case u.Scheme != "qemu" && u.Scheme != "qemu+unix":
		return "use a local qemu URI: qemu:///system or qemu:///session, optionally with ?socket=PATH"
	case u.Host != "" || u.User != nil:
		return "remote hosts are not supported: flattend reads the VMs of its own host"
	case u.Path != "/system" && u.Path != "/session":
		return "use qemu:///system or qemu:///session"
	}
	q, err := url.ParseQuery(u.RawQuery) // u.Query() would drop a "socket=/a;b" silently
	if err != nil {
		return "the only parameter supported is socket=/absolute/path"
	}
	for k, v := range q {
		if k != "socket" || len(v) != 1 || !strings.HasPrefix(v[0], "/") {
			return "the only parameter supported is socket=/absolute/path"
		}
	}
	return ""
}

// sessionSockets are the sockets of this user's session daemon: libvirtd's, then virtqemud's.
func sessionSockets() []string {
	dir := os.Getenv("XDG_RUNTIME_DIR")
	if dir == "" {
		home, _ := os.UserHomeDir()
		dir = filepath.Join(home, ".cache")
	}
	return []string{filepath.Join(dir, "libvirt", "libvirt-sock"), filepath.Join(dir, "libvirt", "virtqemud-sock")}
}

// Socket is the first of e's sockets that exists, or the first one when none does (dialing it
// then fails with a message that names it); "" for an Endpoint without sockets.
func (e Endpoint) Socket() string {
	for _, s := range e.Sockets {
		if _, err := os.Stat(s); err == nil {
			return s
		}
	}
	if len(e.Sockets) == 0 {
		return ""
	}
	return e.Sockets[0]
}
