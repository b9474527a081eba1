package fleet

import (
	"errors"
	"fmt"

	"github.com/ceph/go-ceph/rados"

	"github.com/flattend/flattend/internal/cephconn"
)

// Object is the RADOS object, in the lock's pool beside the lock images, whose omap holds one
// summary per node (keyed by node name).
func Object(lockImage string) string { return lockImage + ".nodes" }

const (
	// page is how many entries one omap read returns.
	page = 256
	// maxEntries bounds how many entries a reader looks at, junk included: far more than a
	// fleet (the design bound is 1,000 nodes), few enough to read in seconds.
	maxEntries = 20000
)

// Write stores node's summary: one omap set on the nodes object (which it creates if missing),
// no read. Only node writes its own key, so writers never race.
func Write(conn *rados.Conn, pool, lockImage, node string, e Entry) error {
	b, err := Encode(e)
	if err != nil {
		return err
	}
	ioctx, err := cephconn.OpenPool(conn, pool)
	if err != nil {
		return err
	}
	defer ioctx.Destroy()
	op := rados.CreateWriteOp()
	defer op.Release()
	op.SetOmap(map[string][]byte{node: b})
	if err := op.Operate(ioctx, Object(lockImage), rados.OperationNoFlag); err != nil {
		return fmt.Errorf("writing this node's summary on %s/%s: %w", pool, Object(lockImage), cephconn.WithHint(err))
	}
	return nil
}

// Node is one node's summary as read.
type Node struct {
	Name string
	Entry
}

// Junk is an entry of the nodes object that flattend did not write, and why it is ignored.
type Junk struct {
	Key    string
	Reason string
}

// Read returns every node's summary, in key order, and the entries it ignored. A missing object
// is an empty fleet. Truncated is set when the object holds more than maxEntries entries.
func Read(conn *rados.Conn, pool, lockImage string) (nodes []Node, junk []Junk, truncated bool, err error) {
	ioctx, err := cephconn.OpenPool(conn, pool)
	if err != nil {
		return nil, nil, false, err
	}
	defer ioctx.Destroy()
	oid := Object(lockImage)
	after := ""
	for seen := 0; ; {
		if seen >= maxEntries {
			return nodes, junk, true, nil
		}
		op := rados.CreateReadOp()
		step := op.GetOmapValues(after, "", page)
		err := op.Operate(ioctx, oid, rados.OperationNoFlag)
		more := false
		for err == nil {
			var kv *rados.OmapKeyValue
			if kv, err = step.Next(); err != nil || kv == nil {
				break
			}
			seen++
			after = kv.Key
			if e, derr := Decode(kv.Key, kv.Value); derr != nil {
				junk = append(junk, Junk{Key: kv.Key, Reason: derr.Error()})
			} else {
				nodes = append(nodes, Node{Name: kv.Key, Entry: e})
			}
		}
		if err == nil {
			more = step.More()
		}
		op.Release()
		var oe rados.OperationError
		if errors.As(err, &oe) && oe.OpError != nil {
			err = oe.OpError
		}
		switch {
		case errors.Is(err, rados.ErrNotFound):
			return nil, nil, false, nil
		case err != nil:
			return nil, nil, false, fmt.Errorf("reading the node summaries on %s/%s: %w", pool, oid, cephconn.WithHint(err))
		case !more:
			return nodes, junk, false, nil
		}
	}
}
