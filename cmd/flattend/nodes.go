package main

import (
	"fmt"
	"io"
	"time"

	"github.com/ceph/go-ceph/rados"

	"github.com/flattend/flattend/internal/config"
	"github.com/flattend/flattend/internal/fleet"
)

// showNodes is `flattend status --nodes`: every node's summary, from the object beside the lock.
func showNodes(cfg *config.Config, dial func() (*rados.Conn, error), asJSON bool, stdout, stderr io.Writer) int {
	conn, err := dial()
	if err != nil {
		fmt.Fprintln(stderr, err)
		return exitCode(err)
	}
	defer conn.Shutdown()
	nodes, junk, truncated, err := fleet.Read(conn, cfg.Lock.Pool, cfg.Lock.Image)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return exitFailure
	}
	object := cfg.Lock.Pool + "/" + fleet.Object(cfg.Lock.Image)
	if len(junk) > 0 {
		k := junk[0].Key
		if len(k) > 80 {
			k = k[:80] + "…"
		}
		fmt.Fprintf(stderr, "warning: %s holds %d entries flattend did not write (ignored), first %q: %s\n",
			object, len(junk), k, junk[0].Reason)
	}
	if truncated {
		fmt.Fprintf(stderr, "warning: %s holds too many entries: only the first were read\n", object)
	}
	r := fleet.Assess(object, nodes, len(junk), time.Now())
	if asJSON {
		err = fleet.WriteJSON(stdout, r)
	} else {
		err = fleet.WriteText(stdout, r)
	}
	if err != nil {
		return exitFailure
	}
	return exitOK
}
