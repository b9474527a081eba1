package flattener

import (
	"strconv"
	"strings"

	"github.com/flattend/flattend/internal/librbd"
)

// CephVersion is the version of the Ceph libraries this process runs with, as libceph-common
// reports it ("16.2.15"), or "" if it cannot tell. It is read at run time: the librbd a binary
// runs with may be newer than the one it was built against.
func CephVersion() string { return librbd.CephVersion() }

// CopyupFixed reports whether librbd of Ceph version v flattens safely a clone whose object map
// says an object exists that RADOS lacks (the state an interrupted flatten leaves). Ceph tracker
// 68998: fixed by PR 61129 in 20.x (Tentacle), backported by PR 61168 to Squid 19.2.1 and by
// PR 61167 to Reef 18.2.5 (both merged in January 2025, before those releases); never to Quincy
// (17) or Pacific (16). An unknown or unparsable version counts as not fixed: verifying costs
// time, trusting a broken librbd costs data.
func CopyupFixed(v string) bool {
	major, minor, patch, ok := parseVersion(v)
	switch {
	case !ok:
		return false
	case major >= 20:
		return true
	case major == 19:
		return minor == 2 && patch >= 1 // 19.3.x are pre-Tentacle development builds
	case major == 18:
		return minor == 2 && patch >= 5
	}
	return false
}

// parseVersion reads "major.minor.patch", ignoring anything after the patch number
// ("18.2.7-1~bpo12+1", "19.2.1-123-gabcdef").
func parseVersion(v string) (major, minor, patch int, ok bool) {
	parts := strings.SplitN(v, ".", 3)
	if len(parts) != 3 {
		return 0, 0, 0, false
	}
	end := strings.IndexFunc(parts[2], func(r rune) bool { return r < '0' || r > '9' })
	if end >= 0 {
		parts[2] = parts[2][:end]
	}
	var nums [3]int
	for i, p := range parts {
		n, err := strconv.Atoi(p)
		if err != nil || n < 0 {
			return 0, 0, 0, false
		}
		nums[i] = n
	}
	return nums[0], nums[1], nums[2], true
}
