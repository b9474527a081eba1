// Package config loads and validates flattend's YAML configuration. Every error it returns names
// the place it comes from, as "file:line: field: problem", so an operator can fix it at once.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/robfig/cron/v3"
	"gopkg.in/yaml.v3"
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
}

// Ceph says how to reach the cluster.
type Ceph struct {
	Conf           string   `yaml:"conf"`
	User           string   `yaml:"user"`    // cephx id: client.<user>
	Keyring        string   `yaml:"keyring"` // empty: whatever ceph.conf says
	ConnectTimeout Duration `yaml:"connect_timeout"`
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
const DefaultLibvirtURI = "qemu:///system"

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

// minBytesPerSecond keeps the pause a paced flatten makes per object (4 MiB by default) short:
// it blocks a librbd thread that the lock image's connection shares.
const minBytesPerSecond = 1 << 20

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
		Node:    host,
		Ceph:    Ceph{Conf: "/etc/ceph/ceph.conf", User: "flattend", ConnectTimeout: Duration(30 * time.Second)},
		Lock:    Lock{Pool: "rbd", Image: "flattend-lock", Slots: 1, CheckInterval: Duration(2 * time.Second)},
		Window:  Window{Schedule: "0 1 * * *", Duration: Duration(5 * time.Hour)},
		Backoff: Backoff{Min: Duration(2 * time.Second), Max: Duration(2 * time.Minute)},
		Flatten: Flatten{ConcurrentOps: 10, MinTimeLeft: Duration(5 * time.Minute), InUse: InUseSkip,
			Order: []string{"depth", "age", "size"}, RetryAfter: Duration(30 * time.Minute)},
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

// OrderKeys are the keys flatten.order accepts.
var OrderKeys = []string{"depth", "age", "size"}

// Error is a configuration error at a place in a file.
type Error struct {
	File  string
	Line  int    // 0 when the problem is the file as a whole
	Field string // dotted path, empty when unknown
	Msg   string
}

func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString(e.File)
	if e.Line > 0 {
		b.WriteString(":" + strconv.Itoa(e.Line))
	}
	b.WriteString(": ")
	if e.Field != "" {
		b.WriteString(e.Field + ": ")
	}
	b.WriteString(e.Msg)
	return b.String()
}

// Errors is every problem found in one file, in file order.
type Errors []*Error

func (es Errors) Error() string {
	msgs := make([]string, len(es))
	for i, e := range es {
		msgs[i] = e.Error()
	}
	return strings.Join(msgs, "\n")
}

// Load reads, decodes (strictly: unknown keys are errors), fills in defaults and validates path.
// Any error is a config.Errors.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		var msg string
		switch {
		case errors.Is(err, os.ErrNotExist):
			msg = "no such file (write one; see config.example.yaml)"
		case errors.Is(err, os.ErrPermission):
			msg = "permission denied"
		default:
			msg = err.Error()
		}
		return nil, Errors{{File: path, Msg: msg}}
	}
	return Parse(path, data)
}

var yamlLine = regexp.MustCompile(`^(?:yaml: )?line (\d+): (.*)$`)

// Parse is Load on bytes already read; path only names them in errors.
func Parse(path string, data []byte) (*Config, error) {
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return nil, Errors{yamlError(path, err.Error(), nil)}
	}
	places := map[string]int{}
	lineFields := map[int]string{}
	if len(root.Content) > 0 {
		doc := root.Content[0]
		if doc.Kind != yaml.MappingNode {
			return nil, Errors{{File: path, Line: doc.Line, Msg: "the configuration must be a mapping of keys (node:, ceph:, lock: …)"}}
		}
		walk(doc, "", places, lineFields)
	}

	cfg := Defaults()
	if len(bytes.TrimSpace(data)) > 0 {
		dec := yaml.NewDecoder(bytes.NewReader(data))
		dec.KnownFields(true)
		if err := dec.Decode(&cfg); err != nil {
			var te *yaml.TypeError
			if errors.As(err, &te) {
				var es Errors
				for _, m := range te.Errors {
					es = append(es, yamlError(path, m, lineFields))
				}
				return nil, es
			}
			return nil, Errors{yamlError(path, err.Error(), lineFields)}
		}
	}
	cfg.Path = path
	for i := range cfg.Discovery.Pools {
		if _, set := places[fmt.Sprintf("discovery.pools[%d].owner_key", i)]; !set && !cfg.Discovery.Pools[i].Shared {
			cfg.Discovery.Pools[i].OwnerKey = DefaultOwnerKey
		}
	}
	if _, on := places["discovery.libvirt"]; on && cfg.Discovery.Libvirt == nil {
		cfg.Discovery.Libvirt = &LibvirtSource{} // `libvirt:` with nothing under it
	}
	if l := cfg.Discovery.Libvirt; l != nil && l.URI == "" {
		l.URI = DefaultLibvirtURI
	}
	if es := cfg.validate(places); len(es) > 0 {
		return nil, es
	}
	return &cfg, nil
}

// walk records the line of every key path ("lock.pool", "discovery.pools[0].pool") and, per
// line, the path of the value that stands on it, so decoder errors can name their field.
func walk(n *yaml.Node, path string, places map[string]int, lineFields map[int]string) {
	switch n.Kind {
	case yaml.MappingNode:
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			p := k.Value
			if path != "" {
				p = path + "." + k.Value
			}
			places[p] = k.Line
			lineFields[k.Line] = p
			if v.Line != k.Line {
				lineFields[v.Line] = p
			}
			walk(v, p, places, lineFields)
		}
	case yaml.SequenceNode:
		for i, v := range n.Content {
			p := fmt.Sprintf("%s[%d]", path, i)
			places[p] = v.Line
			if _, ok := lineFields[v.Line]; !ok {
				lineFields[v.Line] = p
			}
			walk(v, p, places, lineFields)
		}
	}
}

var notFoundInType = regexp.MustCompile(`^field (\S+) not found in type \S+$`)
var cannotUnmarshal = regexp.MustCompile("^cannot unmarshal !!(\\w+) `(.*)` into (\\S+)$")

// yamlError turns a yaml.v3 message ("line 7: field x not found in type ...") into an Error.
func yamlError(path, msg string, lineFields map[int]string) *Error {
	e := &Error{File: path, Msg: msg}
	if m := yamlLine.FindStringSubmatch(msg); m != nil {
		e.Line, _ = strconv.Atoi(m[1])
		e.Msg = m[2]
		if !strings.Contains(e.Msg, "already defined") {
			e.Field = lineFields[e.Line]
		}
	}
	e.Msg = strings.TrimPrefix(e.Msg, "yaml: ")
	if m := notFoundInType.FindStringSubmatch(e.Msg); m != nil {
		e.Msg = fmt.Sprintf("unknown key %q", m[1])
	} else if m := cannotUnmarshal.FindStringSubmatch(e.Msg); m != nil {
		want := m[3]
		switch {
		case strings.HasPrefix(want, "[]"):
			want = "a list"
		case strings.HasPrefix(want, "config."), strings.HasPrefix(want, "map"):
			want = "a mapping of keys"
		case strings.HasPrefix(want, "int"):
			want = "a whole number"
		}
		e.Msg = fmt.Sprintf("%q is a %s, expected %s", m[2], yamlKind(m[1]), want)
	}
	return e
}

func yamlKind(tag string) string {
	switch tag {
	case "str":
		return "string"
	case "seq":
		return "list"
	case "map":
		return "mapping"
	case "float":
		return "number"
	}
	return tag
}

var (
	imageName = regexp.MustCompile(`^[^/@\s]+$`)
	poolName  = regexp.MustCompile(`^[^/@\s]+$`)
	metaKey   = regexp.MustCompile(`^[A-Za-z0-9._-]+$`)
)

func (c *Config) validate(places map[string]int) Errors {
	var es Errors
	bad := func(field, format string, args ...any) {
		line := places[field]
		for p := field; line == 0 && p != ""; {
			i := strings.LastIndexAny(p, ".[")
			if i < 0 {
				break
			}
			p = p[:i]
			line = places[p]
		}
		es = append(es, &Error{File: c.Path, Line: line, Field: field, Msg: fmt.Sprintf(format, args...)})
	}

	if c.Node == "" {
		bad("node", "must not be empty (default: the host name)")
	} else if !metaKey.MatchString(c.Node) {
		bad("node", "%q: use letters, digits, '.', '_' and '-' only", c.Node)
	}
	if c.Ceph.Conf == "" {
		bad("ceph.conf", "must name a ceph.conf file")
	}
	if c.Ceph.User == "" || strings.HasPrefix(c.Ceph.User, "client.") {
		bad("ceph.user", "%q: give the cephx id without \"client.\" (e.g. flattend)", c.Ceph.User)
	}
	if c.Ceph.ConnectTimeout <= 0 {
		bad("ceph.connect_timeout", "must be positive, got %s", c.Ceph.ConnectTimeout.D())
	}
	if !poolName.MatchString(c.Lock.Pool) {
		bad("lock.pool", "%q is not a pool name", c.Lock.Pool)
	}
	if !imageName.MatchString(c.Lock.Image) {
		bad("lock.image", "%q is not an image name", c.Lock.Image)
	}
	if c.Lock.Slots < 1 || c.Lock.Slots > 64 {
		bad("lock.slots", "%d is out of range 1..64", c.Lock.Slots)
	}
	if c.Lock.CheckInterval <= 0 {
		bad("lock.check_interval", "must be positive, got %s", c.Lock.CheckInterval.D())
	}
	if _, err := cron.ParseStandard(c.Window.Schedule); err != nil {
		bad("window.schedule", "%q is not a 5-field cron schedule: %v", c.Window.Schedule, err)
	}
	if c.Window.Duration <= 0 {
		bad("window.duration", "must be positive, got %s", c.Window.Duration.D())
	}
	if c.Backoff.Min <= 0 {
		bad("backoff.min", "must be positive, got %s", c.Backoff.Min.D())
	}
	if c.Backoff.Max < c.Backoff.Min {
		bad("backoff.max", "%s is less than backoff.min (%s)", c.Backoff.Max.D(), c.Backoff.Min.D())
	}
	if c.Flatten.ConcurrentOps < 1 || c.Flatten.ConcurrentOps > 1024 {
		bad("flatten.concurrent_ops", "%d is out of range 1..1024", c.Flatten.ConcurrentOps)
	}
	if r := c.Flatten.MaxBytesPerSecond; r != 0 && r < minBytesPerSecond {
		bad("flatten.max_bytes_per_second", "%d is below the minimum of 1MiB (0: no cap)", r)
	}
	if c.Flatten.MinTimeLeft < 0 {
		bad("flatten.min_time_left", "must not be negative, got %s", c.Flatten.MinTimeLeft.D())
	}
	if c.Flatten.InUse != InUseSkip && c.Flatten.InUse != InUseAllow {
		bad("flatten.in_use", "%q: use skip or allow", c.Flatten.InUse)
	}
	seenKey := map[string]bool{}
	for i, k := range c.Flatten.Order {
		field := fmt.Sprintf("flatten.order[%d]", i)
		switch {
		case !slices.Contains(OrderKeys, k):
			bad(field, "%q: use depth, age or size", k)
		case seenKey[k]:
			bad(field, "%q is listed twice", k)
		}
		seenKey[k] = true
	}
	if c.Flatten.MaxPerWindow < 0 {
		bad("flatten.max_per_window", "must not be negative, got %d", c.Flatten.MaxPerWindow)
	}
	if c.Flatten.RetryAfter <= 0 {
		bad("flatten.retry_after", "must be positive, got %s", c.Flatten.RetryAfter.D())
	}
	if !(c.Gates.SpaceFactor >= 1 && c.Gates.SpaceFactor <= 100) {
		bad("gates.space_factor", "%g is out of range 1..100 (the space gate cannot be turned off)", c.Gates.SpaceFactor)
	}
	if c.Cleanup.SnapshotPattern != "" {
		if _, err := regexp.Compile(c.Cleanup.SnapshotPattern); err != nil {
			bad("cleanup.snapshot_pattern", "%q is not a regular expression: %v", c.Cleanup.SnapshotPattern, err)
		}
	} else if c.Cleanup.ParentSnapshots {
		bad("cleanup.snapshot_pattern", "required with cleanup.parent_snapshots: true (a regular expression on snapshot names, e.g. ^snapshot-)")
	}
	if c.Gates.CheckInterval <= 0 {
		bad("gates.check_interval", "must be positive, got %s", c.Gates.CheckInterval.D())
	}
	if len(c.Discovery.Pools) == 0 && c.Discovery.Libvirt == nil {
		bad("discovery.pools", "list at least one pool to look for this node's clones in, or add a discovery.libvirt section")
	}
	for i, p := range c.Discovery.Pools {
		field := fmt.Sprintf("discovery.pools[%d]", i)
		if !poolName.MatchString(p.Pool) {
			bad(field+".pool", "%q is not a pool name", p.Pool)
		}
		if p.Namespace != "" && !poolName.MatchString(p.Namespace) {
			bad(field+".namespace", "%q is not a namespace name", p.Namespace)
		}
		if _, set := places[field+".owner_key"]; set && p.Shared {
			bad(field+".owner_key", "a shared pool (shared: true) has no owner: remove owner_key or shared")
		} else if !p.Shared && !metaKey.MatchString(p.OwnerKey) {
			bad(field+".owner_key", "%q is not an image-meta key", p.OwnerKey)
		}
		if _, err := regexp.Compile(p.Match); err != nil {
			bad(field+".match", "%q is not a regular expression: %v", p.Match, err)
		}
	}
	if l := c.Discovery.Libvirt; l != nil {
		if msg := libvirtURIProblem(l.URI); msg != "" {
			bad("discovery.libvirt.uri", "%q: %s", l.URI, msg)
		}
	}
	if c.Discovery.Interval <= 0 {
		bad("discovery.interval", "must be positive, got %s", c.Discovery.Interval.D())
	}
	if c.Metrics.Listen != "" {
		if _, port, err := net.SplitHostPort(c.Metrics.Listen); err != nil {
			bad("metrics.listen", "%q: want host:port (e.g. 127.0.0.1:9478), or \"\" to turn metrics off", c.Metrics.Listen)
		} else if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
			bad("metrics.listen", "%q: %q is not a port number", c.Metrics.Listen, port)
		}
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		bad("log.level", "%q: use debug, info, warn or error", c.Log.Level)
	}
	switch c.Log.Format {
	case "console", "json":
	default:
		bad("log.format", "%q: use console or json", c.Log.Format)
	}
	return es
}

// libvirtURIProblem says what is wrong with a discovery.libvirt.uri, or "" if nothing is: only
// the local QEMU drivers, as virsh spells them, with an optional socket=PATH.
func libvirtURIProblem(uri string) string {
	u, err := url.Parse(uri)
	switch {
	case err != nil:
		return "not a URI"
	case u.Scheme != "qemu" && u.Scheme != "qemu+unix":
		return "use a local qemu URI: qemu:///system or qemu:///session, optionally with ?socket=PATH"
	case u.Host != "" || u.User != nil:
		return "remote hosts are not supported: flattend reads the VMs of its own host"
	case u.Path != "/system" && u.Path != "/session":
		return "use qemu:///system or qemu:///session"
	}
	for k, v := range u.Query() {
		if k != "socket" || len(v) != 1 || !strings.HasPrefix(v[0], "/") {
			return "the only parameter supported is socket=/absolute/path"
		}
	}
	return ""
}
