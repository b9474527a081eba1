package e2e

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

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
	var st unix.Stat_t
	if err := unix.Fstat(int(named.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(binary, args...)
	cmd.Env = append(os.Environ(), fmt.Sprintf("JOURNAL_STREAM=%d:%d", st.Dev, st.Ino))
	cmd.Stderr = w // an *os.File: the child's fd 2 is this very pipe
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	var lines []string
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		lines = append(lines, sc.Text())
	}
	_ = cmd.Wait()
	return lines
}

// Under journald each log line starts with sd-daemon's priority prefix and carries no timestamp
// of its own, so `journalctl -p warning` shows warnings and errors only; with stderr elsewhere
// (JOURNAL_STREAM naming another file) the lines are as before.
func TestJournalPriorities(t *testing.T) {
	conn := cephtest.Connect(t)
	ioctx := cephtest.IOContext(t, conn)
	p := cephtest.MakeParent(t, ioctx, cephtest.Name(t, "parent"), 4<<20, 22)
	node := cephtest.Name(t, "n")
	cephtest.Clone(t, ioctx, p, node+"-c", node)
	// A config warning (the pattern matches Glance's "snap") logs at warn; the pass at info and debug.
	conf := nodeConfig(t, node, cephtest.Name(t, "lock"), "log: {level: debug, format: console}\n"+
		"cleanup: {parent_snapshots: true, snapshot_pattern: \"^snap$\"}")
	unreachable := filepath.Join(t.TempDir(), "ceph.conf")
	if err := os.WriteFile(unreachable, []byte("[global]\nmon host = 127.0.0.1:1\nauth_client_required = none\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	down := nodeConfig(t, node, cephtest.Name(t, "lock"), "log: {level: debug, format: console}\n"+
		fmt.Sprintf("ceph: {conf: %s, user: admin, connect_timeout: 2s}", unreachable))

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
