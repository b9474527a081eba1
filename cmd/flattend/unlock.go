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
	fs.BoolVar(&o.forceLive, "force-live", false, "break it even if the holder looks alive (it watches the lock image and has not shown it hangs)")
	fs.IntVar(&o.slot, "slot", 0, "the slot to break (see flattend status)")
	fs.BoolVar(&o.yes, "yes", false, "do not ask for confirmation")
	adminFlags(fs, &o.admin)
	lockFlags(fs, &o.admin)
}

// runUnlock is `flattend unlock`: it breaks a stuck holder's lock, and only with --force.
func runUnlock(_ context.Context, e *env, o options) int {
	if !o.force {
		fmt.Fprintln(e.stderr, "flattend unlock: breaking a lock needs --force (see flattend unlock --help)")
		return exitUsage
	}
	return unlock(lockSlots(e), e.dial, o, e.stdin, e.stdout, e.stderr)
}

// unlock breaks one slot's lock after showing who holds it and asking to confirm with the
// holder's client id, then checks that the holder is blocklisted.
func unlock(cfg *config.Config, dial func() (*rados.Conn, error), o options, stdin io.Reader, stdout, stderr io.Writer) int {
	slot := o.slot
	if slot < 0 && cfg.Lock.Slots == 0 { // no config file: the lock's slots are checked below
		fmt.Fprintf(stderr, "flattend unlock: --slot %d: slots are numbered from 0\n", slot)
		return exitUsage
	}
	if slot < 0 || (cfg.Lock.Slots > 0 && slot >= cfg.Lock.Slots) {
		fmt.Fprintf(stderr, "flattend unlock: --slot %d: the configuration has slots 0..%d\n", slot, cfg.Lock.Slots-1)
		return exitUsage
	}
	return withSlots(cfg, dial, stderr, func(conn *rados.Conn, slots []lock.SlotStatus) int {
		if slot >= len(slots) {
			fmt.Fprintf(stderr, "flattend unlock: --slot %d: the lock %s/%s has slots 0..%d\n", slot, cfg.Lock.Pool, cfg.Lock.Image, len(slots)-1)
			return exitUsage
		}
		st := slots[slot]
		lk, err := lock.ReadLocker(conn, cfg.Lock.Pool, cfg.Lock.Image, slot)
		if err != nil {
			fmt.Fprintln(stderr, err)
			return exitFailure
		}
		if lk.Addr == "" {
			fmt.Fprintf(stdout, "slot %d (%s) is not held: nothing to break\n", slot, st.Image)
			return exitOK
		}
		describeHolder(stdout, slot, st, lk, time.Now())
		if looksAlive(st, lk, time.Now()) && !o.forceLive {
			fmt.Fprintf(stderr, "%s looks alive: it watches the lock image, and no record of its own shows it hanging. "+
				"If you are sure it is stuck, add --force-live. Nothing broken.\n", lk.Client)
			return exitFailure
		}
		if !o.yes && !confirmed(lk.Client, stdin, stdout) {
			fmt.Fprintln(stderr, "not confirmed: nothing broken")
			return exitFailure
		}
		return breakSlot(conn, cfg, slot, lk, stdout, stderr)
	})
}

// breakSlot breaks the lock and reports what the blocklist says.
func breakSlot(conn *rados.Conn, cfg *config.Config, slot int, lk lock.Locker, stdout, stderr io.Writer) int {
	until, err := lock.Break(conn, cfg.Lock.Pool, cfg.Lock.Image, slot, lk.Addr)
	switch {
	case errors.Is(err, lock.ErrNotHeld):
		fmt.Fprintln(stderr, err)
		return exitOK
	case errors.Is(err, lock.ErrFenceUnverified):
		fmt.Fprintf(stdout, "lock of slot %d broken.\n", slot)
		fmt.Fprintf(stderr, "warning: %v. Check by hand: ceph osd blocklist ls | grep %s\n", err, lk.Addr)
		return exitOK
	case errors.Is(err, lock.ErrNotFenced):
		fmt.Fprintf(stderr, "lock of slot %d broken, but %v: it may still write. Blocklist it by hand: ceph osd blocklist add %s\n", slot, err, lk.Addr)
		return exitFailure
	case err != nil:
		fmt.Fprintln(stderr, err)
		return exitFailure
	}
	fmt.Fprintf(stdout, "lock of slot %d broken; %s at %s: blocklist verified (until %s). The clone it was flattening keeps its flattening mark and is verified before its next flatten.\n",
		slot, lk.Client, lk.Addr, until.UTC().Format(time.RFC3339))
	return exitOK
}

// describeHolder prints who holds slot: the lock's owner as Ceph lists it, then what its record
// says. Record fields are written by whoever could write the lock image's metadata: they are
// quoted, so that no byte of theirs reaches the terminal as it is.
func describeHolder(stdout io.Writer, slot int, st lock.SlotStatus, lk lock.Locker, now time.Time) {
	watch := "it no longer watches the lock image (its connection is gone)"
	if lk.Watching {
		watch = "it watches the lock image (its connection is alive)"
	}
	fmt.Fprintf(stdout, "slot %d (%s) is locked by %s at %s; %s\n", slot, st.Image, lk.Client, lk.Addr, watch)
	switch r := st.Holder; {
	case r == nil:
		fmt.Fprintln(stdout, "  no holder record")
	default:
		fmt.Fprintf(stdout, "  holder record: node %q, pid %d, client %q, since %s, flattening %q, updated %s ago\n",
			r.Node, r.PID, r.Client, r.Since.Format(time.RFC3339), r.Clone, now.Sub(r.Updated).Round(time.Second))
		if r.Client != lk.Addr {
			fmt.Fprintln(stdout, "  the record is not this client's: it is a previous holder's")
		}
	}
	fmt.Fprintf(stdout, "Breaking it blocklists %s: if it is alive, its flatten stops and it reconnects.\n", lk.Client)
}

// looksAlive says whether a holder may be working normally: it watches the lock image and no
// record of its own is older than lock.StaleAfter (a hung holder stops refreshing its record).
func looksAlive(st lock.SlotStatus, lk lock.Locker, now time.Time) bool {
	if !lk.Watching {
		return false
	}
	r := st.Holder
	return r == nil || r.Client != lk.Addr || now.Sub(r.Updated) <= lock.StaleAfter
}

// confirmed asks the operator to type word (never empty); an empty answer or a closed stdin
// does not confirm.
func confirmed(word string, stdin io.Reader, stdout io.Writer) bool {
	fmt.Fprintf(stdout, "Type %q to break the lock: ", word)
	line, _ := bufio.NewReader(stdin).ReadString('\n')
	answer := strings.TrimSpace(line)
	return word != "" && answer != "" && answer == word
}
