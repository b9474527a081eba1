package main

// The fleet bench (issue 3, "fleet"): N simulated nodes in this process, each with its own RADOS
// connection and its own lock.Mutex (internal/lock, as flattend uses it), contending for one
// slot. Each node takes the lock a number of times ("turns"), holds it for a fixed simulated
// flatten, releases it, and queues again the way the scheduler does (HandedOver, Wait, Wake or
// backoff). Measured: the handover gap, fairness (each turn's wait against the fair share), the
// lock attempts per handover, and the RADOS operations the OSD serves per handover, net of what
// the idle fleet costs (watch pings) — at several fleet sizes, to see whether they grow with
// the number of waiting nodes.

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"sync"
	"time"

	"github.com/ceph/go-ceph/rados"

	"github.com/flattend/flattend/internal/lock"
)

const fleetPool = "bench-fleet"

type fleetRun struct {
	Nodes        int     `json:"nodes"`
	TurnsPerNode int     `json:"turns_per_node"`
	HoldMS       float64 `json:"hold_ms"`
	BackoffMin   string  `json:"backoff_min"`
	BackoffMax   string  `json:"backoff_max"`
	Tenures      int     `json:"tenures"`
	Handovers    int     `json:"handovers"` // consecutive tenures of different nodes
	DurationS    float64 `json:"duration_s"`
	// Gap: from the holder's Unlock returning to the next node's TryLock returning the lease.
	Gap dist `json:"gap_unlock_returned_to_next_lease"`
	// GapFromUnlockCall: from the holder calling Unlock (clear record, release, close) instead.
	GapFromUnlockCall dist `json:"gap_unlock_called_to_next_lease"`
	UnlockCall        dist `json:"unlock_call"`
	// Wait: per turn, from starting to want the lock to holding it.
	Wait        dist    `json:"wait_per_turn"`
	FairShareMS float64 `json:"fair_share_ms"` // (nodes-1) × mean cycle (hold + gap)
	// MaxWaitOverFair: the longest wait ÷ the fair share; NodeMeanWait*: the spread of the
	// nodes' mean waits; OutOfOrder: grants that went to a node while another had waited longer.
	MaxWaitOverFair  float64 `json:"max_wait_over_fair_share"`
	NodeMeanWaitMinS float64 `json:"node_mean_wait_min_s"`
	NodeMeanWaitMaxS float64 `json:"node_mean_wait_max_s"`
	OutOfOrder       int     `json:"out_of_order_grants"` // not counting each node's first turn (a start race)
	// OutOfOrderByPoll: of those, taken by a fallback poll that found the slot free before the
	// granted node took it; AcquiredAfter: turns (after the first) by what preceded the
	// successful TryLock: "grant" (woken by a release), "poll" (backoff timer), "first try".
	OutOfOrderByPoll int            `json:"out_of_order_by_poll"`
	AcquiredAfter    map[string]int `json:"acquired_after"`
	Starved          int            `json:"starved_nodes"` // did not finish their turns, or waited > 3× the fair share
	// lock.Stats summed over the nodes, per handover.
	AttemptsPerHandover float64 `json:"lock_attempts_per_handover"`
	BusyPerHandover     float64 `json:"busy_trylocks_per_handover"`
	// DeferredPerHandover: of the busy TryLocks, those answered from the queue (a node behind
	// other live waiters) without touching the lock image.
	DeferredPerHandover float64 `json:"deferred_polls_per_handover"`
	NotifiesPerHandover float64 `json:"notifies_per_handover"`
	GrantsPerHandover   float64 `json:"grants_per_handover"`
	// OSD client ops (osd.0 perf dump "op") during the run, and net of the idle fleet's rate.
	OSDOps            uint64  `json:"osd_ops"`
	IdleOpsPerS       float64 `json:"idle_ops_per_s"`
	OpsPerHandover    float64 `json:"osd_ops_per_handover"`
	NetOpsPerHandover float64 `json:"osd_ops_per_handover_net_of_idle"`
	// OpsPerBusyPoll: what one TryLock that finds the slot held costs the OSD (measured apart,
	// 20 polls against a held lock); HandoverOnlyOps: ops per handover net of idle and of the
	// fallback polls (full and deferred), i.e. release + notifications + the grantee's acquisition.
	OpsPerBusyPoll     float64 `json:"osd_ops_per_busy_poll"`
	OpsPerDeferredPoll float64 `json:"osd_ops_per_deferred_poll"` // a poll behind another waiter
	HandoverOnlyOps    float64 `json:"osd_ops_per_handover_net_of_idle_and_polls"`
	SetupConnectS      float64 `json:"setup_connect_s"`
	NotFinishedTurns   int     `json:"turns_not_finished"`
	TimedOut           bool    `json:"timed_out"`
	FallbackPollsShare float64 `json:"fallback_polls_share"` // busy TryLocks ÷ attempts
}

type fleetReport struct {
	When time.Time  `json:"when"`
	Runs []fleetRun `json:"runs"`
}

type tenureRec struct {
	node                       int
	acquired, unlockAt, freeAt time.Time
}

func benchFleet(conn *rados.Conn, out string, sizes []int, handovers int, hold, boMin, boMax time.Duration) {
	ioctx := ensurePool(conn, fleetPool)
	ioctx.Destroy()
	rep := fleetReport{When: time.Now().UTC()}
	for _, n := range sizes {
		turns := max(1, int(math.Ceil(float64(handovers)/float64(n))))
		rep.Runs = append(rep.Runs, fleetRunOnce(n, turns, hold, boMin, boMax))
	}
	fmt.Printf("\nfleet: simulated nodes in one process, own RADOS connection each, one slot, hold %s, backoff %s..%s\n", hold, boMin, boMax)
	fmt.Printf("%5s %5s %9s %22s %8s %8s %8s %8s %7s %7s %7s %7s %6s %7s %7s %8s\n", "nodes", "turns", "handovers", "gap p50/p90/p99/max ms", "wait p50", "wait max",
		"max/fair", "ooo/poll", "starved", "tries/h", "polls/h", "defer/h", "ops/h", "op/poll", "op/dfr", "op/h-net")
	for _, r := range rep.Runs {
		fmt.Printf("%5d %5d %9d %22s %7.2fs %7.2fs %8.2f %8s %7d %7.2f %7.2f %7.2f %6.0f %7.1f %7.1f %8.1f\n", r.Nodes, r.TurnsPerNode, r.Handovers,
			fmt.Sprintf("%.0f/%.0f/%.0f/%.0f", r.Gap.P50MS, r.Gap.P90MS, r.Gap.P99MS, r.Gap.MaxMS), r.Wait.P50MS/1000, r.Wait.MaxMS/1000,
			r.MaxWaitOverFair, fmt.Sprintf("%d/%d", r.OutOfOrder, r.OutOfOrderByPoll), r.Starved, r.AttemptsPerHandover, r.BusyPerHandover,
			r.DeferredPerHandover, r.NetOpsPerHandover, r.OpsPerBusyPoll, r.OpsPerDeferredPoll, r.HandoverOnlyOps)
	}
	fmt.Println("(gap: holder's Unlock returned → next node holds the lease; max/fair: longest wait ÷ (nodes-1) × mean cycle;")
	fmt.Println(" ooo/poll: turns taken while another node had waited longer / of them by a fallback poll; tries/h: lock image tries per handover, all nodes;")
	fmt.Println(" polls/h: TryLocks that found the slot held (fallback polls); defer/h: of those, answered from the queue (behind another waiter);")
	fmt.Println(" ops/h: OSD ops per handover net of the idle fleet; op/poll, op/dfr: OSD ops of one poll by the first waiter, by one behind it;")
	fmt.Println(" op/h-net: ops per handover without the polls)")
	fmt.Println("wrote", writeJSON(out, "fleet.json", rep))
}

func fleetRunOnce(nodes, turns int, hold, boMin, boMax time.Duration) fleetRun {
	image := fmt.Sprintf("fleet-lock-%d", nodes)
	r := fleetRun{Nodes: nodes, TurnsPerNode: turns, HoldMS: float64(hold) / 1e6, BackoffMin: boMin.String(), BackoffMax: boMax.String(),
		AcquiredAfter: map[string]int{}}
	fmt.Printf("fleet: %d nodes × %d turns: connecting …\n", nodes, turns)
	t0 := time.Now()
	conns := make([]*rados.Conn, nodes)
	muts := make([]*lock.Mutex, nodes)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	for i := range nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			conns[i] = dial(nil)
			m, err := lock.New(conns[i], lock.Options{Pool: fleetPool, Image: image, Slots: 1, CheckInterval: 2 * time.Second,
				BackoffMin: boMin, BackoffMax: boMax, Node: fmt.Sprintf("f%d", i)})
			check(err)
			muts[i] = m
			check(muts[i].Ensure())
		}()
	}
	wg.Wait()
	r.SetupConnectS = time.Since(t0).Seconds()
	defer func() {
		for i := range nodes {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			_ = muts[i].Close(ctx)
			cancel()
			conns[i].Shutdown()
		}
	}()

	idle := 5 * time.Second
	before := osdOps()
	time.Sleep(idle)
	r.IdleOpsPerS = float64(osdOps()-before) / idle.Seconds()

	// The cost of one fallback poll: node 1 polls while node 0 holds the slot.
	if nodes > 1 {
		l, err := muts[0].TryLock(context.Background())
		check(err)
		const polls = 20
		b := osdOps()
		for range polls {
			if _, err := muts[1].TryLock(context.Background()); !errors.Is(err, lock.ErrLocked) {
				fail("fleet: poll against a held lock: %v", err)
			}
		}
		r.OpsPerBusyPoll = float64(osdOps()-b) / polls
		// And one by a node queued behind node 1: answered from the queue.
		if nodes > 2 {
			if _, err := muts[2].TryLock(context.Background()); !errors.Is(err, lock.ErrLocked) {
				fail("fleet: poll against a held lock: %v", err)
			}
			b := osdOps()
			for range polls {
				if _, err := muts[2].TryLock(context.Background()); !errors.Is(err, lock.ErrLocked) {
					fail("fleet: poll behind a waiter: %v", err)
				}
			}
			r.OpsPerDeferredPoll = float64(osdOps()-b) / polls
			muts[2].StopWaiting()
		}
		muts[1].StopWaiting()
		check(l.Unlock())
		time.Sleep(100 * time.Millisecond) // the release's handover runs in the background
	}
	statsBefore := make([]lock.Stats, nodes)
	for i, m := range muts {
		statsBefore[i] = m.Stats()
	}

	var mu sync.Mutex
	var tenures []tenureRec
	waiting := map[int]time.Time{}
	var waits []time.Duration
	nodeWaits := make([][]time.Duration, nodes)
	done := make([]int, nodes)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()

	fmt.Printf("fleet: %d nodes × %d turns: running …\n", nodes, turns)
	ops0 := osdOps()
	start := time.Now()
	for i := range nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			m := muts[i]
			for turn := range turns {
				wantAt := time.Now()
				mu.Lock()
				waiting[i] = wantAt
				mu.Unlock()
				wakes := m.Stats().WakesReceived
				lease, err := m.Lock(ctx)
				if err != nil {
					if ctx.Err() != nil {
						return
					}
					fail("fleet node %d: %v", i, err)
				}
				how := "first try" // what the lock followed: a grant, or a poll after a backoff
				if turn > 0 {
					how = "poll"
					if m.Stats().WakesReceived > wakes {
						how = "wake"
					}
				}
				got := time.Now()
				mu.Lock()
				// Out of order: another node had started waiting clearly before this one (the
				// lock records a waiter's start a few ms after wantAt; the first turns race).
				for j, w := range waiting {
					if turn > 0 && j != i && w.Before(wantAt.Add(-10*time.Millisecond)) {
						r.OutOfOrder++
						if how == "poll" {
							r.OutOfOrderByPoll++
						}
						break
					}
				}
				if turn > 0 {
					r.AcquiredAfter[how]++
				}
				delete(waiting, i)
				waits = append(waits, got.Sub(wantAt))
				nodeWaits[i] = append(nodeWaits[i], got.Sub(wantAt))
				mu.Unlock()
				time.Sleep(hold) // the simulated flatten
				unlockAt := time.Now()
				if err := lease.Unlock(); err != nil {
					fail("fleet node %d: unlock: %v", i, err)
				}
				freeAt := time.Now()
				mu.Lock()
				tenures = append(tenures, tenureRec{node: i, acquired: got, unlockAt: unlockAt, freeAt: freeAt})
				done[i]++
				mu.Unlock()
			}
			m.StopWaiting()
		}()
	}
	wg.Wait()
	r.DurationS = time.Since(start).Seconds()
	r.TimedOut = ctx.Err() != nil
	r.OSDOps = osdOps() - ops0

	slices.SortFunc(tenures, func(a, b tenureRec) int { return a.acquired.Compare(b.acquired) })
	var gaps, gaps2, unl []time.Duration
	for k, t := range tenures {
		unl = append(unl, t.freeAt.Sub(t.unlockAt))
		if k == 0 {
			continue
		}
		p := tenures[k-1]
		if p.node != t.node {
			r.Handovers++
			gaps = append(gaps, t.acquired.Sub(p.freeAt))
			gaps2 = append(gaps2, t.acquired.Sub(p.unlockAt))
		}
	}
	r.Tenures = len(tenures)
	r.Gap, r.GapFromUnlockCall, r.UnlockCall, r.Wait = distOf(gaps), distOf(gaps2), distOf(unl), distOf(waits)
	cycle := r.DurationS / float64(max(len(tenures), 1))
	r.FairShareMS = float64(nodes-1) * cycle * 1000
	r.MaxWaitOverFair = r.Wait.MaxMS / r.FairShareMS
	r.NodeMeanWaitMinS = math.Inf(1)
	for i := range nodes {
		r.NotFinishedTurns += turns - done[i]
		d := distOf(nodeWaits[i])
		r.NodeMeanWaitMinS = min(r.NodeMeanWaitMinS, d.MeanMS/1000)
		r.NodeMeanWaitMaxS = max(r.NodeMeanWaitMaxS, d.MeanMS/1000)
		if done[i] < turns || d.MaxMS > 3*r.FairShareMS {
			r.Starved++
		}
	}
	var st lock.Stats
	for i, m := range muts {
		s, b := m.Stats(), statsBefore[i]
		s.Attempts, s.Busy, s.NotifiesSent, s.Grants = s.Attempts-b.Attempts, s.Busy-b.Busy, s.NotifiesSent-b.NotifiesSent, s.Grants-b.Grants
		s.PollsDeferred -= b.PollsDeferred
		st.Attempts += s.Attempts
		st.Busy += s.Busy
		st.PollsDeferred += s.PollsDeferred
		st.NotifiesSent += s.NotifiesSent
		st.Grants += s.Grants
	}
	h := float64(max(r.Handovers, 1))
	r.AttemptsPerHandover, r.BusyPerHandover = float64(st.Attempts)/h, float64(st.Busy)/h
	r.NotifiesPerHandover, r.GrantsPerHandover = float64(st.NotifiesSent)/h, float64(st.Grants)/h
	r.FallbackPollsShare = float64(st.Busy) / float64(max(st.Attempts, 1))
	r.OpsPerHandover = float64(r.OSDOps) / h
	r.NetOpsPerHandover = (float64(r.OSDOps) - r.IdleOpsPerS*r.DurationS) / h
	r.DeferredPerHandover = float64(st.PollsDeferred) / h
	r.HandoverOnlyOps = r.NetOpsPerHandover - (r.BusyPerHandover-r.DeferredPerHandover)*r.OpsPerBusyPoll - r.DeferredPerHandover*r.OpsPerDeferredPoll
	fmt.Printf("fleet: %d nodes: %d handovers in %.1fs, gap %s; wait %s; ops/handover %.1f (net %.1f)\n",
		nodes, r.Handovers, r.DurationS, r.Gap, r.Wait, r.OpsPerHandover, r.NetOpsPerHandover)
	return r
}
