// Package config loads and validates flattend's YAML configuration. Every error it returns names
// the place it comes from, as "file:line: field: problem", so an operator can fix it at once.
//
// Files: config.go holds the types and their defaults, load.go reads and decodes the YAML (and
// turns decoder errors into Errors), validate.go checks each section.
//
// Validation keeps what it parses (the window, the regexps): use the accessor methods of Config
// (ParsedWindow, SnapshotRegexp, PoolMatch) rather than parsing the strings again.
package config

import (
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/flattend/flattend/internal/libvirturi"
	"github.com/flattend/flattend/internal/window"
)

// DefaultPath is where the daemon looks for its configuration when no --config is given.
const DefaultPath = "/etc/flattend/config.yaml"

// DefaultOwnerKey is the image-meta key whose value names the node that owns a clone.
const DefaultOwnerKey = "flattend.owner"

// Config is the whole configuration of one flattend daemon.
type Config struct {
	Node      string    `yaml:"node"`
	Ceph      Ceph      `yaml:"ceph"`
	Lock      Lock      `yaml:"lock"`
	Window    Window    `yaml:"window"`
	Backoff   Backoff   `yaml:"backoff"`
	Flatten   Flatten   `yaml:"flatten"`
	Gates     Gates     `yaml:"gates"`
	Cleanup   Cleanup   `yaml:"cleanup"`
	Discovery Discovery `yaml:"discovery"`
	Log       Log       `yaml:"log"`
	Metrics   Metrics   `yaml:"metrics"`

	// Path is the file the configuration was read from.
	Path string `yaml:"-"`

	// parsed is set by Parse from the fields above; see the accessors below.
	parsed parsed
}

// parsed holds what validation parsed, so nothing is parsed twice and callers need not repeat
// the checks. It is zero in Defaults() and in a Config built by hand, and does not follow later
// changes to the string fields.
type parsed struct {
	window          window.Window
	snapshotPattern *regexp.Regexp   // nil when cleanup.snapshot_pattern is empty
	poolMatch       []*regexp.Regexp // per discovery.pools entry; nil when its match is empty
	warnings        Errors           // see Warnings
}

// ParsedWindow is window.schedule and window.duration as a window.Window (zero unless the
// Config came from Load or Parse).
func (c *Config) ParsedWindow() window.Window { return c.parsed.window }

// SnapshotRegexp is cleanup.snapshot_pattern compiled, or nil when it is empty. It is set even
// when cleanup.parent_snapshots is off: whether to clean up is the caller's call.
func (c *Config) SnapshotRegexp() *regexp.Regexp { return c.parsed.snapshotPattern }

// PoolMatch is discovery.pools[i].match compiled, or nil when it is empty (every image).
func (c *Config) PoolMatch(i int) *regexp.Regexp {
	if i < len(c.parsed.poolMatch) {
		return c.parsed.poolMatch[i]
	}
	return nil
}

// Ceph says how to reach the cluster.
type Ceph struct {
	Conf           string   `yaml:"conf"`
	User           string   `yaml:"user"`    // cephx id: client.<user>
	Keyring        string   `yaml:"keyring"` // empty: whatever ceph.conf says
	ConnectTimeout Duration `yaml:"connect_timeout"`
	// OpTimeout bounds each OSD op and mon command: a cluster that stops answering fails the
	// call instead of wedging the node.
	OpTimeout Duration `yaml:"op_timeout"`
}

// Lock names the image whose managed exclusive lock serialises flattens cluster-wide.
type Lock struct {
	Pool  string `yaml:"pool"`
	Image string `yaml:"image"`
	// Slots is how many clones may flatten at once cluster-wide: lock images Image, Image.1 …
	Slots int `yaml:"slots"`
	// CheckInterval is how often a holder confirms it still owns the lock while flattening.
	CheckInterval Duration `yaml:"check_interval"`
}

// Window is the nightly period in which flattening is allowed: it opens at every activation of
// Schedule and stays open for Duration.
type Window struct {
	Schedule string   `yaml:"schedule"`
	Duration Duration `yaml:"duration"`
}

// Backoff bounds the jittered exponential wait between attempts on a busy lock.
type Backoff struct {
	Min Duration `yaml:"min"`
	Max Duration `yaml:"max"`
}

// Flatten tunes the flatten itself, which clones go first and how much one window may do.
type Flatten struct {
	// ConcurrentOps is librbd's rbd_concurrent_management_ops: object copy-ups in flight.
	ConcurrentOps int `yaml:"concurrent_ops"`
	// MinTimeLeft: no flatten starts when less of the window is left.
	MinTimeLeft Duration `yaml:"min_time_left"`
	// InUse is what to do with a clone another client has open (a running VM): skip or allow.
	InUse string `yaml:"in_use"`
	// Order lists the sort keys, most important first: depth (deepest chain first), age (oldest
	// first), size (smallest first).
	Order []string `yaml:"order"`
	// MaxPerWindow and MaxBytesPerWindow cap one window's work on this node; 0 = no cap.
	MaxPerWindow      int  `yaml:"max_per_window"`
	MaxBytesPerWindow Size `yaml:"max_bytes_per_window"`
	// MaxBytesPerSecond paces each flatten; 0 = librbd's own pace.
	MaxBytesPerSecond Size `yaml:"max_bytes_per_second"`
	// RetryAfter is how long a clone whose flatten failed waits before it is tried again; it
	// doubles with every further failure, up to a day.
	RetryAfter Duration `yaml:"retry_after"`
	// VerifyCopyups is when every clone's copy-ups are verified before its flatten: auto (only
	// with a librbd that lacks the fix of Ceph tracker 68998) or always.
	VerifyCopyups string `yaml:"verify_copyups"`
}

// Cleanup removes parent snapshots nobody needs any more (opt-in).
type Cleanup struct {
	// ParentSnapshots: once the last clone of a parent snapshot whose name matches
	// SnapshotPattern is flat, unprotect and remove that snapshot.
	ParentSnapshots bool   `yaml:"parent_snapshots"`
	SnapshotPattern string `yaml:"snapshot_pattern"`
}

// Gates are the safety checks made before each flatten and every CheckInterval during it.
type Gates struct {
	// Health: no flatten while HEALTH_ERR or any OSD or pool is full, nearfull or backfillfull.
	Health bool `yaml:"health"`
	// Recovery: no flatten while placement groups recover or backfill.
	Recovery bool `yaml:"recovery"`
	// SpaceFactor: the pool's MAX AVAIL must exceed the bytes left to copy times this (>= 1; the
	// space gate cannot be turned off: a full cluster makes a flatten hang).
	SpaceFactor   float64  `yaml:"space_factor"`
	CheckInterval Duration `yaml:"check_interval"`
}

// Discovery lists the sources of the clones this node owns.
type Discovery struct {
	Pools []PoolSource `yaml:"pools"`
	// Libvirt, when the section is present (even empty), turns the libvirt source on.
	Libvirt *LibvirtSource `yaml:"libvirt"`
	// Interval is how often, inside an open window, discovery runs again once a pass is over.
	Interval Duration `yaml:"interval"`
}

// PoolSource selects the clones of one pool (in its default namespace, or in Namespace) whose
// image-meta OwnerKey names this node or, with Shared, every clone there: a backlog any node
// works on while it holds the lock. Match, when set, is a regexp the image name must match.
type PoolSource struct {
	Pool      string `yaml:"pool"`
	Namespace string `yaml:"namespace"`
	OwnerKey  string `yaml:"owner_key"`
	Shared    bool   `yaml:"shared"`
	Match     string `yaml:"match"`
}

// LibvirtSource selects the clones made from the snapshots of the RBD disks of the domains
// libvirt defines on this host (and their clones in turn), and with IncludeVMDisks those disks
// themselves when they are clones.
type LibvirtSource struct {
	URI            string `yaml:"uri"`
	IncludeVMDisks bool   `yaml:"include_vm_disks"`
}

// DefaultLibvirtURI is discovery.libvirt.uri's default.
const DefaultLibvirtURI = libvirturi.Default

// Metrics says where Prometheus metrics are served.
type Metrics struct {
	// Listen is host:port for /metrics; empty turns the endpoint off.
	Listen string `yaml:"listen"`
}

// Log sets the logger.
type Log struct {
	Level  string `yaml:"level"`  // debug, info, warn, error
	Format string `yaml:"format"` // console or json
}

// Duration is a time.Duration written as "90s", "5h" or "2m30s" in YAML.
type Duration time.Duration

// D returns d as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// UnmarshalYAML parses a Go duration string. Errors are yaml.TypeErrors so that the decoder
// reports them together with the others, each with its line.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode {
		return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d: expected a duration such as 90s or 5h", n.Line)}}
	}
	v, err := time.ParseDuration(n.Value)
	if err != nil {
		return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d: %q is not a duration (use e.g. 90s, 15m, 5h)", n.Line, n.Value)}}
	}
	*d = Duration(v)
	return nil
}

// MarshalYAML writes d back in its string form.
func (d Duration) MarshalYAML() (any, error) { return time.Duration(d).String(), nil }

// Size is a byte count written as a whole number or with a binary unit: 500GiB, 2TiB, 64MiB.
type Size uint64

var sizeRE = regexp.MustCompile(`^(\d+)\s*(B|KiB|MiB|GiB|TiB|PiB)?$`)

// UnmarshalYAML parses a size; errors are yaml.TypeErrors, like Duration's.
func (s *Size) UnmarshalYAML(n *yaml.Node) error {
	m := sizeRE.FindStringSubmatch(strings.TrimSpace(n.Value))
	if n.Kind != yaml.ScalarNode || m == nil {
		return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d: %q is not a size (use e.g. 0, 64MiB, 500GiB, 2TiB)", n.Line, n.Value)}}
	}
	v, err := strconv.ParseUint(m[1], 10, 64)
	shift := map[string]uint{"": 0, "B": 0, "KiB": 10, "MiB": 20, "GiB": 30, "TiB": 40, "PiB": 50}[m[2]]
	if err != nil || v > (1<<63)>>shift {
		return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d: %q is too large", n.Line, n.Value)}}
	}
	*s = Size(v << shift)
	return nil
}

// Defaults returns the configuration used for every key the file leaves out.
func Defaults() Config {
	host, _ := os.Hostname()
	if i := strings.IndexByte(host, '.'); i > 0 {
		host = host[:i]
	}
	return Config{
		Node: host,
		Ceph: Ceph{Conf: "/etc/ceph/ceph.conf", User: "flattend", ConnectTimeout: Duration(30 * time.Second),
			OpTimeout: Duration(30 * time.Second)},
		Lock:    Lock{Pool: "rbd", Image: "flattend-lock", Slots: 1, CheckInterval: Duration(2 * time.Second)},
		Window:  Window{Schedule: "0 1 * * *", Duration: Duration(5 * time.Hour)},
		Backoff: Backoff{Min: Duration(2 * time.Second), Max: Duration(2 * time.Minute)},
		Flatten: Flatten{ConcurrentOps: 10, MinTimeLeft: Duration(5 * time.Minute), InUse: InUseSkip,
			Order: []string{"depth", "age", "size"}, RetryAfter: Duration(30 * time.Minute), VerifyCopyups: VerifyAuto},
		Gates:     Gates{Health: true, Recovery: true, SpaceFactor: 2, CheckInterval: Duration(15 * time.Second)},
		Discovery: Discovery{Interval: Duration(15 * time.Minute)},
		Log:       Log{Level: "info", Format: "console"},
		Metrics:   Metrics{Listen: "127.0.0.1:9478"},
	}
}

// flatten.in_use values.
const (
	InUseSkip  = "skip"
	InUseAllow = "allow"
)

// flatten.verify_copyups values.
const (
	VerifyAuto   = "auto"
	VerifyAlways = "always"
)

// OrderKeys are the keys flatten.order accepts.
var OrderKeys = []string{"depth", "age", "size"}
