// Package netlab builds a private network of network namespaces for the tests that need real
// partitions: a bridge in a namespace of its own, and one namespace per host (the Ceph cluster,
// each simulated hypervisor) on a /24 that exists only inside them. Cutting a host's link is a
// real partition: its packets vanish (timeouts, not refusals), as when a switch port dies.
package netlab

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// Lab is one such network. It is JSON so that a process started inside it can drive it too
// (Attach).
type Lab struct {
	t      testing.TB
	Prefix string            // namespace names start with it
	Subnet string            // "10.a.b."
	Bridge string            // the bridge's namespace
	NS     map[string]string // host → namespace
	IP     map[string]string // host → address
}

// Available says why network namespaces cannot be made here ("" if they can): they need root and
// iproute2.
func Available() string {
	if os.Geteuid() != 0 {
		return "not root"
	}
	if out, err := exec.Command("ip", "netns", "list").CombinedOutput(); err != nil {
		return fmt.Sprintf("ip netns list: %v %s", err, out)
	}
	return ""
}

// New makes a lab with hosts and removes it (killing whatever still runs inside) when t ends.
func New(t testing.TB, hosts ...string) *Lab {
	t.Helper()
	id := rand.N(1 << 16)
	l := &Lab{t: t, Prefix: fmt.Sprintf("fl%04x-", id), Subnet: fmt.Sprintf("10.%d.%d.", 200+id%50, id%250),
		NS: map[string]string{}, IP: map[string]string{}}
	l.Bridge = l.Prefix + "br"
	t.Cleanup(l.destroy)
	l.Run("ip", "netns", "add", l.Bridge)
	l.Run("ip", "-n", l.Bridge, "link", "add", "br0", "type", "bridge")
	l.Run("ip", "-n", l.Bridge, "link", "set", "br0", "up")
	for i, h := range hosts {
		ns := l.Prefix + h
		l.NS[h], l.IP[h] = ns, fmt.Sprintf("%s%d", l.Subnet, i+1)
		l.Run("ip", "netns", "add", ns)
		l.Run("ip", "-n", l.Bridge, "link", "add", "v-"+h, "type", "veth", "peer", "name", "e0", "netns", ns)
		l.Run("ip", "-n", l.Bridge, "link", "set", "v-"+h, "master", "br0", "up")
		l.Run("ip", "-n", ns, "addr", "add", l.IP[h]+"/24", "dev", "e0")
		l.Run("ip", "-n", ns, "link", "set", "e0", "up")
		l.Run("ip", "-n", ns, "link", "set", "lo", "up")
	}
	return l
}

// Encode is the lab as Attach reads it.
func (l *Lab) Encode() string {
	b, _ := json.Marshal(l)
	return string(b)
}

// Attach returns the lab that Encode described, for a process running inside it; the lab stays
// the creator's to remove.
func Attach(t testing.TB, encoded string) *Lab {
	t.Helper()
	l := &Lab{t: t}
	if err := json.Unmarshal([]byte(encoded), l); err != nil {
		t.Fatalf("netlab.Attach: %v", err)
	}
	return l
}

// Run runs a command (ip …) and fails the test if it fails.
func (l *Lab) Run(args ...string) string {
	l.t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		l.t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// In returns a command that runs inside host's namespace. `ip netns exec` execs it in place, so
// the command's process is the one started (signals reach it directly).
func (l *Lab) In(host string, env []string, args ...string) *exec.Cmd {
	cmd := exec.Command("ip", append([]string{"netns", "exec", l.NS[host]}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	return cmd
}

// Cut takes host's link down; Heal brings it back.
func (l *Lab) Cut(host string)  { l.Run("ip", "-n", l.Bridge, "link", "set", "v-"+host, "down") }
func (l *Lab) Heal(host string) { l.Run("ip", "-n", l.Bridge, "link", "set", "v-"+host, "up") }

// Pids lists the processes still running in host's namespace.
func (l *Lab) Pids(host string) []string {
	out, err := exec.Command("ip", "netns", "pids", l.NS[host]).Output()
	if err != nil {
		return nil
	}
	return strings.Fields(string(out))
}

func (l *Lab) destroy() {
	nss := []string{l.Bridge}
	for _, ns := range l.NS {
		nss = append(nss, ns)
	}
	for _, ns := range nss {
		if pids, err := exec.Command("ip", "netns", "pids", ns).Output(); err == nil {
			for _, pid := range strings.Fields(string(pids)) {
				_ = exec.Command("kill", "-9", pid).Run()
			}
		}
		_ = exec.Command("ip", "netns", "del", ns).Run()
	}
}
