package e2e

import (
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/flattend/flattend/internal/flattener"
)

// releases is the expectation per Ceph release of the test matrix: its major version and whether
// flattend's lost-copy-up verification is on with it. Reef and Squid are fixed from 18.2.5 and
// 19.2.1 (Ceph tracker 68998): the matrix's Reef is Debian trixie's 18.2.7.
var releases = map[string]struct {
	major    int
	verifyOn bool
}{
	"pacific":  {16, true},
	"quincy":   {17, true},
	"reef":     {18, false},
	"squid":    {19, false},
	"tentacle": {20, false},
}

var cephLine = regexp.MustCompile(`(?m)^librbd: Ceph (\S+) `)

// `flattend version` and `--version` name the Ceph the binary runs with (the same libraries this
// test process loaded) and say the verification is on exactly where that librbd lacks the fix;
// and on the release the suite was told it runs on (FLATTEND_TEST_CEPH_RELEASE, set by the
// Makefile and test/release.sh), that is the release's expected value.
func TestVersionReportsLibrbdAndWorkarounds(t *testing.T) {
	loaded := flattener.CephVersion()
	for _, arg := range []string{"version", "--version"} {
		code, out := runCmd(t, 30*time.Second, arg)
		if code != 0 {
			t.Fatalf("%s: exit %d\n%s", arg, code, out)
		}
		m := cephLine.FindStringSubmatch(out)
		if m == nil || m[1] != loaded {
			t.Fatalf("%s: want a line 'librbd: Ceph %s (…)'\n%s", arg, loaded, out)
		}
		on := verificationOn(t, out)
		if want := !flattener.CopyupFixed(loaded); on != want {
			t.Errorf("%s with Ceph %s: verification on = %v, want %v\n%s", arg, loaded, on, want, out)
		}
		release := os.Getenv("FLATTEND_TEST_CEPH_RELEASE")
		if release == "" {
			t.Logf("FLATTEND_TEST_CEPH_RELEASE unset (make sets it): release expectations not checked")
			continue
		}
		exp, ok := releases[release]
		if !ok {
			t.Fatalf("FLATTEND_TEST_CEPH_RELEASE=%q: not a release of the matrix", release)
		}
		if major, _ := strconv.Atoi(strings.SplitN(loaded, ".", 2)[0]); major != exp.major {
			t.Errorf("told the suite runs on %s (Ceph %d), but the loaded libraries are Ceph %s", release, exp.major, loaded)
		}
		if on != exp.verifyOn {
			t.Errorf("%s on %s (Ceph %s): verification on = %v, want %v\n%s", arg, release, loaded, on, exp.verifyOn, out)
		}
	}
}

func verificationOn(t *testing.T, out string) bool {
	t.Helper()
	for _, line := range strings.Split(out, "\n") {
		if !strings.HasPrefix(line, "workaround: lost-copy-up verification") {
			continue
		}
		switch {
		case strings.Contains(line, "): on:"):
			return true
		case strings.Contains(line, "): off:"):
			return false
		}
	}
	t.Fatalf("no 'workaround: lost-copy-up verification … on|off' line in\n%s", out)
	return false
}
