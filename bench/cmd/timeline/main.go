// Command timeline draws an SVG timeline of flattens from flattend JSON logs:
//
//	go run ./bench/cmd/timeline [-o out.svg] [-title T] LOG...
//
// One log per flattend process; lines that are not JSON are skipped. A log whose lines carry no
// "node" field is named after its file.
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/flattend/flattend/bench/timeline"
)

func main() {
	out := flag.String("o", "timeline.svg", "SVG file to write (- for stdout)")
	title := flag.String("title", "flattend: who flattened what, when", "title")
	flag.Parse()
	if flag.NArg() == 0 {
		fmt.Fprintln(os.Stderr, "usage: timeline [-o out.svg] [-title T] LOG...")
		os.Exit(2)
	}
	var bars []timeline.Bar
	for _, p := range flag.Args() {
		f, err := os.Open(p)
		if err != nil {
			fmt.Fprintln(os.Stderr, "timeline:", err)
			os.Exit(1)
		}
		b, err := timeline.Parse(f, strings.TrimSuffix(filepath.Base(p), filepath.Ext(p)))
		f.Close()
		if err != nil {
			fmt.Fprintln(os.Stderr, "timeline:", p+":", err)
			os.Exit(1)
		}
		bars = append(bars, b...)
	}
	w := os.Stdout
	if *out != "-" {
		f, err := os.Create(*out)
		if err != nil {
			fmt.Fprintln(os.Stderr, "timeline:", err)
			os.Exit(1)
		}
		defer f.Close()
		w = f
	}
	if err := timeline.WriteSVG(w, *title, bars); err != nil {
		fmt.Fprintln(os.Stderr, "timeline:", err)
		os.Exit(1)
	}
	if *out != "-" {
		fmt.Println(*out)
	}
}
