// Package metrics is flattend's Prometheus instrumentation: what the scheduler reports (flattens,
// bytes, lock waits, gates, discovery, the window) as flattend_* series on a registry of its own,
// served on /metrics. A nil *Metrics records nothing, so code and tests that do not care pass nil.
package metrics

import (
	"net/http"
	"regexp"
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Metrics holds every series.
type Metrics struct {
	reg   *prometheus.Registry
	names []string // every flattend_* family, for Names

	started       prometheus.Counter
	ended         *prometheus.CounterVec
	copied        prometheus.Counter
	duration      prometheus.Histogram
	lockWait      prometheus.Histogram
	lockHeld      prometheus.Gauge
	progress      prometheus.Gauge
	gateClosed    *prometheus.CounterVec
	discoveryTime prometheus.Histogram
	discovered    prometheus.Gauge
	discoveryErrs prometheus.Counter
	passClones    *prometheus.GaugeVec
	windowOpen    prometheus.Gauge
	lockLost      prometheus.Counter
	buildInfo     *prometheus.GaugeVec
	verified      prometheus.Counter
	copiedUp      prometheus.Counter

	backlogClones prometheus.Gauge
	backlogBytes  prometheus.Gauge
	passEnd       prometheus.Gauge
	passSuccess   prometheus.Gauge
	nextWindow    prometheus.Gauge
	failingClones prometheus.Gauge
	worstFailures prometheus.Gauge
}

// New makes the series, registered on a new registry with the Go and process collectors. The
// node's name is on one series, flattend_node_info, not on every series: the scrape's instance
// label identifies the node, and a join on it adds the name where a query wants it.
func New(node string) *Metrics {
	m := &Metrics{reg: prometheus.NewRegistry()}
	m.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m.started = register(m, prometheus.NewCounter(prometheus.CounterOpts{Name: "flattend_flattens_started_total",
		Help: "Flattens started (resumed ones count again)."}))
	m.ended = register(m, prometheus.NewCounterVec(prometheus.CounterOpts{Name: "flattend_flattens_ended_total",
		Help: "Flattens ended, by result (flat, cancelled, failed) and reason (done, window, gate, lock_lost, stopped: a signal or once --timeout, error)."},
		[]string{"result", "reason"}))
	m.copied = register(m, prometheus.NewCounter(prometheus.CounterOpts{Name: "flattend_copied_bytes_total",
		Help: "Bytes of parent data copied into clones, estimated from object progress and the parent overlap."}))
	m.duration = register(m, prometheus.NewHistogram(prometheus.HistogramOpts{Name: "flattend_flatten_duration_seconds",
		Help:    "Duration of flattens that ended flat.",
		Buckets: prometheus.ExponentialBuckets(1, 2, 16)})) // 1 s .. 9 h
	m.lockWait = register(m, prometheus.NewHistogram(prometheus.HistogramOpts{Name: "flattend_lock_wait_seconds",
		Help:    "Time from wanting the cluster-wide lock to holding it.",
		Buckets: prometheus.ExponentialBuckets(0.01, 4, 12)})) // 10 ms .. 12 h
	m.lockHeld = register(m, prometheus.NewGauge(prometheus.GaugeOpts{Name: "flattend_lock_held",
		Help: "1 while this node holds a slot of the cluster-wide lock."}))
	m.progress = register(m, prometheus.NewGauge(prometheus.GaugeOpts{Name: "flattend_flatten_progress_ratio",
		Help: "Progress of the running flatten, 0..1 (0 when none runs)."}))
	m.gateClosed = register(m, prometheus.NewCounterVec(prometheus.CounterOpts{Name: "flattend_gate_closed_total",
		Help: "Times a safety gate refused or aborted a flatten, by gate (health, recovery, space)."}, []string{"gate"}))
	m.discoveryTime = register(m, prometheus.NewHistogram(prometheus.HistogramOpts{Name: "flattend_discovery_duration_seconds",
		Help:    "Duration of discovery passes.",
		Buckets: prometheus.ExponentialBuckets(0.01, 3, 12)}))
	m.discovered = register(m, prometheus.NewGauge(prometheus.GaugeOpts{Name: "flattend_discovered_clones",
		Help: "Clones this node owns, as of the last discovery."}))
	m.discoveryErrs = register(m, prometheus.NewCounter(prometheus.CounterOpts{Name: "flattend_discovery_failures_total",
		Help: "Discovery passes that failed."}))
	m.passClones = register(m, prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "flattend_pass_clones",
		Help: "Clones by outcome in the last pass (flattened, failed, skipped, left)."}, []string{"outcome"}))
	m.windowOpen = register(m, prometheus.NewGauge(prometheus.GaugeOpts{Name: "flattend_window_open",
		Help: "1 while the flatten window is open."}))
	m.lockLost = register(m, prometheus.NewCounter(prometheus.CounterOpts{Name: "flattend_lock_lost_total",
		Help: "Times this node lost a held lock (fenced, cut off) and reconnected."}))
	m.buildInfo = register(m, prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "flattend_build_info",
		Help: "Always 1: flattend's version and commit, and the Ceph version of the librbd it runs with."}, []string{"version", "revision", "librbd"}))
	m.verified = register(m, prometheus.NewCounter(prometheus.CounterOpts{Name: "flattend_copyup_objects_verified_total",
		Help: "Objects looked up in RADOS before a flatten because the object map says they exist (librbd without the fix of Ceph tracker 68998)."}))
	m.copiedUp = register(m, prometheus.NewCounter(prometheus.CounterOpts{Name: "flattend_lost_copyups_repaired_total",
		Help: "Objects an interrupted flatten had lost, copied up from the parent before the flatten."}))
	m.backlogClones = register(m, prometheus.NewGauge(prometheus.GaugeOpts{Name: "flattend_backlog_clones",
		Help: "Clones of this node still to flatten: the last discovery's, less those flattened since."}))
	m.backlogBytes = register(m, prometheus.NewGauge(prometheus.GaugeOpts{Name: "flattend_backlog_bytes",
		Help: "Bytes the backlog's flattens would copy at most (their parent overlaps)."}))
	m.passEnd = register(m, prometheus.NewGauge(prometheus.GaugeOpts{Name: "flattend_last_pass_end_timestamp_seconds",
		Help: "When the last pass ended, however it ended (0: none yet)."}))
	m.passSuccess = register(m, prometheus.NewGauge(prometheus.GaugeOpts{Name: "flattend_last_pass_success_timestamp_seconds",
		Help: "When the last pass without a failure ended: discovery worked and no clone failed (0: none yet)."}))
	m.nextWindow = register(m, prometheus.NewGauge(prometheus.GaugeOpts{Name: "flattend_next_window_open_timestamp_seconds",
		Help: "When the window opens next, after the open one if it is open (0: never again)."}))
	m.failingClones = register(m, prometheus.NewGauge(prometheus.GaugeOpts{Name: "flattend_failing_clones",
		Help: "Clones of the last discovery whose last flatten failed."}))
	m.worstFailures = register(m, prometheus.NewGauge(prometheus.GaugeOpts{Name: "flattend_clone_consecutive_failures_max",
		Help: "The most consecutive failures of one clone among the last discovery's (0: none failing); /status names them."}))
	info := register(m, prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "flattend_node_info",
		Help: "Always 1: the node name this daemon works for (node: in its config); join on instance."}, []string{"node"}))
	info.WithLabelValues(node).Set(1)
	for _, g := range []string{"health", "recovery", "space"} {
		m.gateClosed.WithLabelValues(g)
	}
	return m
}

// register registers c on m's registry and remembers its name for Names.
func register[C prometheus.Collector](m *Metrics, c C) C {
	m.reg.MustRegister(c)
	ch := make(chan *prometheus.Desc, 1)
	c.Describe(ch) // one Desc per collector made above
	m.names = append(m.names, descName.FindStringSubmatch((<-ch).String())[1])
	return c
}

// descName finds the name in a Desc's String(), which has no accessor.
var descName = regexp.MustCompile(`fqName: "([^"]+)"`)

// Names lists the flattend_* metric families (without the _bucket, _sum and _count series of
// histograms), for the tests that check the shipped rules and dashboard use only these.
func (m *Metrics) Names() []string { return slices.Clone(m.names) }

// Handler serves the registry in the Prometheus text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg})
}

// FlattenStarted counts a start.
func (m *Metrics) FlattenStarted() {
	if m != nil {
		m.started.Inc()
		m.progress.Set(0)
	}
}

// FlattenEnded counts an end; took is observed for flat results.
func (m *Metrics) FlattenEnded(result, reason string, took time.Duration) {
	if m == nil {
		return
	}
	m.ended.WithLabelValues(result, reason).Inc()
	m.progress.Set(0)
	if result == "flat" {
		m.duration.Observe(took.Seconds())
	}
}

// Progress sets the running flatten's progress and adds newly copied bytes.
func (m *Metrics) Progress(ratio float64, copiedBytes uint64) {
	if m != nil {
		m.progress.Set(ratio)
		m.copied.Add(float64(copiedBytes))
	}
}

// LockAcquired observes a wait and marks the lock held.
func (m *Metrics) LockAcquired(waited time.Duration) {
	if m != nil {
		m.lockWait.Observe(waited.Seconds())
		m.lockHeld.Set(1)
	}
}

// LockReleased marks the lock free; lost counts a loss.
func (m *Metrics) LockReleased(lost bool) {
	if m != nil {
		m.lockHeld.Set(0)
		if lost {
			m.lockLost.Inc()
		}
	}
}

// GateClosed counts a refusal by gate.
func (m *Metrics) GateClosed(gate string) {
	if m != nil {
		m.gateClosed.WithLabelValues(gate).Inc()
	}
}

// Discovered records a discovery pass; err != nil counts a failure.
func (m *Metrics) Discovered(clones int, took time.Duration, err error) {
	if m == nil {
		return
	}
	m.discoveryTime.Observe(took.Seconds())
	if err != nil {
		m.discoveryErrs.Inc()
		return
	}
	m.discovered.Set(float64(clones))
}

// Pass records the outcome counts of a pass.
func (m *Metrics) Pass(flattened, failed, skipped, left int) {
	if m == nil {
		return
	}
	m.passClones.WithLabelValues("flattened").Set(float64(flattened))
	m.passClones.WithLabelValues("failed").Set(float64(failed))
	m.passClones.WithLabelValues("skipped").Set(float64(skipped))
	m.passClones.WithLabelValues("left").Set(float64(left))
}

// WindowOpen sets whether the window is open.
func (m *Metrics) WindowOpen(open bool) {
	if m != nil {
		v := 0.0
		if open {
			v = 1
		}
		m.windowOpen.Set(v)
	}
}

// CopyupsVerified counts a verification before a flatten: objects looked up, objects copied up.
func (m *Metrics) CopyupsVerified(checked, copiedUp int) {
	if m != nil {
		m.verified.Add(float64(checked))
		m.copiedUp.Add(float64(copiedUp))
	}
}

// BuildInfo sets flattend_build_info, so that a mixed fleet shows in one query.
func (m *Metrics) BuildInfo(version, revision, librbd string) {
	if m != nil {
		m.buildInfo.WithLabelValues(version, revision, librbd).Set(1)
	}
}

// Backlog sets what is left to flatten: clones and the bytes their flattens would copy.
func (m *Metrics) Backlog(clones int, bytes uint64) {
	if m != nil {
		m.backlogClones.Set(float64(clones))
		m.backlogBytes.Set(float64(bytes))
	}
}

// PassEnded records the end of a pass at t; ok says it had no failure.
func (m *Metrics) PassEnded(t time.Time, ok bool) {
	if m == nil {
		return
	}
	m.passEnd.Set(unix(t))
	if ok {
		m.passSuccess.Set(unix(t))
	}
}

// NextWindowOpen sets when the window opens next (zero: never).
func (m *Metrics) NextWindowOpen(t time.Time) {
	if m != nil {
		m.nextWindow.Set(unix(t))
	}
}

// CloneFailures sets how many clones are failing and the most consecutive failures of one.
func (m *Metrics) CloneFailures(failing, worst int) {
	if m != nil {
		m.failingClones.Set(float64(failing))
		m.worstFailures.Set(float64(worst))
	}
}

// unix is t in Unix seconds, 0 for the zero time.
func unix(t time.Time) float64 {
	if t.IsZero() {
		return 0
	}
	return float64(t.UnixNano()) / 1e9
}
