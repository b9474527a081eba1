// Package metrics is flattend's Prometheus instrumentation: what the scheduler reports (flattens,
// bytes, lock waits, gates, discovery, the window) as flattend_* series on a registry of its own,
// served on /metrics. A nil *Metrics records nothing, so code and tests that do not care pass nil.
package metrics

import (
	"context"
	"errors"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Metrics holds every series.
type Metrics struct {
	reg *prometheus.Registry

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
}

// New makes the series, registered on a new registry with the Go and process collectors.
func New(node string) *Metrics {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	f := func(c prometheus.Collector) { reg.MustRegister(c) }
	constLabels := prometheus.Labels{"node": node}
	m := &Metrics{reg: reg}
	m.started = prometheus.NewCounter(prometheus.CounterOpts{Name: "flattend_flattens_started_total", ConstLabels: constLabels,
		Help: "Flattens started (resumed ones count again)."})
	m.ended = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "flattend_flattens_ended_total", ConstLabels: constLabels,
		Help: "Flattens ended, by result (flat, cancelled, failed) and reason (done, window, signal, gate, lock_lost, timeout, error)."},
		[]string{"result", "reason"})
	m.copied = prometheus.NewCounter(prometheus.CounterOpts{Name: "flattend_copied_bytes_total", ConstLabels: constLabels,
		Help: "Bytes of parent data copied into clones, estimated from object progress and the parent overlap."})
	m.duration = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "flattend_flatten_duration_seconds", ConstLabels: constLabels,
		Help:    "Duration of flattens that ended flat.",
		Buckets: prometheus.ExponentialBuckets(1, 2, 16)}) // 1 s .. 9 h
	m.lockWait = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "flattend_lock_wait_seconds", ConstLabels: constLabels,
		Help:    "Time from wanting the cluster-wide lock to holding it.",
		Buckets: prometheus.ExponentialBuckets(0.01, 4, 12)}) // 10 ms .. 12 h
	m.lockHeld = prometheus.NewGauge(prometheus.GaugeOpts{Name: "flattend_lock_held", ConstLabels: constLabels,
		Help: "1 while this node holds a slot of the cluster-wide lock."})
	m.progress = prometheus.NewGauge(prometheus.GaugeOpts{Name: "flattend_flatten_progress_ratio", ConstLabels: constLabels,
		Help: "Progress of the running flatten, 0..1 (0 when none runs)."})
	m.gateClosed = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "flattend_gate_closed_total", ConstLabels: constLabels,
		Help: "Times a safety gate refused or aborted a flatten, by gate (health, recovery, space)."}, []string{"gate"})
	m.discoveryTime = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "flattend_discovery_duration_seconds", ConstLabels: constLabels,
		Help:    "Duration of discovery passes.",
		Buckets: prometheus.ExponentialBuckets(0.01, 3, 12)})
	m.discovered = prometheus.NewGauge(prometheus.GaugeOpts{Name: "flattend_discovered_clones", ConstLabels: constLabels,
		Help: "Clones this node owns, as of the last discovery."})
	m.discoveryErrs = prometheus.NewCounter(prometheus.CounterOpts{Name: "flattend_discovery_failures_total", ConstLabels: constLabels,
		Help: "Discovery passes that failed."})
	m.passClones = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "flattend_pass_clones", ConstLabels: constLabels,
		Help: "Clones by outcome in the last pass (flattened, failed, skipped, left)."}, []string{"outcome"})
	m.windowOpen = prometheus.NewGauge(prometheus.GaugeOpts{Name: "flattend_window_open", ConstLabels: constLabels,
		Help: "1 while the flatten window is open."})
	m.lockLost = prometheus.NewCounter(prometheus.CounterOpts{Name: "flattend_lock_lost_total", ConstLabels: constLabels,
		Help: "Times this node lost a held lock (fenced, cut off) and reconnected."})
	m.buildInfo = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "flattend_build_info", ConstLabels: constLabels,
		Help: "Always 1: flattend's version and commit, and the Ceph version of the librbd it runs with."}, []string{"version", "revision", "librbd"})
	m.verified = prometheus.NewCounter(prometheus.CounterOpts{Name: "flattend_copyup_objects_verified_total", ConstLabels: constLabels,
		Help: "Objects looked up in RADOS before a flatten because the object map says they exist (librbd without the fix of Ceph tracker 68998)."})
	m.copiedUp = prometheus.NewCounter(prometheus.CounterOpts{Name: "flattend_lost_copyups_repaired_total", ConstLabels: constLabels,
		Help: "Objects an interrupted flatten had lost, copied up from the parent before the flatten."})
	for _, c := range []prometheus.Collector{m.started, m.ended, m.copied, m.duration, m.lockWait, m.lockHeld, m.progress,
		m.gateClosed, m.discoveryTime, m.discovered, m.discoveryErrs, m.passClones, m.windowOpen, m.lockLost,
		m.buildInfo, m.verified, m.copiedUp} {
		f(c)
	}
	for _, g := range []string{"health", "recovery", "space"} {
		m.gateClosed.WithLabelValues(g)
	}
	return m
}

// Handler serves the registry in the Prometheus text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg})
}

// Serve listens on addr and serves /metrics until ctx ends. It returns once listening (or with
// the listen error); the server stops when ctx is done.
func (m *Metrics) Serve(ctx context.Context, addr string) (net.Addr, <-chan error, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, nil, err
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", m.Handler())
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	done := make(chan error, 1)
	go func() {
		err := srv.Serve(ln)
		if errors.Is(err, http.ErrServerClosed) {
			err = nil
		}
		done <- err
	}()
	go func() {
		<-ctx.Done()
		shutdown, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(shutdown)
	}()
	return ln.Addr(), done, nil
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
