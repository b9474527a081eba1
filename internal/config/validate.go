package config

import (
	"errors"
	"fmt"
	"net"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/flattend/flattend/internal/libvirturi"
	"github.com/flattend/flattend/internal/window"
)

var (
	imageName = regexp.MustCompile(`^[^/@\s]+$`)
	poolName  = regexp.MustCompile(`^[^/@\s]+$`)
	metaKey   = regexp.MustCompile(`^[A-Za-z0-9._-]+$`)
)

// Bounds on the intervals, so that a typo (1ns, 1ms) cannot make a busy loop of calls to the
// cluster. docs/configuration.md gives them to operators.
const (
	// minLockCheck: each check asks librbd whether the lock is still ours.
	minLockCheck = 100 * time.Millisecond
	// maxLockCheck: a holder gives up its lease once its watch has gone unconfirmed for 12 s
	// (lock.maxUnconfirmed), but it only notices at a check, so up to 12 s + check_interval
	// after the cluster last heard from it. Other nodes break the lock once the watch times out
	// (osd_client_watch_timeout, 30 s by default): 10 s leaves the cancelled flatten 8 s to
	// drain its copy-ups. 10 s is also the holder record's heartbeat, refreshed at checks only.
	maxLockCheck = 10 * time.Second
	// minGateCheck: each check is four mon commands (health detail, pg stat, df, quota).
	minGateCheck = time.Second
	// minBackoff: each attempt opens a lock image per slot.
	minBackoff = 100 * time.Millisecond
	// minDiscoveryInterval: a pass reads the header of every image of every pool listed. The
	// wait starts when a pass ends, so 1 s cannot be a busy loop, and the e2e partition test
	// relies on 2 s.
	minDiscoveryInterval = time.Second
	// maxRetryAfter: the scheduler caps the doubled wait at a day anyway.
	maxRetryAfter = 24 * time.Hour
	// minOpTimeout: a healthy cluster answers in milliseconds, but a PG that peers after an
	// OSD restart holds ops for seconds; a timed-out copy-up fails the flatten.
	minOpTimeout = 5 * time.Second
	// maxOpTimeout: a stop waits for the calls in flight; the watchdog (WatchdogSec=5min in the
	// unit) must outlast a few of them in a row.
	maxOpTimeout = 2 * time.Minute
)

// minBytesPerSecond keeps the pause a paced flatten makes per object (4 MiB by default) short:
// it blocks a librbd thread that the lock image's connection shares.
const minBytesPerSecond = 1 << 20

// checker collects the problems of one file; each section's check reports through bad.
type checker struct {
	path   string
	places map[string]int // key path -> line, from walk
	es     Errors
	// unprintable holds the fields printable reported: their other problems would only repeat it.
	unprintable map[string]bool
	noDiscovery bool // no discovery source is fine (see validateFor)
}

// bad records a problem at field, or at the closest enclosing key the file has when the field
// itself is not in the file (a default).
func (v *checker) bad(field, format string, args ...any) {
	if v.unprintable[field] {
		return
	}
	v.es = append(v.es, v.at(field, fmt.Sprintf(format, args...)))
}

// at is msg about field, at field's line or the closest enclosing key's the file has.
func (v *checker) at(field, msg string) *Error {
	line := v.places[field]
	for p := field; line == 0 && p != ""; {
		i := strings.LastIndexAny(p, ".[")
		if i < 0 {
			break
		}
		p = p[:i]
		line = v.places[p]
	}
	return &Error{File: v.path, Line: line, Field: field, Msg: msg}
}

// positive reports field unless d > 0.
func (v *checker) positive(field string, d Duration) {
	if d <= 0 {
		v.bad(field, "must be positive, got %s", d.D())
	}
}

// atLeast reports field unless d >= lo (a d that is not positive gets positive's message).
func (v *checker) atLeast(field string, d Duration, lo time.Duration) {
	if d <= 0 {
		v.positive(field, d)
	} else if d.D() < lo {
		v.bad(field, "%s is below the minimum of %s", short(d.D()), short(lo))
	}
}

// within reports field unless lo <= d <= hi.
func (v *checker) within(field string, d Duration, lo, hi time.Duration) {
	if d <= 0 {
		v.positive(field, d)
	} else if d.D() < lo || d.D() > hi {
		v.bad(field, "%s is out of range %s..%s", short(d.D()), short(lo), short(hi))
	}
}

// short writes d as an operator would: 24h rather than 24h0m0s.
func short(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}

// validate checks every section and keeps what it parsed in c.parsed.
func (c *Config) validate(places map[string]int) Errors { return c.validateFor(places, true) }

// validateFor is validate; without needDiscovery, a config with no discovery source passes (the
// admin commands that do not look for clones).
func (c *Config) validateFor(places map[string]int, needDiscovery bool) Errors {
	v := &checker{path: c.Path, places: places, unprintable: map[string]bool{}, noDiscovery: !needDiscovery}
	v.printable(reflect.ValueOf(*c), "")
	v.node(c.Node)
	v.ceph(c.Ceph)
	v.lock(c.Lock)
	c.parsed.window = v.window(c.Window)
	v.backoff(c.Backoff)
	v.flatten(c.Flatten)
	// The gates' checks straddle cleanup's so that the errors keep the order they always had.
	v.spaceFactor(c.Gates)
	c.parsed.snapshotPattern = v.cleanup(c.Cleanup)
	c.parsed.warnings = v.snapshotPatternWarnings(c.parsed.snapshotPattern)
	v.atLeast("gates.check_interval", c.Gates.CheckInterval, minGateCheck)
	c.parsed.poolMatch = v.discovery(c.Discovery)
	v.metrics(c.Metrics)
	v.log(c.Log)
	return v.es
}

func (v *checker) node(node string) {
	if node == "" {
		v.bad("node", "must not be empty (default: the host name)")
	} else if !metaKey.MatchString(node) {
		v.bad("node", "%q: use letters, digits, '.', '_' and '-' only", node)
	}
}

func (v *checker) ceph(c Ceph) {
	if c.Conf == "" {
		v.bad("ceph.conf", "must name a ceph.conf file")
	}
	if c.User == "" {
		v.bad("ceph.user", "must name the cephx user (flattend or client.flattend)")
	}
	v.positive("ceph.connect_timeout", c.ConnectTimeout)
	v.within("ceph.op_timeout", c.OpTimeout, minOpTimeout, maxOpTimeout)
}

func (v *checker) lock(l Lock) {
	if !poolName.MatchString(l.Pool) {
		v.bad("lock.pool", "%q is not a pool name", l.Pool)
	}
	if !imageName.MatchString(l.Image) {
		v.bad("lock.image", "%q is not an image name", l.Image)
	}
	if l.Slots < 1 || l.Slots > 64 {
		v.bad("lock.slots", "%d is out of range 1..64", l.Slots)
	}
	v.within("lock.check_interval", l.CheckInterval, minLockCheck, maxLockCheck)
}

// window parses the window once; it returns the zero Window if anything is wrong.
func (v *checker) window(w Window) window.Window {
	// window.New rejects a bad duration before it looks at the schedule; a stand-in duration
	// gets the schedule checked too, and window.duration is reported on its own.
	parsed, err := window.New(w.Schedule, max(w.Duration.D(), time.Nanosecond))
	switch {
	case errors.Is(err, window.ErrNeverOpens):
		v.bad("window.schedule", "%q never opens: it has no activation in the next 5 years", w.Schedule)
	case err != nil:
		// errors.Unwrap: the cron parser's own words, without window's prefix.
		v.bad("window.schedule", "%q is not a 5-field cron schedule: %v", w.Schedule, errors.Unwrap(err))
	}
	v.positive("window.duration", w.Duration)
	if err != nil || w.Duration <= 0 {
		return window.Window{}
	}
	return parsed
}

func (v *checker) backoff(b Backoff) {
	v.atLeast("backoff.min", b.Min, minBackoff)
	if b.Max < b.Min {
		v.bad("backoff.max", "%s is less than backoff.min (%s)", b.Max.D(), b.Min.D())
	}
}

func (v *checker) flatten(f Flatten) {
	if f.ConcurrentOps < 1 || f.ConcurrentOps > 1024 {
		v.bad("flatten.concurrent_ops", "%d is out of range 1..1024", f.ConcurrentOps)
	}
	if r := f.MaxBytesPerSecond; r != 0 && r < minBytesPerSecond {
		v.bad("flatten.max_bytes_per_second", "%d is below the minimum of 1MiB (0: no cap)", r)
	}
	if f.MinTimeLeft < 0 {
		v.bad("flatten.min_time_left", "must not be negative, got %s", f.MinTimeLeft.D())
	}
	if f.InUse != InUseSkip && f.InUse != InUseAllow {
		v.bad("flatten.in_use", "%q: use skip or allow", f.InUse)
	}
	if f.VerifyCopyups != VerifyAuto && f.VerifyCopyups != VerifyAlways {
		v.bad("flatten.verify_copyups", "%q: use auto or always", f.VerifyCopyups)
	}
	seenKey := map[string]bool{}
	for i, k := range f.Order {
		field := fmt.Sprintf("flatten.order[%d]", i)
		switch {
		case !slices.Contains(OrderKeys, k):
			v.bad(field, "%q: use depth, age or size", k)
		case seenKey[k]:
			v.bad(field, "%q is listed twice", k)
		}
		seenKey[k] = true
	}
	if f.MaxPerWindow < 0 {
		v.bad("flatten.max_per_window", "must not be negative, got %d", f.MaxPerWindow)
	}
	v.positive("flatten.retry_after", f.RetryAfter)
	if f.RetryAfter.D() > maxRetryAfter {
		v.bad("flatten.retry_after", "%s is above the maximum of %s", short(f.RetryAfter.D()), short(maxRetryAfter))
	}
}

func (v *checker) spaceFactor(g Gates) {
	if !(g.SpaceFactor >= 1 && g.SpaceFactor <= 100) {
		v.bad("gates.space_factor", "%g is out of range 1..100 (the space gate cannot be turned off)", g.SpaceFactor)
	}
}

// cleanup returns snapshot_pattern compiled (nil when empty or bad).
func (v *checker) cleanup(c Cleanup) *regexp.Regexp {
	if c.SnapshotPattern == "" {
		if c.ParentSnapshots {
			v.bad("cleanup.snapshot_pattern", "required with cleanup.parent_snapshots: true (a regular expression on snapshot names, e.g. ^flattend-gc-)")
		}
		return nil
	}
	re, err := regexp.Compile(c.SnapshotPattern)
	if err != nil {
		v.bad("cleanup.snapshot_pattern", "%q is not a regular expression: %v", c.SnapshotPattern, err)
	}
	return re
}

// discovery returns each pool's match compiled (nil when empty or bad).
func (v *checker) discovery(d Discovery) []*regexp.Regexp {
	if len(d.Pools) == 0 && d.Libvirt == nil && !v.noDiscovery {
		v.bad("discovery.pools", "list at least one pool to look for this node's clones in, or add a discovery.libvirt section")
	}
	matches := make([]*regexp.Regexp, len(d.Pools))
	for i, p := range d.Pools {
		matches[i] = v.pool(fmt.Sprintf("discovery.pools[%d]", i), p)
	}
	if l := d.Libvirt; l != nil {
		if _, err := libvirturi.Parse(l.URI); err != nil {
			v.bad("discovery.libvirt.uri", "%v", err)
		}
	}
	v.atLeast("discovery.interval", d.Interval, minDiscoveryInterval)
	return matches
}

// pool checks one discovery.pools entry, field, and returns its match compiled.
func (v *checker) pool(field string, p PoolSource) *regexp.Regexp {
	if !poolName.MatchString(p.Pool) {
		v.bad(field+".pool", "%q is not a pool name", p.Pool)
	}
	if p.Namespace != "" && !poolName.MatchString(p.Namespace) {
		v.bad(field+".namespace", "%q is not a namespace name", p.Namespace)
	}
	if _, set := v.places[field+".owner_key"]; set && p.Shared {
		v.bad(field+".owner_key", "a shared pool (shared: true) has no owner: remove owner_key or shared")
	} else if !p.Shared && !metaKey.MatchString(p.OwnerKey) {
		v.bad(field+".owner_key", "%q is not an image-meta key", p.OwnerKey)
	}
	re, err := regexp.Compile(p.Match)
	if err != nil {
		v.bad(field+".match", "%q is not a regular expression: %v", p.Match, err)
	}
	if p.Match == "" {
		return nil
	}
	return re
}

func (v *checker) metrics(m Metrics) {
	if m.Listen == "" {
		return
	}
	if _, port, err := net.SplitHostPort(m.Listen); err != nil {
		v.bad("metrics.listen", "%q: want host:port (e.g. 127.0.0.1:9478), or \"\" to turn metrics off", m.Listen)
	} else if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		v.bad("metrics.listen", "%q: %q is not a port number", m.Listen, port)
	}
}

func (v *checker) log(l Log) {
	switch l.Level {
	case "debug", "info", "warn", "error":
	default:
		v.bad("log.level", "%q: use debug, info, warn or error", l.Level)
	}
	switch l.Format {
	case "console", "json":
	default:
		v.bad("log.format", "%q: use console or json", l.Format)
	}
}

// printable reports every string of val, a Config or a part of one at field, that holds a
// control character or is not UTF-8: names reach logs, metrics, librados and terminals as they
// are, and a newline or an escape sequence in one forges or hides output.
func (v *checker) printable(val reflect.Value, field string) {
	switch val.Kind() {
	case reflect.String:
		s := val.String()
		if !utf8.ValidString(s) {
			v.bad(field, "%q is not valid UTF-8", s)
			v.unprintable[field] = true
		} else if i := strings.IndexFunc(s, unicode.IsControl); i >= 0 {
			v.bad(field, "%q contains a control character (U+%04X): use printable text", s, []rune(s[i:])[0])
			v.unprintable[field] = true
		}
	case reflect.Pointer:
		if !val.IsNil() {
			v.printable(val.Elem(), field)
		}
	case reflect.Slice:
		for i := range val.Len() {
			v.printable(val.Index(i), fmt.Sprintf("%s[%d]", field, i))
		}
	case reflect.Struct:
		t := val.Type()
		for i := range t.NumField() {
			name, _, _ := strings.Cut(t.Field(i).Tag.Get("yaml"), ",")
			if !t.Field(i).IsExported() || name == "" || name == "-" {
				continue
			}
			if field != "" {
				name = field + "." + name
			}
			v.printable(val.Field(i), name)
		}
	}
}
