// Command flattend flattens this hypervisor's RBD clones, one at a time cluster-wide, inside a
// nightly window. See README.md.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"regexp"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/ceph/go-ceph/rados"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/flattend/flattend/internal/cephconn"
	"github.com/flattend/flattend/internal/config"
	"github.com/flattend/flattend/internal/discovery"
	"github.com/flattend/flattend/internal/gate"
	"github.com/flattend/flattend/internal/lock"
	"github.com/flattend/flattend/internal/metrics"
	"github.com/flattend/flattend/internal/rbdimage"
	"github.com/flattend/flattend/internal/scheduler"
	"github.com/flattend/flattend/internal/status"
	"github.com/flattend/flattend/internal/window"
)

// Exit codes.
const (
	exitOK          = 0
	exitFailure     = 1 // runtime failure, or clones left unflattened by `once`
	exitUsage       = 2 // usage or configuration error
	exitUnreachable = 3 // cannot reach or authenticate to Ceph
)

var errSignal = errors.New("stopping on signal")

const usage = `flattend flattens this node's RBD clones, one at a time cluster-wide.

Usage:
  flattend run    [--config PATH]         work in every window, forever (the daemon)
  flattend once   [--config PATH] [--timeout D] [--image POOL/IMAGE] [--ignore-gates]
                                          one pass now, ignoring the window
  flattend check  [--config PATH]         validate the config and the Ceph connection
  flattend status [--config PATH] [--json]
                                          who holds the cluster-wide lock, on what, how far
  flattend plan   [--config PATH] [--json]
                                          this node's clones in flatten order, and why (changes nothing)
  flattend unlock --force [--slot N] [--yes] [--config PATH]
                                          break a stuck holder's lock (blocklists its client)

Run "flattend COMMAND --help" for a command's options.

Exit codes: 0 ok, 1 runtime failure (or clones left by once), 2 usage/config error,
3 cannot reach or authenticate to Ceph.
`

func main() { os.Exit(run(os.Args[1:], os.Stdout, os.Stderr)) }

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return exitUsage
	}
	cmd, args := args[0], args[1:]
	switch cmd {
	case "-h", "--help", "help":
		fmt.Fprint(stdout, usage)
		return exitOK
	case "run", "once", "check", "status", "unlock", "plan":
	default:
		fmt.Fprintf(stderr, "flattend: unknown command %q\n\n%s", cmd, usage)
		return exitUsage
	}

	fs := flag.NewFlagSet("flattend "+cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfgPath := fs.String("config", config.DefaultPath, "configuration file")
	timeout := time.Duration(0)
	asJSON, ignoreGates, force, yes := false, false, false, false
	image, slot := "", 0
	if cmd == "status" {
		fs.BoolVar(&asJSON, "json", false, "print JSON (the format is documented in docs/operations.md)")
	}
	if cmd == "plan" {
		fs.BoolVar(&asJSON, "json", false, "print JSON (the format is documented in docs/discovery.md)")
	}
	if cmd == "once" {
		fs.DurationVar(&timeout, "timeout", 0, "give up (cancelling the running flatten) after this long; 0: no limit")
		fs.StringVar(&image, "image", "", "flatten only this clone (POOL/IMAGE or POOL/NAMESPACE/IMAGE), whoever owns it")
		fs.BoolVar(&ignoreGates, "ignore-gates", false, "skip the health, recovery and space gates (at your own risk)")
	}
	if cmd == "unlock" {
		fs.BoolVar(&force, "force", false, "required: break the lock of a holder that is stuck")
		fs.IntVar(&slot, "slot", 0, "the slot to break (see flattend status)")
		fs.BoolVar(&yes, "yes", false, "do not ask for confirmation")
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK
		}
		return exitUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "flattend %s: unexpected argument %q\n", cmd, fs.Arg(0))
		return exitUsage
	}

	cfg, err := config.Load(*cfgPath)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return exitUsage
	}
	level := zap.NewAtomicLevel()
	log, err := newLogger(cfg.Log, level, stderr)
	if err != nil {
		fmt.Fprintf(stderr, "%s: log: %v\n", cfg.Path, err)
		return exitUsage
	}
	defer func() { _ = log.Sync() }()

	ctx, cancel := context.WithCancelCause(context.Background())
	defer cancel(nil)
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sigs)
	go func() { // ends when run returns and cancels ctx
		select {
		case sig := <-sigs:
			log.Info("signal received, stopping", zap.String("signal", sig.String()))
			cancel(errSignal)
		case <-ctx.Done():
		}
	}()

	// The dialer follows config reloads (SIGHUP): the next connection uses the new settings.
	var current atomic.Pointer[config.Config]
	current.Store(cfg)
	dial := func() (*rados.Conn, error) { return cephconn.Dial(cephOptions(current.Load())) }
	switch cmd {
	case "check":
		return check(cfg, dial, stdout, stderr)
	case "status":
		return showStatus(cfg, dial, asJSON, stdout, stderr)
	case "plan":
		return plan(ctx, cfg, dial, asJSON, stdout, stderr)
	case "unlock":
		if !force {
			fmt.Fprintln(stderr, "flattend unlock: breaking a lock needs --force (see flattend unlock --help)")
			return exitUsage
		}
		return unlock(cfg, dial, slot, yes, os.Stdin, stdout, stderr)
	}

	if image != "" {
		if _, err := rbdimage.Parse(image); err != nil {
			fmt.Fprintf(stderr, "flattend once: --image: %v\n", err)
			return exitUsage
		}
	}
	scfg := schedulerConfig(cfg)
	if cmd == "run" {
		scfg.Metrics = metrics.New(cfg.Node)
	}
	if ignoreGates {
		scfg.Gates = gate.Config{}
	}
	if cmd == "once" {
		scfg.OnProgress = newProgressPrinter(stdout).print
	}
	// Fail fast on Ceph problems an operator must fix, before any window logic.
	sched := scheduler.New(scfg, scheduler.Dialer(dial), sources(cfg), log)
	defer func() {
		closeCtx, done := context.WithTimeout(context.Background(), 5*time.Second)
		defer done()
		sched.Close(closeCtx)
	}()
	if err := sched.Connect(); err != nil {
		log.Error("cannot start", zap.Error(err))
		return exitCode(err)
	}

	if cmd == "run" {
		return daemon(ctx, cfg, &current, level, sched, scfg.Metrics, log)
	}

	if timeout > 0 {
		var stop context.CancelFunc
		ctx, stop = context.WithTimeoutCause(ctx, timeout, fmt.Errorf("once --timeout %s reached", timeout))
		defer stop()
	}
	var sum scheduler.Summary
	if image != "" {
		var clone discovery.Clone
		if clone, err = imageClone(dial, image); err == nil {
			sum = sched.Flatten(ctx, []discovery.Clone{clone})
		}
	} else {
		sum, err = sched.Pass(ctx)
	}
	if errors.Is(context.Cause(ctx), errSignal) {
		log.Info("stopped by signal", zap.Int("flattened", sum.Flattened), zap.Int("left", sum.Left))
		return exitOK
	}
	if err != nil {
		log.Error("pass failed", zap.Error(err))
		return exitCode(err)
	}
	log.Info("pass done", zap.Int("discovered", sum.Discovered), zap.Int("flattened", sum.Flattened),
		zap.Int("failed", len(sum.Failed)), zap.Strings("skipped", sum.Skipped), zap.Int("left", sum.Left),
		zap.String("stopped", sum.Stopped), zap.NamedError("cancelled", context.Cause(ctx)))
	if !sum.Done() {
		return exitFailure
	}
	return exitOK
}

func check(cfg *config.Config, dial func() (*rados.Conn, error), stdout, stderr io.Writer) int {
	fmt.Fprintf(stdout, "config %s: ok (node %s)\n", cfg.Path, cfg.Node)
	conn, err := dial()
	if err != nil {
		fmt.Fprintln(stderr, err)
		return exitCode(err)
	}
	defer conn.Shutdown()
	fmt.Fprintf(stdout, "ceph: connected as client.%s\n", cfg.Ceph.User)
	code := exitOK
	m := lock.New(conn, lockOptions(cfg))
	if err := m.Check(); err != nil {
		if errors.Is(err, lock.ErrNoExclusiveLock) || errors.Is(err, lock.ErrNotLockImage) || !cephconn.IsNotFound(err) {
			fmt.Fprintf(stderr, "lock: %v\n", err)
			code = exitFailure
		} else if _, perr := cephconn.OpenPool(conn, cfg.Lock.Pool); perr != nil {
			fmt.Fprintf(stderr, "lock: %v\n", perr)
			code = exitFailure
		} else {
			fmt.Fprintf(stdout, "lock: %s does not exist yet; the first run creates it\n", m.Name())
		}
	} else {
		fmt.Fprintf(stdout, "lock: %s ok\n", m.Name())
	}
	for _, p := range cfg.Discovery.Pools {
		ioctx, err := cephconn.OpenPool(conn, p.Pool)
		if err != nil {
			fmt.Fprintf(stderr, "discovery: %v\n", err)
			code = exitFailure
			continue
		}
		if p.Namespace != "" {
			if err := discovery.CheckNamespace(ioctx, p.Pool, p.Namespace); err != nil {
				fmt.Fprintf(stderr, "discovery: %v\n", err)
				code = exitFailure
				ioctx.Destroy()
				continue
			}
		}
		ioctx.Destroy()
		fmt.Fprintf(stdout, "discovery: pool %s ok (%s)\n", p.Pool, poolSelection(p))
	}
	if !checkLibvirt(cfg, stdout, stderr) {
		code = exitFailure
	}
	return code
}

// withSlots connects, reads every slot of the lock and hands both to fn; errors are printed and
// turned into exit codes.
func withSlots(cfg *config.Config, dial func() (*rados.Conn, error), stderr io.Writer, fn func(*rados.Conn, []lock.SlotStatus) int) int {
	conn, err := dial()
	if err != nil {
		fmt.Fprintln(stderr, err)
		return exitCode(err)
	}
	defer conn.Shutdown()
	slots, err := lock.ReadStatus(conn, cfg.Lock.Pool, cfg.Lock.Image, cfg.Lock.Slots)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return exitFailure
	}
	return fn(conn, slots)
}

func showStatus(cfg *config.Config, dial func() (*rados.Conn, error), asJSON bool, stdout, stderr io.Writer) int {
	return withSlots(cfg, dial, stderr, func(conn *rados.Conn, slots []lock.SlotStatus) int {
		waiting, err := lock.ReadQueue(conn, cfg.Lock.Pool, cfg.Lock.Image)
		if err != nil {
			fmt.Fprintln(stderr, err)
			return exitFailure
		}
		return printStatus(slots, waiting, asJSON, stdout)
	})
}

func printStatus(slots []lock.SlotStatus, waiting []lock.Waiter, asJSON bool, stdout io.Writer) int {
	var err error
	r := status.Build(slots, waiting, time.Now())
	if asJSON {
		err = status.WriteJSON(stdout, r)
	} else {
		err = status.WriteText(stdout, r)
	}
	if err != nil {
		return exitFailure
	}
	return exitOK
}

func exitCode(err error) int {
	if errors.Is(err, cephconn.ErrUnreachable) {
		return exitUnreachable
	}
	return exitFailure
}

func cephOptions(cfg *config.Config) cephconn.Options {
	return cephconn.Options{
		ConfPath:       cfg.Ceph.Conf,
		User:           cfg.Ceph.User,
		Keyring:        cfg.Ceph.Keyring,
		ConnectTimeout: cfg.Ceph.ConnectTimeout.D(),
		ConcurrentOps:  cfg.Flatten.ConcurrentOps,
	}
}

func schedulerConfig(cfg *config.Config) scheduler.Config {
	// The config package validated the schedule already.
	w, _ := window.New(cfg.Window.Schedule, cfg.Window.Duration.D())
	sc := scheduler.Config{
		Node:           cfg.Node,
		Window:         w,
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
	}
	if cfg.Cleanup.ParentSnapshots {
		sc.CleanupSnapshots = regexp.MustCompile(cfg.Cleanup.SnapshotPattern) // validated
	}
	return sc
}

func lockOptions(cfg *config.Config) lock.Options {
	return lock.Options{Pool: cfg.Lock.Pool, Image: cfg.Lock.Image, Slots: cfg.Lock.Slots,
		CheckInterval: cfg.Lock.CheckInterval.D(), Node: cfg.Node}
}

func sources(cfg *config.Config) []discovery.Source {
	var ss []discovery.Source
	for _, p := range cfg.Discovery.Pools {
		src := discovery.Pool{Pool: p.Pool, Namespace: p.Namespace, OwnerKey: p.OwnerKey, Shared: p.Shared, Node: cfg.Node}
		if p.Match != "" {
			src.Match = regexp.MustCompile(p.Match) // validated by the config package
		}
		ss = append(ss, src)
	}
	if l := cfg.Discovery.Libvirt; l != nil {
		ss = append(ss, discovery.Libvirt{URI: l.URI, IncludeVMDisks: l.IncludeVMDisks, Node: cfg.Node})
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
	var encoder zapcore.Encoder
	if c.Format == "json" {
		encoder = zapcore.NewJSONEncoder(enc)
	} else {
		enc.EncodeLevel = zapcore.CapitalLevelEncoder
		encoder = zapcore.NewConsoleEncoder(enc)
	}
	return zap.New(zapcore.NewCore(encoder, zapcore.AddSync(w), level)), nil
}
