package lock

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/ceph/go-ceph/rados"
)

// Queue entries. A waiter's omap key on the handover object is "q.<seq>.<client id>", both
// 20-digit decimals, so that keys sort by seq. The seq is not a node's clock: it is the version
// the OSD gave the handover object for the waiter's ticket write (see handover.ticket), which
// grows with every write to that object. So the order is the order in which the OSD saw the
// waiters arrive. (Keys of earlier builds, "w.<node's clock>.<id>", are not read.)
const (
	queuePrefix = "q."
	queueKeyLen = len(queuePrefix) + 20 + 1 + 20
	// maxEntryValue bounds a value flattend writes (a node name, a wake object, a time); anything
	// bigger was not written by flattend.
	maxEntryValue = 1024
	maxNodeName   = 253
	// queuePage is how many omap entries one read of the queue returns.
	queuePage = 64
)

// queueEntry is the value of a waiter's omap key: where to wake it, and who it is for people.
type queueEntry struct {
	Node  string    `json:"node,omitempty"`
	Wake  string    `json:"wake"`
	Since time.Time `json:"since,omitzero"` // the waiter's own clock: for people, never for order
}

// waiterEntry is a queue entry that a flattend could have written.
type waiterEntry struct {
	key     string
	seq, id uint64
	queueEntry
}

func queueKey(seq, id uint64) string { return fmt.Sprintf("%s%020d.%020d", queuePrefix, seq, id) }

// parseQueueKey returns the seq and client id of a queue key.
func parseQueueKey(key string) (seq, id uint64, ok bool) {
	if len(key) != queueKeyLen || !strings.HasPrefix(key, queuePrefix) || key[len(queuePrefix)+20] != '.' {
		return 0, 0, false
	}
	s, err1 := strconv.ParseUint(key[len(queuePrefix):len(queuePrefix)+20], 10, 64)
	i, err2 := strconv.ParseUint(key[len(queuePrefix)+21:], 10, 64)
	return s, i, err1 == nil && err2 == nil
}

// parseEntry checks one omap entry of the queue of image's slots: a well-formed key, a small
// value that decodes, a printable node name, and the wake object that node (or, unnamed, that
// client) watches. Anything else was not written by flattend: it is ignored, never notified.
func parseEntry(image, key string, value []byte) (waiterEntry, bool) {
	seq, id, ok := parseQueueKey(key)
	if !ok || len(value) > maxEntryValue {
		return waiterEntry{}, false
	}
	var e queueEntry
	if json.Unmarshal(value, &e) != nil || !printable(e.Node) {
		return waiterEntry{}, false
	}
	name := e.Node
	if name == "" {
		name = "client." + strconv.FormatUint(id, 10)
	}
	if e.Wake != WakeObject(image, name) {
		return waiterEntry{}, false
	}
	return waiterEntry{key: key, seq: seq, id: id, queueEntry: e}, true
}

func printable(s string) bool {
	if len(s) > maxNodeName || !utf8.ValidString(s) {
		return false
	}
	for _, r := range s {
		if unicode.IsControl(r) || !unicode.IsPrint(r) {
			return false
		}
	}
	return true
}

// opError returns the error of a whole operation as librados gave it (ENOENT for a missing
// object), not go-ceph's wrapper, which errors.Is cannot see through.
func opError(err error) error {
	var oe rados.OperationError
	if errors.As(err, &oe) && oe.OpError != nil {
		return oe.OpError
	}
	return err
}

// queueRead is what one read of the queue found.
type queueRead struct {
	entries []waiterEntry // the first valid entries, in queue order
	junk    []string      // keys under the queue's prefix that flattend did not write, met on the way
	queued  bool          // the key asked about is in the queue
}

// readQueue reads the queue on oid in pages until it has n valid entries (n <= 0: all of them),
// and says whether key (if not empty) is queued. Junk is skipped, however much of it there is.
func readQueue(ioctx *rados.IOContext, oid, image string, n int, key string) (queueRead, error) {
	var r queueRead
	after := ""
	for first := true; ; first = false {
		op := rados.CreateReadOp()
		page := op.GetOmapValues(after, queuePrefix, queuePage)
		var mine *rados.ReadOpOmapGetValsByKeysStep
		if first && key != "" {
			mine = op.GetOmapValuesByKeys([]string{key})
		}
		err := opError(op.Operate(ioctx, oid, rados.OperationNoFlag))
		if err == nil && mine != nil {
			var kv *rados.OmapKeyValue
			kv, err = mine.Next()
			r.queued = kv != nil
		}
		got := 0
		for err == nil {
			var kv *rados.OmapKeyValue
			if kv, err = page.Next(); kv == nil {
				break
			}
			got++
			after = kv.Key
			if e, ok := parseEntry(image, kv.Key, kv.Value); ok {
				r.entries = append(r.entries, e)
			} else {
				r.junk = append(r.junk, kv.Key)
			}
		}
		op.Release()
		if err != nil {
			return queueRead{}, err
		}
		if got < queuePage || (n > 0 && len(r.entries) >= n) {
			if n > 0 && len(r.entries) > n {
				r.entries = r.entries[:n]
			}
			return r, nil
		}
	}
}

// ValidNode reports whether name can be a node's key in the objects beside the lock: printable
// UTF-8 of at most 253 bytes, not empty.
func ValidNode(name string) bool { return name != "" && printable(name) }
