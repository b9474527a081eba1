package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/flattend/flattend/test/cephtest"
)

// journalLines runs flattend with stderr on a pipe and JOURNAL_STREAM naming that pipe (as
// systemd does for StandardError=journal) when asJournal, or naming another file when not, and
// returns its stderr lines.
func journalLines(t *testing.T, asJournal bool, args ...string) []string {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	named := w
	if !asJournal {
		if named, err = os.CreateTemp(t.TempDir(), "other"); err != nil {
			t.Fatal(err)
		}
		defer named.Close()
	}
	cmd := journaled(t, w, named, args...)
	w.Close()
	var lines []string
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		lines = append(lines, sc.Text())
	}
	_ = cmd.Wait()
	return lines
}

// journaled starts flattend with stderr on f and JOURNAL_STREAM naming named's device and inode.
func journaled(t *testing.T, f, named *os.File, args ...string) *exec.Cmd {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Fstat(int(named.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(binary, args...)
	cmd.Env = append(os.Environ(), fmt.Sprintf("JOURNAL_STREAM=%d:%d", st.Dev, st.Ino))
	cmd.Stderr = f // an *os.File: the child's fd 2 is this very file
	dieWithTest(cmd)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	return cmd
}

// journalConfigs make a node with one clone to flatten and two console-format configs for it:
// conf logs at debug, info and warn (a config warning: the pattern matches Glance's "snap"); down
// names an unreachable cluster, and logs an error.
func journalConfigs(t *testing.T) (node, conf, down string) {
	t.Helper()
	conn := cephtest.Connect(t)
	ioctx := cephtest.IOContext(t, conn)
	p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 4<<20, 22)
	node = cephtest.Name(t, "n")
	cephtest.Clone(t, ioctx, p, node+"-c", node)
	conf = nodeConfig(t, node, cephtest.Name(t, "lock"), "log: {level: debug, format: console}\n"+
		"cleanup: {parent_snapshots: true, snapshot_pattern: \"^snap$\"}")
	unreachable := filepath.Join(t.TempDir(), "ceph.conf")
	if err := os.WriteFile(unreachable, []byte("[global]\nmon host = 127.0.0.1:1\nauth_client_required = none\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	down = nodeConfig(t, node, cephtest.Name(t, "lock"), "log: {level: debug, format: console}\n"+
		fmt.Sprintf("ceph: {conf: %s, user: admin, connect_timeout: 2s}", unreachable))
	return node, conf, down
}

// Under journald each log line starts with sd-daemon's priority prefix and carries no timestamp
// of its own, so `journalctl -p warning` shows warnings and errors only; with stderr elsewhere
// (JOURNAL_STREAM naming another file) the lines are as before.
func TestJournalPriorities(t *testing.T) {
	_, conf, down := journalConfigs(t)

	prefixed := regexp.MustCompile(`^<([0-7])>(DEBUG|INFO|WARN|ERROR)\t`)
	want := map[string]string{"DEBUG": "7", "INFO": "6", "WARN": "4", "ERROR": "3"}
	seen := map[string]bool{}
	lines := append(journalLines(t, true, "once", "--config", conf), journalLines(t, true, "once", "--config", down)...)
	for _, l := range lines {
		m := prefixed.FindStringSubmatch(l)
		if m == nil {
			t.Errorf("journal line without a <N>LEVEL prefix: %q", l)
			continue
		}
		if want[m[2]] != m[1] {
			t.Errorf("%s line with priority <%s>, want <%s>: %q", m[2], m[1], want[m[2]], l)
		}
		if regexp.MustCompile(`\d{4}-\d\d-\d\dT\d\d:\d\d`).MatchString(strings.SplitN(l, "\t", 3)[1]) {
			t.Errorf("journal line with a timestamp: %q", l)
		}
		seen[m[2]] = true
	}
	for level := range want {
		if !seen[level] {
			t.Errorf("no %s line among:\n%s", level, strings.Join(lines, "\n"))
		}
	}

	// Not the journal: timestamped lines, no prefix.
	plain := regexp.MustCompile(`^\d{4}-\d\d-\d\dT[0-9:.]+Z\t(DEBUG|INFO|WARN|ERROR)\t`)
	other := journalLines(t, false, "once", "--config", down)
	if len(other) == 0 {
		t.Fatal("no log lines without the journal")
	}
	for _, l := range other {
		if !plain.MatchString(l) {
			t.Errorf("line changed although stderr is not the journal: %q", l)
		}
	}
}

// journald runs a private systemd-journald: in a mount namespace of its own, over tmpfs, so
// that the host's journal (if any) is left alone. It returns the path of its stdout stream
// socket and of its journal directory, both reached through /proc/PID/root.
func journald(t *testing.T) (stdoutSocket, dir string) {
	t.Helper()
	bin := "/lib/systemd/systemd-journald"
	for _, p := range []string{bin, "/usr/bin/journalctl", "/usr/bin/unshare"} {
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("%s: %v (install the systemd and util-linux packages: make deps)", p, err)
		}
	}
	script := `set -e
mkdir -p /run/systemd /run/log
mount -t tmpfs none /run/systemd
mount -t tmpfs none /run/log
if [ -d /var/log/journal ]; then mount -t tmpfs none /var/log/journal; fi
exec ` + bin
	cmd := exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-c", script)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	root := fmt.Sprintf("/proc/%d/root", cmd.Process.Pid)
	stdoutSocket, dir = root+"/run/systemd/journal/stdout", root+"/run/log/journal"
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(50 * time.Millisecond) {
		if _, err := os.Stat(stdoutSocket); err == nil {
			return stdoutSocket, dir
		}
		if time.Now().After(deadline) || cmd.ProcessState != nil {
			t.Fatalf("systemd-journald did not open %s:\n%s", stdoutSocket, out.String())
		}
	}
}

// The real thing: flattend's stderr is a journald stdout stream, as systemd connects it for a
// service (SyslogLevelPrefix=yes), and JOURNAL_STREAM names it. journald stores each line with
// the priority of its level, without the prefix, and `journalctl -p warning` keeps warnings and
// errors only.
func TestJournaldStoresPriorities(t *testing.T) {
	node, conf, down := journalConfigs(t)

	sock, dir := journald(t)
	ident := node // SYSLOG_IDENTIFIER of this test's entries
	for _, c := range []string{conf, down} {
		conn, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		// sd_journal_stream_fd's header: identifier, unit, priority, level prefix, forwards.
		if _, err := conn.Write([]byte(ident + "\n\n6\n1\n0\n0\n0\n")); err != nil {
			t.Fatal(err)
		}
		f, err := conn.(*net.UnixConn).File()
		conn.Close()
		if err != nil {
			t.Fatal(err)
		}
		_ = journaled(t, f, f, "once", "--config", c).Wait()
		f.Close()
	}

	type entry struct{ Priority, Message string }
	read := func(args ...string) []entry {
		t.Helper()
		var es []entry
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
			out, err := exec.Command("journalctl", append([]string{"--directory", dir, "-t", ident, "-o", "json", "--no-pager"}, args...)...).Output()
			if err != nil {
				t.Fatalf("journalctl: %v", err)
			}
			es = nil
			for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
				var e struct {
					Priority string `json:"PRIORITY"`
					Message  string `json:"MESSAGE"`
				}
				if l != "" && json.Unmarshal([]byte(l), &e) == nil {
					es = append(es, entry{e.Priority, e.Message})
				}
			}
			// The last line of the second run ends the story: journald has both streams then.
			if slices.ContainsFunc(es, func(e entry) bool { return strings.Contains(e.Message, "cannot start") }) || time.Now().After(deadline) {
				return es
			}
		}
	}
	want := map[string]string{"DEBUG": "7", "INFO": "6", "WARN": "4", "ERROR": "3"}
	all := read()
	seen := map[string]bool{}
	for _, e := range all {
		level, _, _ := strings.Cut(e.Message, "\t")
		if want[level] != e.Priority {
			t.Errorf("journal entry at priority %s, want %s: %q", e.Priority, want[level], e.Message)
		}
		if strings.HasPrefix(e.Message, "<") || regexp.MustCompile(`^\d{4}-\d\d-\d\dT`).MatchString(e.Message) {
			t.Errorf("journal entry with a prefix or a timestamp of flattend's: %q", e.Message)
		}
		seen[level] = true
	}
	for level := range want {
		if !seen[level] {
			t.Errorf("no %s entry in the journal: %q", level, all)
		}
	}
	warnings := read("-p", "warning")
	levels := map[string]bool{}
	for _, e := range warnings {
		level, _, _ := strings.Cut(e.Message, "\t")
		levels[level] = true
		if e.Priority != "4" && e.Priority != "3" {
			t.Errorf("journalctl -p warning shows %q at priority %s", e.Message, e.Priority)
		}
	}
	if !levels["WARN"] || !levels["ERROR"] {
		t.Errorf("journalctl -p warning lacks the warning or the error: %q", warnings)
	}
}
