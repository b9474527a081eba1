// Package libvirttest starts a libvirtd of a test's own: a session-mode daemon (qemu:///session)
// with HOME and XDG dirs under a temporary directory, run as an unprivileged user (nobody when the
// tests run as root), so it touches nothing of the machine's libvirt. Domains are defined with
// virsh and never started. Like cephtest, a test skips only when it is not told about a test
// cluster (FLATTEND_TEST_CEPH_CONF unset); a missing libvirtd fails it (`make deps` installs
// libvirt-daemon, libvirt-daemon-driver-qemu, libvirt-daemon-driver-storage-rbd, libvirt-clients and
// qemu-system-x86).
package libvirttest

import (
	"encoding/xml"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/flattend/flattend/test/cephtest"
)

// Daemon is a running libvirtd of the test's own.
type Daemon struct {
	// URI reaches it: qemu:///session?socket=PATH.
	URI    string
	Socket string
	dir    string
	cmd    *exec.Cmd
	done   chan struct{}
}

// Start starts a libvirtd, stopped (by its PID) and removed when the test ends.
func Start(t testing.TB) *Daemon {
	t.Helper()
	cephtest.ConfPath(t) // skips without a test cluster, as every integration test does
	bin, err := exec.LookPath("libvirtd")
	if err != nil {
		bin = "/usr/sbin/libvirtd"
		if _, serr := os.Stat(bin); serr != nil {
			t.Fatal("libvirtd not found: run `make deps` (installs libvirt-daemon, libvirt-daemon-driver-qemu, libvirt-daemon-driver-storage-rbd, libvirt-clients, qemu-system-x86)")
		}
	}
	if _, err := exec.LookPath("virsh"); err != nil {
		t.Fatal("virsh not found: run `make deps` (installs libvirt-clients)")
	}
	dir, err := os.MkdirTemp("", "flattend-libvirtd-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	d := &Daemon{dir: dir, Socket: filepath.Join(dir, "run", "libvirt", "libvirt-sock"), done: make(chan struct{})}
	d.URI = "qemu:///session?socket=" + d.Socket
	var cred *syscall.Credential
	if os.Geteuid() == 0 {
		// A root libvirtd is the system daemon and wants the libvirt-qemu user: run the session
		// daemon as nobody instead. Its directories must be its own.
		cred = &syscall.Credential{Uid: 65534, Gid: 65534}
	}
	for _, sub := range []string{"", "home", "run", "config", "cache"} {
		p := filepath.Join(dir, sub)
		if err := os.MkdirAll(p, 0o755); err != nil {
			t.Fatal(err)
		}
		if cred != nil {
			if err := os.Chown(p, int(cred.Uid), int(cred.Gid)); err != nil {
				t.Fatal(err)
			}
		}
	}
	logf, err := os.Create(filepath.Join(dir, "libvirtd.log"))
	if err != nil {
		t.Fatal(err)
	}
	d.cmd = exec.Command(bin)
	d.cmd.Dir = dir
	d.cmd.Env = []string{"HOME=" + filepath.Join(dir, "home"), "XDG_RUNTIME_DIR=" + filepath.Join(dir, "run"),
		"XDG_CONFIG_HOME=" + filepath.Join(dir, "config"), "XDG_CACHE_HOME=" + filepath.Join(dir, "cache"),
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C"}
	d.cmd.Stdout, d.cmd.Stderr = logf, logf
	// Pdeathsig: a test binary that crashes runs no cleanup; libvirtd must not outlive it.
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred, Pdeathsig: syscall.SIGKILL}
	if err := d.cmd.Start(); err != nil {
		t.Fatalf("starting libvirtd: %v", err)
	}
	go func() { _ = d.cmd.Wait(); logf.Close(); close(d.done) }()
	t.Cleanup(d.stop)
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, err := exec.Command("virsh", "-c", d.URI, "uri").CombinedOutput()
		if err == nil {
			break
		}
		select {
		case <-d.done:
			b, _ := os.ReadFile(logf.Name())
			t.Fatalf("libvirtd exited at start:\n%s", b)
		default:
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(logf.Name())
			t.Fatalf("libvirtd not answering after 30 s: %v %s\nlog:\n%s", err, out, b)
		}
		time.Sleep(200 * time.Millisecond)
	}
	return d
}

// stop ends the daemon: SIGTERM, then SIGKILL after 10 s.
func (d *Daemon) stop() {
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
	case <-time.After(10 * time.Second):
		_ = d.cmd.Process.Kill()
		<-d.done
	}
}

// Virsh runs virsh against the daemon and returns its output, failing the test on an error.
func (d *Daemon) Virsh(t testing.TB, args ...string) string {
	t.Helper()
	out, err := exec.Command("virsh", append([]string{"-c", d.URI}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("virsh %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// Define defines (does not start) a QEMU domain whose disks vda, vdb … are the RBD images
// given as "pool/image" or "pool/namespace/image".
func (d *Daemon) Define(t testing.TB, name string, disks ...string) {
	t.Helper()
	var xml []string
	for i, disk := range disks {
		xml = append(xml, RBDDisk(fmt.Sprintf("vd%c", 'a'+i), disk, "disk", ""))
	}
	d.DefineDisks(t, name, xml...)
}

// RBDDisk is the XML of an RBD network disk: device is disk, cdrom …; extra goes inside the
// <disk> element (e.g. "<readonly/>"). The name is escaped as XML text. A target dev sdX is on
// the SATA bus (a cdrom must be), any other on virtio.
func RBDDisk(dev, rbdName, device, extra string) string {
	bus := "virtio"
	if strings.HasPrefix(dev, "sd") {
		bus = "sata"
	}
	var name strings.Builder
	_ = xml.EscapeText(&name, []byte(rbdName))
	return fmt.Sprintf("    <disk type='network' device='%s'>\n      <driver name='qemu' type='raw'/>\n"+
		"      <source protocol='rbd' name='%s'/>\n      <target dev='%s' bus='%s'/>%s\n    </disk>\n",
		device, name.String(), dev, bus, extra)
}

// DefineDisks defines (does not start) a QEMU domain with the given <disk> elements.
func (d *Daemon) DefineDisks(t testing.TB, name string, disks ...string) {
	t.Helper()
	if err := d.TryDefineDisks(t, name, disks...); err != nil {
		t.Fatal(err)
	}
}

// TryDefineDisks is DefineDisks for a domain libvirtd may refuse: newer libvirt validates more at
// define time (12.x refuses an RBD name "pool//image" that 9.x and 11.x keep). It returns virsh's
// error; it goes with the daemon when the test ends.
func (d *Daemon) TryDefineDisks(t testing.TB, name string, disks ...string) error {
	t.Helper()
	var b strings.Builder
	fmt.Fprintf(&b, "<domain type='qemu'>\n  <name>%s</name>\n  <memory unit='MiB'>64</memory>\n", name)
	b.WriteString("  <os><type arch='x86_64'>hvm</type></os>\n  <devices>\n")
	for _, disk := range disks {
		b.WriteString(disk)
	}
	b.WriteString("  </devices>\n</domain>\n")
	p := filepath.Join(d.dir, name+".xml")
	if err := os.WriteFile(p, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("virsh", "-c", d.URI, "define", p).CombinedOutput()
	if err != nil {
		return fmt.Errorf("virsh define %s: %v\n%s", p, err, out)
	}
	return nil
}
