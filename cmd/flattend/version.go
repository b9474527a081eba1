package main

import (
	"fmt"
	"io"
	"runtime"
	"runtime/debug"

	"github.com/ceph/go-ceph/rbd"

	"github.com/flattend/flattend/internal/flattener"
)

// version is set at build time (-ldflags "-X main.version=…"; the Makefile uses git describe).
var version = "dev"

// printVersion prints flattend's version and commit, the Ceph libraries it runs with (read at
// run time: they may be newer than the ones it was built against) and the release-specific
// workarounds that are on with them.
func printVersion(w io.Writer) int {
	commit := revision()
	ceph := flattener.CephVersion()
	if ceph == "" {
		ceph = "unknown"
	}
	major, minor, extra := rbd.Version()
	fmt.Fprintf(w, "flattend %s (commit %s, %s)\n", version, commit, runtime.Version())
	fmt.Fprintf(w, "librbd: Ceph %s (librbd API %d.%d.%d)\n", ceph, major, minor, extra)
	verify := "off: this librbd has the fix of Ceph tracker 68998 (flatten.verify_copyups: always turns it on)"
	if !flattener.CopyupFixed(ceph) {
		verify = "on: this librbd lacks the fix of Ceph tracker 68998"
	}
	fmt.Fprintf(w, "workaround: lost-copy-up verification before each flatten (flatten.verify_copyups: auto): %s\n", verify)
	return exitOK
}

// revision is the commit the binary was built from ("-dirty" with local changes), "unknown" when
// the build recorded none.
func revision() string {
	commit, dirty := "unknown", ""
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			switch {
			case s.Key == "vcs.revision":
				commit = s.Value
			case s.Key == "vcs.modified" && s.Value == "true":
				dirty = "-dirty"
			}
		}
	}
	return commit + dirty
}
