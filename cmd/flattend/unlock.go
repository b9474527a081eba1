package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/ceph/go-ceph/rados"

	"github.com/flattend/flattend/internal/config"
	"github.com/flattend/flattend/internal/lock"
)

func unlockFlags(fs *flag.FlagSet, o *options) {
	fs.BoolVar(&o.force, "force", false, "required: break the lock of a holder that is stuck")
	fs.IntVar(&o.slot, "slot", 0, "the slot to break (see flattend status)")
	fs.BoolVar(&o.yes, "yes", false, "do not ask for confirmation")
}

// runUnlock is `flattend unlock`: it breaks a stuck holder's lock, and only with --force.
func runUnlock(_ context.Context, e *env, o options) int {
	if !o.force {
		fmt.Fprintln(e.stderr, "flattend unlock: breaking a lock needs --force (see flattend unlock --help)")
		return exitUsage
	}
	return unlock(e.cfg, e.dial, o.slot, o.yes, e.stdin, e.stdout, e.stderr)
}

// unlock breaks one slot's lock after showing who holds it and asking to confirm.
func unlock(cfg *config.Config, dial func() (*rados.Conn, error), slot int, yes bool, stdin io.Reader, stdout, stderr io.Writer) int {
	if slot < 0 || slot >= cfg.Lock.Slots {
		fmt.Fprintf(stderr, "flattend unlock: --slot %d: the configuration has slots 0..%d\n", slot, cfg.Lock.Slots-1)
		return exitUsage
	}
	return withSlots(cfg, dial, stderr, func(conn *rados.Conn, slots []lock.SlotStatus) int {
		st := slots[slot]
		if st.Owner == "" {
			fmt.Fprintf(stdout, "slot %d (%s) is not held: nothing to break\n", slot, st.Image)
			return exitOK
		}
		confirmWord := describeHolder(stdout, slot, st)
		if !yes && !confirmed(confirmWord, stdin, stdout) {
			fmt.Fprintln(stderr, "not confirmed: nothing broken")
			return exitFailure
		}
		if err := lock.Break(conn, cfg.Lock.Pool, cfg.Lock.Image, slot, st.Owner); err != nil {
			fmt.Fprintln(stderr, err)
			if errors.Is(err, lock.ErrNotHeld) {
				return exitOK
			}
			return exitFailure
		}
		fmt.Fprintf(stdout, "lock of slot %d broken; %s blocklisted. The next holder repairs the clone it was flattening first.\n", slot, st.Owner)
		return exitOK
	})
}

// describeHolder prints who holds slot and returns the word the operator types to confirm: the
// holder's node, or its client when there is no holder record.
func describeHolder(stdout io.Writer, slot int, st lock.SlotStatus) string {
	holder := "an unknown holder (no record)"
	confirmWord := st.Owner
	if r := st.Holder; r != nil {
		holder = fmt.Sprintf("node %s (pid %d) since %s, flattening %q, record updated %s ago",
			r.Node, r.PID, r.Since.Format(time.RFC3339), r.Clone, time.Since(r.Updated).Round(time.Second))
		confirmWord = r.Node
	}
	fmt.Fprintf(stdout, "slot %d (%s) is held by %s\n  client %s\n", slot, st.Image, holder, st.Owner)
	fmt.Fprintln(stdout, "Breaking it blocklists that client: if it is alive, its flatten stops and it reconnects.")
	return confirmWord
}

// confirmed asks the operator to type word.
func confirmed(word string, stdin io.Reader, stdout io.Writer) bool {
	fmt.Fprintf(stdout, "Type %q to break the lock: ", word)
	line, _ := bufio.NewReader(stdin).ReadString('\n')
	return strings.TrimSpace(line) == word
}
