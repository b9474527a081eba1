package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/ceph/go-ceph/rados"

	"github.com/flattend/flattend/internal/config"
	"github.com/flattend/flattend/internal/lock"
	"github.com/flattend/flattend/internal/status"
)

func statusFlags(fs *flag.FlagSet, o *options) {
	fs.BoolVar(&o.json, "json", false, "print JSON (the format is documented in docs/operations.md)")
	fs.BoolVar(&o.nodes, "nodes", false, "list every node's last pass, backlog, version and next window instead (fleet view)")
	adminFlags(fs, &o.admin)
	lockFlags(fs, &o.admin)
}

// runStatus is `flattend status`: who holds each slot of the lock, on what, how far, and who
// waits.
func runStatus(_ context.Context, e *env, o options) int {
	if o.nodes {
		return showNodes(e.cfg, e.dial, o.json, e.stdout, e.stderr)
	}
	return showStatus(lockSlots(e), e.dial, o.json, e.stdout, e.stderr)
}

func showStatus(cfg *config.Config, dial func() (*rados.Conn, error), asJSON bool, stdout, stderr io.Writer) int {
	return withSlots(cfg, dial, stderr, func(conn *rados.Conn, slots []lock.SlotStatus) int {
		q, err := lock.ReadQueueAll(conn, cfg.Lock.Pool, cfg.Lock.Image)
		if err != nil {
			fmt.Fprintln(stderr, err)
			return exitFailure
		}
		if n := len(q.Ignored); n > 0 {
			fmt.Fprintf(stderr, "warning: the queue holds %d entries flattend did not write (ignored; the next release removes them), first %q\n",
				n, q.Ignored[0])
		}
		return printStatus(slots, q.Waiters, asJSON, stdout)
	})
}

func printStatus(slots []lock.SlotStatus, waiting []lock.Waiter, asJSON bool, stdout io.Writer) int {
	var err error
	r := status.Build(slots, waiting, time.Now())
	if asJSON {
		err = status.WriteJSON(stdout, r)
	} else {
		err = status.WriteText(stdout, r)
	}
	if err != nil {
		return exitFailure
	}
	return exitOK
}

// withSlots connects, reads every slot of the lock and hands both to fn; errors are printed and
// turned into exit codes. status and unlock use it.
func withSlots(cfg *config.Config, dial func() (*rados.Conn, error), stderr io.Writer, fn func(*rados.Conn, []lock.SlotStatus) int) int {
	conn, err := dial()
	if err != nil {
		fmt.Fprintln(stderr, err)
		return exitCode(err)
	}
	defer conn.Shutdown()
	n := cfg.Lock.Slots
	if n == 0 { // no config file: as many as the lock has
		n, err = lock.SlotsFound(conn, cfg.Lock.Pool, cfg.Lock.Image)
	}
	if err != nil {
		fmt.Fprintln(stderr, err)
		return exitFailure
	}
	slots, err := lock.ReadStatus(conn, cfg.Lock.Pool, cfg.Lock.Image, n)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return exitFailure
	}
	return fn(conn, slots)
}
