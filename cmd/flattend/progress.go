package main

import (
	"fmt"
	"io"
	"os"
	"strings"
	"time"
)

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
