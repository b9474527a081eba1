package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
	"time"

	sd "github.com/coreos/go-systemd/v22/daemon"
	"go.uber.org/zap"

	"github.com/flattend/flattend/internal/config"
	"github.com/flattend/flattend/internal/flattener"
	"github.com/flattend/flattend/internal/metrics"
	"github.com/flattend/flattend/internal/scheduler"
)

// runDaemon is `flattend run`: it connects, then works in every window until SIGTERM.
func runDaemon(ctx context.Context, e *env, _ options) int {
	m := metrics.New(e.cfg.Node)
	m.BuildInfo(version, revision(), flattener.CephVersion())
	sched, code := startScheduler(e, schedulerExtras{metrics: m})
	if sched == nil {
		return code
	}
	defer closeScheduler(sched)
	return daemon(ctx, e, sched, m)
}

// daemon is `flattend run` once connected: it serves metrics, tells systemd it is ready, feeds
// the watchdog while the main loop makes progress, reloads the config on SIGHUP and works in every
// window until ctx ends (SIGTERM).
func daemon(ctx context.Context, e *env, sched *scheduler.Scheduler, m *metrics.Metrics) int {
	if listen := e.cfg.Metrics.Listen; listen != "" {
		addr, served, err := m.Serve(ctx, listen, endpoints(sched))
		if err != nil {
			e.log.Error("cannot serve metrics (metrics.listen)", zap.String("listen", listen), zap.Error(err))
			return exitFailure
		}
		e.log.Info("serving metrics", zap.String("url", "http://"+addr.String()+"/metrics"))
		defer func() { <-served }()
	}

	// READY once the config is valid and Ceph reachable (Connect succeeded); harmless without systemd.
	_, _ = sd.SdNotify(false, sd.SdNotifyReady)
	defer func() { _, _ = sd.SdNotify(false, sd.SdNotifyStopping) }()

	wctx, stopWatchdog := context.WithCancel(ctx)
	watchdogDone, statusDone := make(chan struct{}), make(chan struct{})
	go func() { defer close(watchdogDone); feedWatchdog(wctx, sched, e.log) }()
	go func() { defer close(statusDone); reportStatus(wctx, sched) }()
	defer func() { stopWatchdog(); <-watchdogDone; <-statusDone }()

	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	reloadDone := make(chan struct{})
	go func() { defer close(reloadDone); reloadOnHangup(ctx, hup, e, sched, m) }()

	err := sched.Run(ctx)
	<-reloadDone // Run returns only once ctx is done
	if err != nil {
		e.log.Error("stopped", zap.Error(err))
		return exitCode(err)
	}
	return exitOK
}

// endpoints are /healthz and /status: /healthz fails once the main loop stalls as long as the
// watchdog allows (WatchdogSec=, or the unit's 5 min without systemd's).
func endpoints(sched *scheduler.Scheduler) metrics.Endpoints {
	limit, err := sd.SdWatchdogEnabled(false)
	if err != nil || limit <= 0 {
		limit = 5 * time.Minute
	}
	return metrics.Endpoints{Stalled: sched.Stalled, StallLimit: limit, Status: func() any { return sched.Report() }}
}

// reloadOnHangup reloads the config at every SIGHUP until ctx ends.
func reloadOnHangup(ctx context.Context, hup <-chan os.Signal, e *env, sched *scheduler.Scheduler, m *metrics.Metrics) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
			reloadConfig(e, sched, m)
		}
	}
}

// reportStatus keeps systemd's status line (`systemctl status flattend`) on what the scheduler
// is doing: the window, the pass, the clone being flattened and how far it got.
func reportStatus(ctx context.Context, sched *scheduler.Scheduler) {
	t := time.NewTicker(2 * time.Second)
	defer t.Stop()
	last := ""
	for {
		if st := sched.State(); st != last {
			_, _ = sd.SdNotify(false, "STATUS="+st)
			last = st
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// feedWatchdog pings systemd's watchdog (WatchdogSec= in the unit) while the main loop makes
// progress: a Ceph call that never returns, or a flatten without progress, for a whole watchdog
// period stops the pings, and systemd restarts the daemon. Its lock is then taken over by the
// next node after the watch timeout, and the flatten resumes later.
func feedWatchdog(ctx context.Context, sched *scheduler.Scheduler, log *zap.Logger) {
	period, err := sd.SdWatchdogEnabled(false)
	if err != nil || period <= 0 {
		return
	}
	watchdog(ctx, period, sched.Stalled, func() { _, _ = sd.SdNotify(false, sd.SdNotifyWatchdog) }, log)
}

// watchdog calls ping every period/3 while stalled() stays under period, until ctx ends.
func watchdog(ctx context.Context, period time.Duration, stalled func() time.Duration, ping func(), log *zap.Logger) {
	t := time.NewTicker(period / 3)
	defer t.Stop()
	warned := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if stall := stalled(); stall >= period {
			if !warned {
				log.Error("the main loop made no progress for a whole watchdog period: not feeding the watchdog",
					zap.Duration("stalled", stall), zap.Duration("watchdog", period))
				warned = true
			}
			continue
		}
		warned = false
		ping()
	}
}

// reloadConfig reads the config file again. An invalid file changes nothing; a valid one is
// handed to the scheduler, which applies it between two flattens (a held lock is not dropped).
func reloadConfig(e *env, sched *scheduler.Scheduler, m *metrics.Metrics) {
	log := e.log
	old := e.current.Load()
	// One datagram: systemd ≥ 253 (Type=notify-reload) takes RELOADING=1 only with the
	// monotonic time the reload started at; older versions ignore MONOTONIC_USEC.
	_, _ = sd.SdNotify(false, sd.SdNotifyReloading+"\n"+sd.SdNotifyMonotonicUsec())
	defer func() { _, _ = sd.SdNotify(false, sd.SdNotifyReady) }()
	cfg, err := config.Load(old.Path)
	if err != nil {
		log.Error("configuration reload rejected, keeping the running one", zap.String("file", old.Path), zap.Error(err))
		return
	}
	if cfg.Log.Format != old.Log.Format || cfg.Metrics != old.Metrics {
		log.Warn("log.format and metrics.listen change only with a restart")
	}
	if err := e.level.UnmarshalText([]byte(cfg.Log.Level)); err != nil {
		log.Error("configuration reload: log.level", zap.Error(err)) // validated already: cannot happen
	}
	reconnect := cfg.Ceph != old.Ceph || cfg.Flatten.ConcurrentOps != old.Flatten.ConcurrentOps
	e.current.Store(cfg)
	reloadScheduler(sched, cfg, schedulerExtras{metrics: m, reconnect: reconnect}, log)
	log.Info("configuration reload accepted; it applies between two flattens", zap.String("file", cfg.Path),
		zap.Bool("reconnect", reconnect))
}
