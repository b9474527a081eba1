// Package gate holds the safety gates a flatten must pass: the cluster is healthy enough and the
// clone's pool has room for the data the flatten is about to copy. Flattening adds load and data;
// on a cluster that is already full, degraded or recovering it makes things worse, and on a full
// cluster librbd's flatten hangs for ever. The gates are mon commands: cheap enough to ask again
// every few seconds while a flatten runs.
package gate

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/ceph/go-ceph/rados"

	"github.com/flattend/flattend/internal/cephconn"
	"github.com/flattend/flattend/internal/humanize"
)

// ErrClosed is wrapped by every error that means "a gate is closed": not a failure of the clone,
// it is retried when the gate opens again.
var ErrClosed = errors.New("safety gate closed")

// Closed says which gate refused and why.
type Closed struct {
	Gate   string // "health", "recovery" or "space"
	Reason string
}

func (c *Closed) Error() string        { return fmt.Sprintf("%s gate closed: %s", c.Gate, c.Reason) }
func (c *Closed) Is(target error) bool { return target == ErrClosed }

// Config says which gates are on. The zero value checks nothing.
type Config struct {
	// Health refuses while the cluster is HEALTH_ERR or any OSD or pool is full, nearfull or
	// backfillfull.
	Health bool
	// Recovery refuses while placement groups are recovering or backfilling.
	Recovery bool
	// SpaceFactor: the pool's MAX AVAIL must exceed the bytes still to copy times this (0: off).
	SpaceFactor float64
}

// fullChecks are the health checks that close the health gate whatever their severity: a flatten
// adds data, and these say there is no room for it.
var fullChecks = map[string]bool{
	"OSD_FULL": true, "OSD_NEARFULL": true, "OSD_BACKFILLFULL": true, "OSD_FAILSAFE_FULL": true,
	"POOL_FULL": true, "POOL_NEARFULL": true, "POOL_BACKFILLFULL": true,
}

// recoveryStates are PG state words that mean data is being moved or rebuilt.
var recoveryStates = []string{"recovering", "recovery_wait", "backfilling", "backfill_wait", "backfill_toofull", "recovery_toofull"}

// Check asks the cluster once; nil means every enabled gate is open for copying need more
// bytes into pool. A *Closed error (errors.Is ErrClosed) is a refusal; other errors mean the
// cluster could not be asked. The commands (`health detail`, `status`, `df`, `osd pool
// get-quota`) are all allowed to a key with mon 'profile rbd'.
func Check(conn *rados.Conn, c Config, pool string, need uint64) error {
	if c.Health {
		if err := health(conn, pool); err != nil {
			return err
		}
	}
	if c.Recovery {
		if err := recovery(conn); err != nil {
			return err
		}
	}
	if c.SpaceFactor > 0 {
		if err := space(conn, pool, need, c.SpaceFactor); err != nil {
			return err
		}
	}
	return nil
}

// Watch returns a context that is cancelled, with the *Closed error as its cause, as soon as a
// check every interval finds a gate closed. need reports the bytes still to copy at that moment.
// Errors asking the cluster do not close the gate (the lock's own checks deal with a lost
// cluster). The returned cancel stops the watching goroutine.
func Watch(ctx context.Context, conn *rados.Conn, c Config, pool string, interval time.Duration, need func() uint64) (context.Context, context.CancelFunc) {
	wctx, cancel := context.WithCancelCause(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-wctx.Done():
				return
			case <-t.C:
			}
			if err := Check(conn, c, pool, need()); errors.Is(err, ErrClosed) {
				cancel(err)
				return
			}
		}
	}()
	return wctx, func() { cancel(context.Canceled); <-done }
}

func monJSON(conn *rados.Conn, cmd map[string]string, out any) error {
	cmd["format"] = "json"
	req, _ := json.Marshal(cmd)
	buf, info, err := conn.MonCommand(req)
	if err != nil {
		return cephconn.WithHint(fmt.Errorf("mon command %q: %w (%s)", cmd["prefix"], err, strings.TrimSpace(info)))
	}
	if err := json.Unmarshal(buf, out); err != nil {
		return fmt.Errorf("mon command %q: unexpected reply: %w", cmd["prefix"], err)
	}
	return nil
}

type healthReply struct {
	Status string `json:"status"`
	Checks map[string]struct {
		Severity string `json:"severity"`
		Summary  struct {
			Message string `json:"message"`
		} `json:"summary"`
		Detail []struct {
			Message string `json:"message"`
		} `json:"detail"`
	} `json:"checks"`
}

func health(conn *rados.Conn, pool string) error {
	var h healthReply
	if err := monJSON(conn, map[string]string{"prefix": "health", "detail": "detail"}, &h); err != nil {
		return err
	}
	return h.closed(pool)
}

// closed reads a `health detail` reply: any HEALTH_ERR check closes the gate, so does any full
// OSD, and a full pool when it is the clone's pool.
func (h healthReply) closed(pool string) error {
	var reasons []string
	for name, c := range h.Checks {
		switch {
		case c.Severity == "HEALTH_ERR", fullChecks[name] && strings.HasPrefix(name, "OSD_"):
			reasons = append(reasons, name+": "+c.Summary.Message)
		case fullChecks[name]:
			for _, d := range c.Detail {
				if strings.Contains(d.Message, "'"+pool+"'") {
					reasons = append(reasons, name+": "+d.Message)
				}
			}
		}
	}
	sort.Strings(reasons)
	if h.Status == "HEALTH_ERR" && len(reasons) == 0 {
		reasons = append(reasons, "cluster is HEALTH_ERR")
	}
	if len(reasons) > 0 {
		return &Closed{Gate: "health", Reason: strings.Join(reasons, "; ")}
	}
	return nil
}

// statusReply is the part of `ceph status` the recovery gate reads. (`pg stat` would be lighter,
// but it is a mgr command: a key with mon/osd 'profile rbd' may not run it.)
type statusReply struct {
	PGMap struct {
		ByState []struct {
			Name  string `json:"state_name"`
			Count int    `json:"count"`
		} `json:"pgs_by_state"`
	} `json:"pgmap"`
}

func recovery(conn *rados.Conn) error {
	var st statusReply
	if err := monJSON(conn, map[string]string{"prefix": "status"}, &st); err != nil {
		return err
	}
	return st.closed()
}

func (st statusReply) closed() error {
	var reasons []string
	for _, s := range st.PGMap.ByState {
		for _, word := range strings.Split(s.Name, "+") {
			if slices.Contains(recoveryStates, word) {
				reasons = append(reasons, fmt.Sprintf("%d pgs %s", s.Count, s.Name))
				break
			}
		}
	}
	if len(reasons) > 0 {
		return &Closed{Gate: "recovery", Reason: strings.Join(reasons, ", ")}
	}
	return nil
}

type dfPool struct {
	Name  string `json:"name"`
	Stats struct {
		MaxAvail uint64 `json:"max_avail"`
	} `json:"stats"`
}

type dfReply struct {
	Pools []dfPool `json:"pools"`
}

type quotaReply struct {
	MaxBytes uint64 `json:"quota_max_bytes"`
	Bytes    uint64 `json:"current_num_bytes"`
}

// Avail is what clients can still write to pool: its MAX AVAIL from `ceph df`, or less when a
// byte quota leaves less.
func Avail(conn *rados.Conn, pool string) (uint64, error) {
	var df dfReply
	if err := monJSON(conn, map[string]string{"prefix": "df"}, &df); err != nil {
		return 0, err
	}
	i := slices.IndexFunc(df.Pools, func(p dfPool) bool { return p.Name == pool })
	if i < 0 {
		return 0, fmt.Errorf("pool %q is not in `ceph df`: does it exist?", pool)
	}
	avail := df.Pools[i].Stats.MaxAvail
	var q quotaReply
	if err := monJSON(conn, map[string]string{"prefix": "osd pool get-quota", "pool": pool}, &q); err != nil {
		return 0, err
	}
	if q.MaxBytes > 0 {
		avail = min(avail, q.MaxBytes-min(q.Bytes, q.MaxBytes))
	}
	return avail, nil
}

func space(conn *rados.Conn, pool string, need uint64, factor float64) error {
	avail, err := Avail(conn, pool)
	if err != nil {
		return err
	}
	want := uint64(float64(need) * factor)
	if avail <= want {
		return &Closed{Gate: "space", Reason: fmt.Sprintf("pool %s has %s available, the flatten needs %s × %g = %s",
			pool, humanize.Bytes(avail), humanize.Bytes(need), factor, humanize.Bytes(want))}
	}
	return nil
}
