package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/ceph/go-ceph/rados"
	sd "github.com/coreos/go-systemd/v22/daemon"
	"go.uber.org/zap"

	"github.com/flattend/flattend/internal/config"
	"github.com/flattend/flattend/internal/discovery"
	"github.com/flattend/flattend/internal/lock"
	"github.com/flattend/flattend/internal/metrics"
	"github.com/flattend/flattend/internal/rbdimage"
	"github.com/flattend/flattend/internal/scheduler"
)

// daemon is `flattend run` once connected: it serves metrics, tells systemd it is ready, feeds
// the watchdog while flattens make progress, reloads the config on SIGHUP and works in every
// window until ctx ends (SIGTERM).
func daemon(ctx context.Context, cfg *config.Config, current *atomic.Pointer[config.Config], level zap.AtomicLevel,
	sched *scheduler.Scheduler, m *metrics.Metrics, log *zap.Logger) int {
	if cfg.Metrics.Listen != "" {
		addr, served, err := m.Serve(ctx, cfg.Metrics.Listen)
		if err != nil {
			log.Error("cannot serve metrics (metrics.listen)", zap.String("listen", cfg.Metrics.Listen), zap.Error(err))
			return exitFailure
		}
		log.Info("serving metrics", zap.String("url", "http://"+addr.String()+"/metrics"))
		defer func() { <-served }()
	}

	// READY once the config is valid and Ceph reachable (Connect succeeded); harmless without systemd.
	_, _ = sd.SdNotify(false, sd.SdNotifyReady)
	defer func() { _, _ = sd.SdNotify(false, sd.SdNotifyStopping) }()

	wctx, stopWatchdog := context.WithCancel(ctx)
	watchdogDone, statusDone := make(chan struct{}), make(chan struct{})
	go func() { defer close(watchdogDone); feedWatchdog(wctx, sched, log) }()
	go func() { defer close(statusDone); reportStatus(wctx, sched) }()
	defer func() { stopWatchdog(); <-watchdogDone; <-statusDone }()

	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	reloadDone := make(chan struct{})
	go func() { // ends with ctx
		defer close(reloadDone)
		for {
			select {
			case <-ctx.Done():
				return
			case <-hup:
				reloadConfig(current, level, sched, m, log)
			}
		}
	}()

	err := sched.Run(ctx)
	<-reloadDone // Run returns only once ctx is done
	if err != nil {
		log.Error("stopped", zap.Error(err))
		return exitCode(err)
	}
	return exitOK
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

// feedWatchdog pings systemd's watchdog (WatchdogSec= in the unit) while the daemon is alive: a
// flatten that has made no progress for a whole watchdog period (librbd hung) stops the pings,
// and systemd restarts the daemon. Its lock is then taken over by the next node after the watch
// timeout, and the flatten resumes later.
func feedWatchdog(ctx context.Context, sched *scheduler.Scheduler, log *zap.Logger) {
	period, err := sd.SdWatchdogEnabled(false)
	if err != nil || period <= 0 {
		return
	}
	t := time.NewTicker(period / 3)
	defer t.Stop()
	warned := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if stall := sched.Stalled(); stall >= period {
			if !warned {
				log.Error("flatten made no progress for a whole watchdog period: not feeding the watchdog",
					zap.Duration("stalled", stall), zap.Duration("watchdog", period))
				warned = true
			}
			continue
		}
		warned = false
		_, _ = sd.SdNotify(false, sd.SdNotifyWatchdog)
	}
}

// reloadConfig reads the config file again. An invalid file changes nothing; a valid one is
// handed to the scheduler, which applies it between two flattens (a held lock is not dropped).
func reloadConfig(current *atomic.Pointer[config.Config], level zap.AtomicLevel, sched *scheduler.Scheduler, m *metrics.Metrics, log *zap.Logger) {
	old := current.Load()
	_, _ = sd.SdNotify(false, sd.SdNotifyReloading)
	defer func() { _, _ = sd.SdNotify(false, sd.SdNotifyReady) }()
	cfg, err := config.Load(old.Path)
	if err != nil {
		log.Error("configuration reload rejected, keeping the running one", zap.String("file", old.Path), zap.Error(err))
		return
	}
	if cfg.Log.Format != old.Log.Format || cfg.Metrics != old.Metrics {
		log.Warn("log.format and metrics.listen change only with a restart")
	}
	if err := level.UnmarshalText([]byte(cfg.Log.Level)); err != nil {
		log.Error("configuration reload: log.level", zap.Error(err)) // validated already: cannot happen
	}
	scfg := schedulerConfig(cfg)
	scfg.Metrics = m
	scfg.Reconnect = cfg.Ceph != old.Ceph || cfg.Flatten.ConcurrentOps != old.Flatten.ConcurrentOps
	current.Store(cfg)
	sched.Reload(scfg, sources(cfg))
	log.Info("configuration reload accepted; it applies between two flattens", zap.String("file", cfg.Path),
		zap.Bool("reconnect", scfg.Reconnect))
}

// imageClone describes the one clone `once --image` flattens.
func imageClone(dial func() (*rados.Conn, error), spec string) (discovery.Clone, error) {
	t, err := rbdimage.Parse(spec)
	if err != nil {
		return discovery.Clone{}, err
	}
	conn, err := dial()
	if err != nil {
		return discovery.Clone{}, err
	}
	defer conn.Shutdown()
	info, err := rbdimage.Inspect(conn, t)
	if err != nil {
		return discovery.Clone{}, err
	}
	var parent rbdimage.Spec
	if info.Parent != "" {
		if parent, err = rbdimage.Parse(info.Parent); err != nil {
			return discovery.Clone{}, err
		}
	}
	return discovery.Clone{Spec: rbdimage.Spec{Pool: t.Pool, Namespace: t.Namespace, Image: t.Image}, Parent: parent,
		Size: info.Size, Overlap: info.Overlap, Source: "command line"}, nil
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
		holder := "an unknown holder (no record)"
		confirmWord := st.Owner
		if st.Holder != nil {
			r := st.Holder
			holder = fmt.Sprintf("node %s (pid %d) since %s, flattening %q, record updated %s ago",
				r.Node, r.PID, r.Since.Format(time.RFC3339), r.Clone, time.Since(r.Updated).Round(time.Second))
			confirmWord = r.Node
		}
		fmt.Fprintf(stdout, "slot %d (%s) is held by %s\n  client %s\n", slot, st.Image, holder, st.Owner)
		fmt.Fprintln(stdout, "Breaking it blocklists that client: if it is alive, its flatten stops and it reconnects.")
		if !yes {
			fmt.Fprintf(stdout, "Type %q to break the lock: ", confirmWord)
			line, _ := bufio.NewReader(stdin).ReadString('\n')
			if strings.TrimSpace(line) != confirmWord {
				fmt.Fprintln(stderr, "not confirmed: nothing broken")
				return exitFailure
			}
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

// progressPrinter shows `once` progress on stdout: a bar redrawn in place on a terminal, a plain
// line per tenth otherwise.
type progressPrinter struct {
	w        io.Writer
	terminal bool
	image    string
	last     int // percent (terminal) or tenth (plain) last printed
	started  time.Time
}

func newProgressPrinter(w io.Writer) *progressPrinter {
	p := &progressPrinter{w: w, last: -1}
	if f, ok := w.(*os.File); ok {
		fi, err := f.Stat()
		p.terminal = err == nil && fi.Mode()&os.ModeCharDevice != 0
	}
	return p
}

func (p *progressPrinter) print(image string, done, total uint64) {
	if total == 0 {
		return
	}
	if image != p.image {
		p.image, p.last, p.started = image, -1, time.Now()
	}
	pct := int(done * 100 / total)
	if !p.terminal {
		if tenth := pct / 10; tenth > p.last {
			p.last = tenth
			fmt.Fprintf(p.w, "%s: %d%% (%d/%d objects)\n", image, tenth*10, done, total)
		}
		return
	}
	if pct == p.last {
		return
	}
	p.last = pct
	const width = 30
	bar := strings.Repeat("#", pct*width/100) + strings.Repeat(".", width-pct*width/100)
	eta := "--"
	if el := time.Since(p.started); done > 0 && el > time.Second {
		eta = (time.Duration(float64(el) * float64(total-done) / float64(done))).Round(time.Second).String()
	}
	fmt.Fprintf(p.w, "\r%s [%s] %3d%% %d/%d objects, ETA %s ", image, bar, pct, done, total, eta)
	if done >= total {
		fmt.Fprintln(p.w)
	}
}
