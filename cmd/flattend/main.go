// Command flattend flattens this hypervisor's RBD clones, one at a time cluster-wide, inside a
// nightly window. See README.md.
//
// Files: main.go parses the command line and dispatches; each command has its file (run.go,
// once.go, check.go, status.go, plan.go, unlock.go); wire.go turns the config into what the
// internal packages take.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/ceph/go-ceph/rados"
	"go.uber.org/zap"

	"github.com/flattend/flattend/internal/cephconn"
	"github.com/flattend/flattend/internal/config"
)

// Exit codes.
const (
	exitOK          = 0
	exitFailure     = 1 // runtime failure, clones left unflattened by `once`, or a stop that outlasted stopGrace
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
  flattend status [--config PATH] [CEPH] [--lock-pool P] [--lock-image I] [--json]
                                          who holds the cluster-wide lock, on what, how far
  flattend status --nodes [--config PATH] [CEPH] [--lock-pool P] [--lock-image I] [--json]
                                          every node: version, last pass, backlog, next window
  flattend plan   [--config PATH] [CEPH] [--node N] [--pool P[/NS]]... [--json]
                                          this node's clones in flatten order, and why (changes nothing)
  flattend unlock --force [--force-live] [--slot N] [--yes] [--config PATH] [CEPH]
                  [--lock-pool P] [--lock-image I]
                                          break a stuck holder's lock (blocklists its client)
  flattend version                        flattend's version, the librbd it runs with, the workarounds on

status, plan and unlock also run without a config file (an admin node): CEPH is rbd's
  --conf/-c FILE, --id ID or --name/-n client.ID, --keyring/-k FILE, and CEPH_CONF and
  CEPH_ARGS are read as rbd reads them; without a file the user is client.admin.

Run "flattend COMMAND --help" for a command's options.

Exit codes: 0 ok, 1 runtime failure (or clones left by once, or Ceph calls still blocked 30 s
after SIGTERM or once --timeout), 2 usage/config error, 3 cannot reach or authenticate to Ceph.
`

// options are the command line flags; each command defines its own besides --config.
type options struct {
	config      string
	configSet   bool          // --config was given
	admin       adminOptions  // status, unlock, plan
	json        bool          // status, plan
	nodes       bool          // status
	timeout     time.Duration // once
	image       string        // once
	ignoreGates bool          // once
	force, yes  bool          // unlock
	forceLive   bool          // unlock
	slot        int           // unlock
}

// command is one of flattend's commands.
type command struct {
	flags func(fs *flag.FlagSet, o *options) // its flags besides --config; nil: none
	run   func(ctx context.Context, e *env, o options) int
	// admin commands run without a config file too, and take Ceph's flags (admin.go).
	admin, discovers bool
}

var commands = map[string]command{
	"run":    {run: runDaemon},
	"once":   {flags: onceFlags, run: runOnce},
	"check":  {run: runCheck},
	"status": {flags: statusFlags, run: runStatus, admin: true},
	"plan":   {flags: planFlags, run: runPlan, admin: true, discovers: true},
	"unlock": {flags: unlockFlags, run: runUnlock, admin: true},
}

// env is what every command gets once the config is loaded.
type env struct {
	cfg *config.Config
	// fromFile: cfg was read from a file, not made of defaults and flags (admin commands).
	fromFile bool
	// current is the config in force: `run` replaces it on reload, and dial follows it.
	current *atomic.Pointer[config.Config]
	dial    func() (*rados.Conn, error) // the lock's connection: everything that writes
	// dialReader dials a reader (cephconn.ReaderThreads) for what only reads images: discovery.
	dialReader func() (*rados.Conn, error)
	level      zap.AtomicLevel
	log        *zap.Logger
	stdin      io.Reader
	stdout     io.Writer
	stderr     io.Writer
}

func main() { os.Exit(run(os.Args[1:], os.Stdout, os.Stderr)) }

// run is flattend but for os.Exit: it returns the exit code.
func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return exitUsage
	}
	name, args := args[0], args[1:]
	switch name {
	case "-h", "--help", "help":
		fmt.Fprint(stdout, usage)
		return exitOK
	case "version", "--version":
		return printVersion(stdout)
	}
	cmd, known := commands[name]
	if !known {
		fmt.Fprintf(stderr, "flattend: unknown command %q\n\n%s", name, usage)
		return exitUsage
	}
	o, code, ok := parseFlags(name, cmd, args, stderr)
	if !ok {
		return code
	}
	e, ok := newEnv(o, cmd, stdout, stderr)
	if !ok {
		return exitUsage
	}
	defer func() { _ = e.log.Sync() }()
	ctx, stop := signalContext(e.log)
	defer stop()
	defer exitAfterGrace(ctx, errSignal, stopGrace, e.log, os.Exit)()
	return cmd.run(ctx, e, o)
}

// parseFlags parses a command's flags. When !ok, exit with code; the problem is printed.
func parseFlags(name string, cmd command, args []string, stderr io.Writer) (o options, code int, ok bool) {
	fs := flag.NewFlagSet("flattend "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.config, "config", config.DefaultPath, "configuration file")
	if cmd.flags != nil {
		cmd.flags(fs, &o)
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return o, exitOK, false
		}
		return o, exitUsage, false
	}
	fs.Visit(func(f *flag.Flag) { o.configSet = o.configSet || f.Name == "config" })
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "flattend %s: unexpected argument %q\n", name, fs.Arg(0))
		return o, exitUsage, false
	}
	return o, exitOK, true
}

// newEnv loads the config and makes the logger and the dialer; false after printing why not.
func newEnv(o options, cmd command, stdout, stderr io.Writer) (*env, bool) {
	cfg, found, err := loadConfig(o, cmd)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return nil, false
	}
	level := zap.NewAtomicLevel()
	log, err := newLogger(cfg.Log, level, stderr)
	if err != nil {
		fmt.Fprintf(stderr, "%s: log: %v\n", cfg.Path, err)
		return nil, false
	}
	e := &env{cfg: cfg, fromFile: found, current: new(atomic.Pointer[config.Config]), level: level, log: log,
		stdin: os.Stdin, stdout: stdout, stderr: stderr}
	e.current.Store(cfg)
	e.dial = newDialer(e.current, 0)
	e.dialReader = newDialer(e.current, cephconn.ReaderThreads)
	return e, true
}

// signalContext returns a context cancelled with cause errSignal on SIGINT or SIGTERM, and the
// function that releases it.
func signalContext(log *zap.Logger) (context.Context, func()) {
	ctx, cancel := context.WithCancelCause(context.Background())
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	go func() { // ends when the returned function cancels ctx
		select {
		case sig := <-sigs:
			log.Info("signal received, stopping", zap.String("signal", sig.String()))
			cancel(errSignal)
		case <-ctx.Done():
		}
	}()
	return ctx, func() { signal.Stop(sigs); cancel(nil) }
}

func exitCode(err error) int {
	if errors.Is(err, cephconn.ErrUnreachable) {
		return exitUnreachable
	}
	return exitFailure
}
