package scheduler

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"

	"github.com/flattend/flattend/internal/backoff"
	"github.com/flattend/flattend/internal/discovery"
)

// ErrWindowClosed is the cause of cancellation when the night window ends.
var ErrWindowClosed = errors.New("the flatten window closed")

// Run works in every window until ctx ends; a daemon started inside a window works in what is
// left of it. It returns nil when ctx ends.
func (s *Scheduler) Run(ctx context.Context) error {
	for {
		s.live.tick()
		s.applyReload()
		now := time.Now()
		open, end := s.cfg.Window.At(now)
		if !open {
			if err := s.waitForWindow(ctx, now); err != nil || ctx.Err() != nil {
				return err
			}
			continue
		}
		s.runWindow(ctx, end)
		if ctx.Err() != nil {
			return nil
		}
		s.log.Info("window ended")
	}
}

// waitForWindow sleeps until the window opens, a reload arrives (the schedule may have changed)
// or ctx ends.
func (s *Scheduler) waitForWindow(ctx context.Context, now time.Time) error {
	s.cfg.Metrics.WindowOpen(false)
	next := s.cfg.Window.NextOpen(now)
	if next.IsZero() {
		return fmt.Errorf("the window schedule never opens again")
	}
	s.log.Info("window closed", zap.Time("next_open", next))
	s.windowClosed(s.cfg, next)
	s.setState(PhaseWaitingForWindow, "window closed; opens %s", next.Format(time.RFC3339))
	t := time.NewTimer(time.Until(next))
	defer t.Stop()
	s.live.sleeping(time.Until(next))
	defer s.live.tick()
	select {
	case <-t.C:
	case <-s.reloaded:
	case <-ctx.Done():
	}
	return nil
}

// runWindow works until the window ends at end (a reload may move it) or ctx ends.
func (s *Scheduler) runWindow(ctx context.Context, end time.Time) {
	s.log.Info("window open", zap.Time("until", end))
	s.cfg.Metrics.WindowOpen(true)
	s.windowOpened(s.cfg, end)
	s.budget = budget{}
	s.windowEnd.Store(end.UnixNano())
	wctx, cancel := context.WithCancelCause(ctx)
	closer := time.AfterFunc(time.Until(end), func() { cancel(ErrWindowClosed) })
	watched := make(chan struct{})
	go func() { // owned by this window: ends with it
		defer close(watched)
		s.followWindowReloads(wctx, closer, cancel)
	}()
	s.workWindow(wctx)
	closer.Stop()
	cancel(nil)
	<-watched
	s.windowEnd.Store(0)
	s.cfg.Metrics.WindowOpen(false)
}

// followWindowReloads moves the open window's end when a reload changes the schedule, so that a
// new config does not interrupt a flatten it still allows (and closes the window at once if it
// does not).
func (s *Scheduler) followWindowReloads(ctx context.Context, closer *time.Timer, closeWindow context.CancelCauseFunc) {
	var seen *reload
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.reloaded:
		}
		s.reloadMu.Lock()
		p := s.pending
		s.reloadMu.Unlock()
		if p == nil || p == seen {
			continue // applied already, or this one was followed before
		}
		seen = p
		open, end := p.cfg.Window.At(time.Now())
		if !open {
			closeWindow(ErrWindowClosed)
			return
		}
		s.windowEnd.Store(end.UnixNano())
		s.windowOpened(p.cfg, end)
		closer.Reset(time.Until(end))
		s.log.Info("window end moved by the new configuration", zap.Time("until", end))
	}
}

// workWindow runs passes until ctx ends: again after discovery.interval, sooner (with backoff)
// after a failed pass or a closed gate.
func (s *Scheduler) workWindow(ctx context.Context) {
	retry := backoff.Backoff{Min: s.cfg.BackoffMin, Max: s.cfg.BackoffMax}
	for {
		sum, err := s.Pass(ctx)
		if ctx.Err() != nil {
			return
		}
		wait := s.cfg.RescanInterval
		switch {
		case err != nil:
			s.log.Error("pass failed", zap.Error(err))
			wait = min(wait, retry.Next())
		case sum.GateClosed:
			wait = min(wait, retry.Next())
			s.log.Info("pass stopped", zap.String("reason", sum.Stopped), zap.Duration("next_pass_in", wait))
		default:
			retry.Reset()
			s.log.Info("pass done", zap.Int("discovered", sum.Discovered), zap.Int("flattened", sum.Flattened),
				zap.Int("failed", len(sum.Failed)), zap.Duration("next_pass_in", wait))
		}
		s.setState(PhaseIdle, "%s; next pass %s", sum.describe(err), time.Now().Add(wait).Format(time.RFC3339))
		if s.pause(ctx, wait) != nil {
			return
		}
	}
}

type reload struct {
	cfg     Config
	sources []discovery.Source
}

// Reload hands the scheduler a new configuration. It takes effect between two flattens: a held
// lock is not dropped for it, and a running flatten goes on (unless the new window is closed).
func (s *Scheduler) Reload(cfg Config, sources []discovery.Source) {
	s.reloadMu.Lock()
	s.pending = &reload{cfg: cfg, sources: sources}
	s.reloadMu.Unlock()
	select {
	case s.reloaded <- struct{}{}:
	default:
	}
}

// applyReload installs a pending configuration; call it only where no lease is held.
func (s *Scheduler) applyReload() {
	s.reloadMu.Lock()
	p := s.pending
	s.pending = nil
	s.reloadMu.Unlock()
	if p == nil {
		return
	}
	old := s.cfg
	if p.cfg.Connect == nil {
		p.cfg.Connect = old.Connect // the connector follows the config by itself
	}
	s.cfg, s.sources = p.cfg, p.sources
	s.rep.mu.Lock()
	s.rep.node = p.cfg.Node
	s.rep.mu.Unlock()
	if p.cfg.Reconnect || old.Lock != p.cfg.Lock || old.Node != p.cfg.Node {
		s.log.Info("configuration reloaded: reconnecting for the new connection or lock settings")
		s.discard()
		return
	}
	s.log.Info("configuration reloaded")
}

// sleep waits d or until ctx ends (then it returns ctx's cause).
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}
