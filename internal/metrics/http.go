package metrics

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"
)

// Endpoints are what the listener serves besides /metrics. A nil field leaves its path out.
type Endpoints struct {
	// Stalled says how long the daemon's main loop has gone without moving (0 while it sleeps on
	// purpose): /healthz answers 503 once it reaches StallLimit.
	Stalled    func() time.Duration
	StallLimit time.Duration
	// Status is what /status serves, encoded as JSON.
	Status func() any
}

// Serve listens on addr and serves /metrics, /healthz and /status until ctx ends. It returns
// once listening (or with the listen error); the server stops when ctx is done.
func (m *Metrics) Serve(ctx context.Context, addr string, ep Endpoints) (net.Addr, <-chan error, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, nil, err
	}
	srv := &http.Server{Handler: m.Mux(ep), ReadHeaderTimeout: 5 * time.Second}
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

// Mux routes the listener's paths.
func (m *Metrics) Mux(ep Endpoints) *http.ServeMux {
	mux := http.NewServeMux()
	mux.Handle("/metrics", m.Handler())
	if ep.Stalled != nil {
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
			w.Header().Set("Content-Type", "text/plain; charset=utf-8")
			if stall := ep.Stalled(); stall >= ep.StallLimit {
				w.WriteHeader(http.StatusServiceUnavailable)
				fmt.Fprintf(w, "stalled: the main loop has not moved for %s (limit %s)\n", stall.Round(time.Second), ep.StallLimit)
				return
			}
			fmt.Fprintln(w, "ok")
		})
	}
	if ep.Status != nil {
		mux.HandleFunc("/status", func(w http.ResponseWriter, _ *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			enc := json.NewEncoder(w)
			enc.SetIndent("", "  ")
			_ = enc.Encode(ep.Status())
		})
	}
	return mux
}
