package flattener

import (
	"github.com/ceph/go-ceph/rados"

	"github.com/flattend/flattend/internal/rbdimage"
)

// RemoveIfUnusedPausing is RemoveIfUnused calling beforeUnprotect after its children check, just
// before it unprotects: the tests make a race happen there.
func RemoveIfUnusedPausing(conn *rados.Conn, s rbdimage.Spec, beforeUnprotect func()) (bool, string, error) {
	return removeIfUnused(conn, s, beforeUnprotect)
}
