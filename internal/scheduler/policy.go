package scheduler

import (
	"cmp"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/flattend/flattend/internal/discovery"
	"github.com/flattend/flattend/internal/humanize"
)

// The policy: which clone goes first, which are left out, and when a pass stops. `flattend plan`
// applies the same rules (Order, InUse).

// errTooLate stops a pass when the window has too little time left for a flatten to be worth
// its start.
var errTooLate = errors.New("too little of the window left to start a flatten")

// ErrInUse skips a clone another client has open, under flatten.in_use: skip.
var ErrInUse = errors.New("in use by another client")

// InUse says whether a clone that users have open may be flattened: nil, or an error wrapping
// ErrInUse that names them.
func InUse(users []string, allow bool) error {
	if len(users) == 0 || allow {
		return nil
	}
	return fmt.Errorf("%w: %s", ErrInUse, strings.Join(users, ", "))
}

// Order sorts clones for flattening by keys, most important first: "depth" puts the deepest
// clone chains first (each flatten of a deep clone shortens the chain every read walks), "age"
// the oldest clones (they have waited longest), "size" the smallest (more clones done per hour
// when the window is short). Ties end in spec order, so every pass uses the same order.
func Order(clones []discovery.Clone, keys []string) {
	slices.SortStableFunc(clones, func(a, b discovery.Clone) int {
		for _, k := range keys {
			var c int
			switch k {
			case "depth":
				c = cmp.Compare(b.Depth, a.Depth)
			case "age":
				c = a.Created.Compare(b.Created)
			case "size":
				c = cmp.Compare(a.Overlap, b.Overlap)
			}
			if c != 0 {
				return c
			}
		}
		return cmp.Compare(a.Spec.String(), b.Spec.String())
	})
}

// maxRetryAfter caps the doubling of Config.RetryAfter.
const maxRetryAfter = 24 * time.Hour

// retry remembers a clone that failed, so it waits instead of failing every pass.
type retry struct {
	failures int
	next     time.Time
}

// budget is what one window has used so far on this node.
type budget struct {
	clones  int
	bytes   uint64
	stopped bool // logged that a cap was reached
}

// stopReason says why no further flatten may start in this window: a cap reached, or too little
// of the window left (a flatten cancelled moments after its start would cost a lock round and
// a connection for little copying; it resumes next window anyway). Empty means go on.
func (s *Scheduler) stopReason() string {
	var reason string
	switch {
	case s.cfg.MaxPerWindow > 0 && s.budget.clones >= s.cfg.MaxPerWindow:
		reason = fmt.Sprintf("flatten.max_per_window (%d) reached", s.cfg.MaxPerWindow)
	case s.cfg.MaxBytesPerWindow > 0 && s.budget.bytes >= s.cfg.MaxBytesPerWindow:
		reason = fmt.Sprintf("flatten.max_bytes_per_window (%s) reached", humanize.Bytes(s.cfg.MaxBytesPerWindow))
	case s.tooLate():
		reason = fmt.Sprintf("%s: %s left, flatten.min_time_left is %s", errTooLate,
			time.Until(time.Unix(0, s.windowEnd.Load())).Round(time.Second), s.cfg.MinTimeLeft)
	}
	if reason != "" && !s.budget.stopped {
		s.budget.stopped = true
		s.log.Info("no more flattens in this window", zap.String("reason", reason))
	}
	return reason
}

func (s *Scheduler) tooLate() bool {
	end := s.windowEnd.Load()
	return end != 0 && time.Until(time.Unix(0, end)) < s.cfg.MinTimeLeft
}

// skipReason says why c is not tried in this pass: it failed recently, or it alone would take
// the window over its byte budget. Empty means try it.
func (s *Scheduler) skipReason(c discovery.Clone) string {
	if r, ok := s.retries[c.Spec.String()]; ok && time.Now().Before(r.next) {
		return fmt.Sprintf("failed %d time(s), next try after %s", r.failures, r.next.Format(time.RFC3339))
	}
	if max := s.cfg.MaxBytesPerWindow; max > 0 && s.budget.bytes+c.Overlap > max {
		return fmt.Sprintf("%s to copy would exceed flatten.max_bytes_per_window (%s used of %s)",
			humanize.Bytes(c.Overlap), humanize.Bytes(s.budget.bytes), humanize.Bytes(max))
	}
	return ""
}

// failed counts one more failure of the clone name and sets when it may be tried again.
func (s *Scheduler) failed(name string) (retry, time.Duration) {
	r := s.retries[name]
	r.failures++
	wait := s.retryAfter(r.failures)
	r.next = time.Now().Add(wait)
	s.retries[name] = r
	return r, wait
}

// retryAfter is the wait after a clone's nth consecutive failure: RetryAfter, doubled per
// further failure, at most a day. It doubles step by step and stops at the cap: a shift
// (RetryAfter << n) overflows int64 for a RetryAfter above 39h and n = 16, and a negative wait
// retried the clone at once.
func (s *Scheduler) retryAfter(failures int) time.Duration {
	wait := min(s.cfg.RetryAfter, maxRetryAfter)
	for n := 1; n < failures && wait > 0 && wait < maxRetryAfter; n++ {
		wait *= 2 // at most 2 × maxRetryAfter: no overflow
	}
	return min(wait, maxRetryAfter)
}
