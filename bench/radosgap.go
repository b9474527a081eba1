package main

// The lock bench's RADOS-level handover gap, independent of flattend's logs: for each clone, the
// first and the last write to its data objects (rbd_data.<image id>.*) as the OSD saw them, then
// the gaps between consecutive flattens, ordered by their first write.
//
// Source: the OSD's op history, `ceph daemon <osd.0 admin socket> dump_historic_ops` (the socket
// path from `ceph-conf -n osd.0 --lookup admin_socket`; osd_op_history_size and
// osd_op_history_duration raised with `ceph config set osd …`). Each op there carries the OSD's
// receive time (initiated_at: the message header read) and its duration to "done" (commit sent),
// the object name, the flags (read/write) and the client. A flatten's copy-ups show as writes
// ("call rbd.sparse_copyup …, write 0~0"). A write counts if its object is rbd_data.<id>.* of a
// clone of the run, its flags say write, and it is not a delete. Timestamps: microseconds, all from
// the OSD's one clock (the bench cluster has one OSD). Not used: object mtimes (go-ceph's
// IOContext.Stat gives whole seconds, and the mtime is the client's stamp, not the OSD's).
//
// Gaps: "received → received" is from the last write's receipt to the next flatten's first
// write's receipt; "idle" is from the last write's completion to the next first receipt (what the
// OSD's data path sat idle, the last write's own service time excluded). flattend and the
// fixed-tick variants: only handovers between different nodes (the clone's owner, known from the
// bench's own clone list) count; a node's consecutive turns are counted apart (same_node_*).
// Every other variant has one worker, so every consecutive pair counts. A negative gap is an
// overlap: two flattens writing at the same time.
//
// The first write of a flatten comes after librbd has read the parent's object, and the gap holds
// the previous flatten's tail after its last copy-up (remove_child, header, unlock, close) and the
// next one's start (open, exclusive lock, object map): what flattend's log-based gaps leave inside
// "flatten". The mgr queue shows about one 5 s gap per run: tasks added while its handler sweeps
// wait for the next tick (rbd_support/task.py, condition.wait(5)).

import (
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"
)

const radosGapSource = "OSD op history: ceph daemon <osd.0 asok> dump_historic_ops (receive time = initiated_at, done = initiated_at + duration)"

// radosGap is one run's (or a variant's pooled) RADOS-level gaps.
type radosGap struct {
	Flattens      int       `json:"flattens"`        // clones whose data-object writes were found
	WritesPerFlat [2]int    `json:"writes_per_flat"` // min, max
	Gap           dist      `json:"gap_last_write_received_to_next_first_received"`
	Idle          dist      `json:"gap_last_write_done_to_next_first_received"`
	SameNode      dist      `json:"same_node_received_to_next_first_received"` // flattend, fixed-tick
	Overlaps      int       `json:"overlaps"`                                  // negative gaps among Gap
	LastWriteMS   float64   `json:"last_write_service_ms_p50"`                 // receipt → done of the last writes
	Clients       int       `json:"writer_clients"`                            // distinct RADOS clients that wrote
	GapsMS        []float64 `json:"gaps_ms,omitempty"`                         // one run's gaps in flatten order (handovers only)
	gaps, idle    []time.Duration
	same, service []time.Duration
	n             int
}

// osdHistory reads the OSD's op history through its admin socket.
type osdHistory struct {
	asok   string
	pooled map[string]*radosGap
}

func newOSDHistory(conn *rados.Conn, size int) *osdHistory {
	o, err := exec.Command("ceph-conf", "-c", os.Getenv("CEPH_CONF"), "-n", "osd.0", "--lookup", "admin_socket").Output()
	if err != nil {
		fail("the OSD's admin socket: ceph-conf: %v", err)
	}
	for k, v := range map[string]string{"osd_op_history_size": fmt.Sprint(size), "osd_op_history_duration": "3600"} {
		cmd, _ := json.Marshal(map[string]any{"prefix": "config set", "who": "osd", "name": k, "value": v})
		if _, s, err := conn.MonCommand(cmd); err != nil {
			fail("config set osd %s: %v %s", k, err, s)
		}
	}
	return &osdHistory{asok: strings.TrimSpace(string(o)), pooled: map[string]*radosGap{}}
}

type histOp struct {
	Desc     string  `json:"description"`
	At       string  `json:"initiated_at"`
	Duration float64 `json:"duration"`
	TypeData struct {
		ClientInfo struct {
			Client string `json:"client"`
		} `json:"client_info"`
	} `json:"type_data"`
}

// dataWrite is one write to an image's data object, as the OSD saw it.
type dataWrite struct {
	id, client string
	recv, done time.Time
}

var dataObj = regexp.MustCompile(`:::rbd_data\.([0-9a-f]+)\.[0-9a-f]+:\S+ \[([^\]]*)\] .* ([a-z_+]+) e\d+\)$`)

const histTime = "2006-01-02T15:04:05.999999-0700"

// writes dumps the history and returns the writes to data objects received since since. It fails
// if the history does not reach back to since (raise -lock-osd-history).
func (h *osdHistory) writes(since time.Time) []dataWrite {
	o, err := exec.Command("ceph", "daemon", h.asok, "dump_historic_ops").Output()
	if err != nil {
		fail("ceph daemon %s dump_historic_ops: %v", h.asok, err)
	}
	var d struct {
		Size int      `json:"size"`
		Ops  []histOp `json:"ops"`
	}
	check(json.Unmarshal(o, &d))
	var ws []dataWrite
	oldest := time.Now()
	for _, op := range d.Ops {
		at, err := time.Parse(histTime, op.At)
		check(err)
		oldest = minT(oldest, at)
		m := dataObj.FindStringSubmatch(op.Desc)
		if m == nil || at.Before(since) || !strings.Contains(m[3], "write") || strings.HasPrefix(m[2], "delete") {
			continue
		}
		done := at.Add(time.Duration(op.Duration * float64(time.Second)))
		ws = append(ws, dataWrite{id: m[1], client: op.TypeData.ClientInfo.Client, recv: at, done: done})
	}
	if len(d.Ops) >= d.Size && oldest.After(since) {
		fail("the OSD's op history (%d ops) does not reach back to the run's start: raise -lock-osd-history", d.Size)
	}
	return ws
}

// flatSpan is one clone's writes: the first receipt, the last receipt and the last done.
type flatSpan struct {
	clone, node       string
	first, last, done time.Time
	lastService       time.Duration
	writes            int
}

// measure computes a run's gaps. ids: image id → clone; nodeOf: clone → node ("" for every clone
// of a one-worker variant); objects: the data objects each flatten must write.
func (h *osdHistory) measure(variant string, since time.Time, ids, nodeOf map[string]string, objects int) *radosGap {
	spans := map[string]*flatSpan{}
	clients := map[string]bool{}
	for _, w := range h.writes(since) {
		c, ok := ids[w.id]
		if !ok {
			continue
		}
		clients[w.client] = true
		s := spans[c]
		if s == nil {
			s = &flatSpan{clone: c, node: nodeOf[c], first: w.recv}
			spans[c] = s
		}
		s.writes++
		s.first = minT(s.first, w.recv)
		if w.recv.After(s.last) {
			s.last, s.lastService = w.recv, w.done.Sub(w.recv)
		}
		s.done = maxT(s.done, w.done)
	}
	if len(spans) != len(ids) {
		fail("%s: the OSD's history has data writes for %d of %d clones", variant, len(spans), len(ids))
	}
	g := &radosGap{Clients: len(clients)}
	g.add(slices.SortedFunc(maps.Values(spans), func(a, b *flatSpan) int { return a.first.Compare(b.first) }), objects, variant)
	g.finish()
	p := h.pooled[variant]
	if p == nil {
		p = &radosGap{}
		h.pooled[variant] = p
	}
	p.merge(g)
	return g
}

func (g *radosGap) add(ss []*flatSpan, objects int, variant string) {
	g.WritesPerFlat = [2]int{ss[0].writes, ss[0].writes}
	for i, s := range ss {
		if s.writes < objects {
			fail("%s: %s: %d data writes in the OSD's history, want %d (one per object)", variant, s.clone, s.writes, objects)
		}
		g.WritesPerFlat = [2]int{min(g.WritesPerFlat[0], s.writes), max(g.WritesPerFlat[1], s.writes)}
		g.n++
		if i == 0 {
			continue
		}
		p := ss[i-1]
		gap := s.first.Sub(p.last)
		if s.node == "" || p.node != s.node {
			g.gaps, g.idle = append(g.gaps, gap), append(g.idle, s.first.Sub(p.done))
			g.service = append(g.service, p.lastService)
			g.GapsMS = append(g.GapsMS, float64(gap.Microseconds())/1000)
			if gap < 0 {
				g.Overlaps++
			}
		} else {
			g.same = append(g.same, gap)
		}
	}
}

func (g *radosGap) merge(o *radosGap) {
	g.n += o.n
	if g.WritesPerFlat == [2]int{} {
		g.WritesPerFlat = o.WritesPerFlat
	}
	g.WritesPerFlat = [2]int{min(g.WritesPerFlat[0], o.WritesPerFlat[0]), max(g.WritesPerFlat[1], o.WritesPerFlat[1])}
	g.Overlaps += o.Overlaps
	g.Clients = max(g.Clients, o.Clients)
	g.gaps, g.idle = append(g.gaps, o.gaps...), append(g.idle, o.idle...)
	g.same, g.service = append(g.same, o.same...), append(g.service, o.service...)
	g.finish()
}

func (g *radosGap) finish() {
	g.Flattens = g.n
	g.Gap, g.Idle, g.SameNode = distOf(g.gaps), distOf(g.idle), distOf(g.same)
	g.LastWriteMS = distOf(g.service).P50MS
}

// cloneNodes maps each clone to its node for the variants with several nodes (the bench's own
// assignment, names[node]), and to "" for the one-worker variants.
func cloneNodes(variant string, names [][]string) map[string]string {
	m := map[string]string{}
	for n, cs := range names {
		for _, c := range cs {
			if variant == "flattend" || strings.HasPrefix(variant, "fixed-tick") {
				m[c] = fmt.Sprintf("h%d", n+1)
			} else {
				m[c] = ""
			}
		}
	}
	return m
}

// imageIDs maps each clone's image id to its name (the data objects are rbd_data.<id>.*).
func imageIDs(ioctx *rados.IOContext, clones []string) map[string]string {
	ids := map[string]string{}
	for _, c := range clones {
		img, err := rbd.OpenImageReadOnly(ioctx, c, rbd.NoSnapshot)
		check(err)
		id, err := img.GetId()
		check(err)
		check(img.Close())
		ids[id] = c
	}
	return ids
}

// print prints each run's RADOS-level gaps and the pooled ones per variant.
func (h *osdHistory) print(runs []lockRun) {
	fmt.Printf("\nRADOS-level handover gap (source: %s)\n", radosGapSource)
	fmt.Printf("%5s %-17s %8s %8s %5s %9s\n", "round", "variant", "p50", "max", "n", "same-node")
	for _, r := range runs {
		if g := r.Rados; g != nil {
			fmt.Printf("%5d %-17s %5.1f ms %5.1f ms %5d %9d\n", r.Round, r.Variant, g.Gap.P50MS, g.Gap.MaxMS, g.Gap.N, g.SameNode.N)
		}
	}
	fmt.Println("pooled over rounds:")
	fmt.Printf("%-17s %8s %8s %8s %8s %5s %9s %8s %9s %8s\n", "variant", "p50", "p90", "p99", "max", "n", "idle p50", "overlaps", "same-node", "writes")
	for _, v := range slices.Sorted(maps.Keys(h.pooled)) {
		g := h.pooled[v]
		fmt.Printf("%-17s %5.1f ms %5.1f ms %5.1f ms %5.1f ms %5d %6.1f ms %8d %9d %4d-%d\n", v, g.Gap.P50MS, g.Gap.P90MS, g.Gap.P99MS, g.Gap.MaxMS,
			g.Gap.N, g.Idle.P50MS, g.Overlaps, g.SameNode.N, g.WritesPerFlat[0], g.WritesPerFlat[1])
	}
	fmt.Println("(last data write received by the OSD → next flatten's first received; idle: last write done → next first received;")
	fmt.Println(" flattend/fixed-tick: handovers between different nodes only, a node's consecutive turns counted as same-node)")
}

// pooledMap returns the pooled gaps per variant, for lock.json.
func (h *osdHistory) pooledMap() map[string]radosGap {
	m := map[string]radosGap{}
	for k, v := range h.pooled {
		m[k] = *v
	}
	return m
}
