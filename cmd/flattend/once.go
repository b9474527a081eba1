package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"

	"github.com/ceph/go-ceph/rados"
	"go.uber.org/zap"

	"github.com/flattend/flattend/internal/discovery"
	"github.com/flattend/flattend/internal/rbdimage"
	"github.com/flattend/flattend/internal/scheduler"
)

// errTimeout is the cause of cancellation when `once --timeout` is reached.
var errTimeout = errors.New("once --timeout")

func onceFlags(fs *flag.FlagSet, o *options) {
	fs.DurationVar(&o.timeout, "timeout", 0, "give up (cancelling the running flatten) after this long; 0: no limit")
	fs.StringVar(&o.image, "image", "", "flatten only this clone (POOL/IMAGE or POOL/NAMESPACE/IMAGE), whoever owns it")
	fs.BoolVar(&o.ignoreGates, "ignore-gates", false, "skip the health, recovery and space gates (at your own risk)")
}

// runOnce is `flattend once`: one pass now (or the one clone --image names), ignoring the
// window. Clones left over exit with exitFailure.
func runOnce(ctx context.Context, e *env, o options) int {
	if o.timeout < 0 { // it would mean no limit, the opposite of what was asked
		fmt.Fprintf(e.stderr, "flattend once: --timeout: must not be negative, got %s (0: no limit)\n", o.timeout)
		return exitUsage
	}
	if o.image != "" {
		if _, err := parseImage(o.image); err != nil {
			fmt.Fprintf(e.stderr, "flattend once: --image: %v\n", err)
			return exitUsage
		}
	}
	sched, code := startScheduler(e, schedulerExtras{ignoreGates: o.ignoreGates,
		onProgress: newProgressPrinter(e.stdout).print})
	if sched == nil {
		return code
	}
	defer closeScheduler(sched)

	if o.timeout > 0 {
		var stop context.CancelFunc
		ctx, stop = context.WithTimeoutCause(ctx, o.timeout, fmt.Errorf("%w %s reached", errTimeout, o.timeout))
		defer stop()
		// Ceph calls that do not return (paused OSDs) must not outlast the limit by more than the grace.
		defer exitAfterGrace(ctx, errTimeout, stopGrace, e.log, os.Exit)()
	}
	sum, err := onePass(ctx, sched, e.dialReader, o.image)
	return passResult(ctx, e.log, sum, err)
}

// onePass flattens the clone image names or, without one, makes a pass over this node's clones.
// dialReader dials the connection that reads the named clone.
func onePass(ctx context.Context, sched *scheduler.Scheduler, dialReader func() (*rados.Conn, error), image string) (scheduler.Summary, error) {
	if image == "" {
		return sched.Pass(ctx)
	}
	clone, err := imageClone(dialReader, image)
	if err != nil {
		return scheduler.Summary{}, err
	}
	return sched.FlattenNamed(ctx, []discovery.Clone{clone}), nil
}

// passResult logs how the pass ended and returns the exit code: a signal is a clean stop.
func passResult(ctx context.Context, log *zap.Logger, sum scheduler.Summary, err error) int {
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

// imageClone describes the one clone `once --image` flattens.
func imageClone(dial func() (*rados.Conn, error), spec string) (discovery.Clone, error) {
	t, err := parseImage(spec)
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
	c := discovery.Clone{Spec: t, Size: info.Size, Overlap: info.Overlap, Source: "command line"}
	if info.Parent != nil {
		c.Parent = *info.Parent
	}
	return c, nil
}

// parseImage reads --image: an image, not a snapshot.
func parseImage(text string) (rbdimage.Spec, error) {
	s, err := rbdimage.Parse(text)
	if err == nil && s.Snap != "" {
		err = fmt.Errorf("%q is a snapshot; name the clone: pool/image or pool/namespace/image", text)
	}
	return s, err
}
