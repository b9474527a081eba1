package main

import (
	"context"
	"io"
	"os"
	"sync/atomic"
	"time"

	"github.com/ceph/go-ceph/rados"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/flattend/flattend/internal/cephconn"
	"github.com/flattend/flattend/internal/config"
	"github.com/flattend/flattend/internal/discovery"
	"github.com/flattend/flattend/internal/flattener"
	"github.com/flattend/flattend/internal/gate"
	"github.com/flattend/flattend/internal/journald"
	"github.com/flattend/flattend/internal/lock"
	"github.com/flattend/flattend/internal/metrics"
	"github.com/flattend/flattend/internal/scheduler"
)

// This file turns a config.Config into what the internal packages take. Only here does cmd
// build a scheduler.Config or call scheduler.New.

// schedulerExtras are the scheduler settings that come from the command, not from the file.
type schedulerExtras struct {
	metrics     *metrics.Metrics                       // run
	ignoreGates bool                                   // once --ignore-gates
	onProgress  func(image string, done, total uint64) // once
	reconnect   bool                                   // a reload that changed the connection
}

func schedulerConfig(cfg *config.Config, x schedulerExtras) scheduler.Config {
	sc := scheduler.Config{
		Node:           cfg.Node,
		Version:        version,
		Window:         cfg.ParsedWindow(),
		BackoffMin:     cfg.Backoff.Min.D(),
		BackoffMax:     cfg.Backoff.Max.D(),
		RescanInterval: cfg.Discovery.Interval.D(),
		Lock:           lockOptions(cfg),
		Gates: gate.Config{Health: cfg.Gates.Health, Recovery: cfg.Gates.Recovery,
			SpaceFactor: cfg.Gates.SpaceFactor},
		GateInterval:      cfg.Gates.CheckInterval.D(),
		MinTimeLeft:       cfg.Flatten.MinTimeLeft.D(),
		AllowInUse:        cfg.Flatten.InUse == config.InUseAllow,
		Order:             cfg.Flatten.Order,
		MaxPerWindow:      cfg.Flatten.MaxPerWindow,
		MaxBytesPerWindow: uint64(cfg.Flatten.MaxBytesPerWindow),
		MaxBytesPerSecond: uint64(cfg.Flatten.MaxBytesPerSecond),
		RetryAfter:        cfg.Flatten.RetryAfter.D(),
		VerifyCopyups:     verifyCopyups(cfg),
		Reconnect:         x.reconnect,
		Metrics:           x.metrics,
		OnProgress:        x.onProgress,
	}
	if x.ignoreGates {
		sc.Gates = gate.Config{}
	}
	if cfg.Cleanup.ParentSnapshots {
		sc.CleanupSnapshots = cfg.SnapshotRegexp()
	}
	return sc
}

// startScheduler makes the scheduler and connects it, so that Ceph problems an operator must
// fix show before any window logic. On failure it returns nil and the exit code; otherwise the
// caller closes it with closeScheduler.
func startScheduler(e *env, x schedulerExtras) (*scheduler.Scheduler, int) {
	warnConfig(e.log, e.cfg)
	sched := scheduler.New(schedulerConfig(e.cfg, x), scheduler.CephConnector(e.dial, e.dialReader, e.log), sources(e.cfg, e.log), e.log)
	if err := sched.Connect(); err != nil {
		e.log.Error("cannot start", zap.Error(err))
		closeScheduler(sched)
		return nil, exitCode(err)
	}
	return sched, exitOK
}

// reloadScheduler hands a reloaded config to a running scheduler.
func reloadScheduler(sched *scheduler.Scheduler, cfg *config.Config, x schedulerExtras, log *zap.Logger) {
	warnConfig(log, cfg)
	sched.Reload(schedulerConfig(cfg, x), sources(cfg, log))
}

// warnConfig logs the config's warnings: flattend runs as configured, but an operator should look.
func warnConfig(log *zap.Logger, cfg *config.Config) {
	for _, w := range cfg.Warnings() {
		log.Warn("configuration warning", zap.String("warning", w.Error()))
	}
}

func closeScheduler(sched *scheduler.Scheduler) {
	ctx, done := context.WithTimeout(context.Background(), 5*time.Second)
	defer done()
	sched.Close(ctx)
}

// newDialer returns a dialer that follows config reloads (SIGHUP): the next connection uses the
// new settings. ioThreads is cephconn.Options.IOThreads: cephconn.ReaderThreads for a reader.
func newDialer(current *atomic.Pointer[config.Config], ioThreads int) func() (*rados.Conn, error) {
	return func() (*rados.Conn, error) {
		o := cephOptions(current.Load())
		o.IOThreads = ioThreads
		return cephconn.Dial(o)
	}
}

func cephOptions(cfg *config.Config) cephconn.Options {
	return cephconn.Options{
		ConfPath:       cfg.Ceph.Conf,
		User:           cfg.Ceph.User,
		Keyring:        cfg.Ceph.Keyring,
		ConnectTimeout: cfg.Ceph.ConnectTimeout.D(),
		OpTimeout:      cfg.Ceph.OpTimeout.D(),
		ConcurrentOps:  cfg.Flatten.ConcurrentOps,
	}
}

func lockOptions(cfg *config.Config) lock.Options {
	return lock.Options{Pool: cfg.Lock.Pool, Image: cfg.Lock.Image, Slots: cfg.Lock.Slots,
		CheckInterval: cfg.Lock.CheckInterval.D(), BackoffMin: cfg.Backoff.Min.D(), BackoffMax: cfg.Backoff.Max.D(),
		Node: cfg.Node, Version: version}
}

// sources are the discovery sources of cfg; log hears of the libvirt disks left out (nil: nothing).
func sources(cfg *config.Config, log *zap.Logger) []discovery.Source {
	var ss []discovery.Source
	for i, p := range cfg.Discovery.Pools {
		ss = append(ss, discovery.Pool{Pool: p.Pool, Namespace: p.Namespace, OwnerKey: p.OwnerKey, Shared: p.Shared,
			Node: cfg.Node, Match: cfg.PoolMatch(i)})
	}
	if l := cfg.Discovery.Libvirt; l != nil {
		ss = append(ss, discovery.Libvirt{URI: l.URI, IncludeVMDisks: l.IncludeVMDisks, Node: cfg.Node, Log: log})
	}
	return ss
}

func newLogger(c config.Log, level zap.AtomicLevel, w io.Writer) (*zap.Logger, error) {
	if err := level.UnmarshalText([]byte(c.Level)); err != nil {
		return nil, err
	}
	enc := zap.NewProductionEncoderConfig()
	enc.EncodeTime = zapcore.RFC3339NanoTimeEncoder
	enc.TimeKey = "ts"
	f, _ := w.(*os.File)
	journal := journald.IsJournal(f) // under systemd: each line gets its priority, journald stamps it
	var encoder zapcore.Encoder
	if c.Format == "json" {
		encoder = zapcore.NewJSONEncoder(enc)
	} else {
		enc.EncodeLevel = zapcore.CapitalLevelEncoder
		if journal {
			enc = journald.ConsoleConfig(enc)
		}
		encoder = zapcore.NewConsoleEncoder(enc)
	}
	if journal {
		encoder = journald.Encoder(encoder)
	}
	return zap.New(zapcore.NewCore(encoder, zapcore.AddSync(w), level)), nil
}

// verifyCopyups decides, from the librbd this process runs with, whether clones are verified for
// lost copy-ups before their flatten.
func verifyCopyups(cfg *config.Config) bool {
	return cfg.Flatten.VerifyCopyups == config.VerifyAlways || !flattener.CopyupFixed(flattener.CephVersion())
}
