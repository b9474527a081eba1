package main

import (
	"bytes"
	"testing"
)

// Off a terminal, one line per tenth, started afresh for each image.
func TestProgressPlain(t *testing.T) {
	var b bytes.Buffer
	p := newProgressPrinter(&b)
	for _, d := range []uint64{0, 5, 10, 11, 55, 100} {
		p.print("rbd/a", d, 100)
	}
	p.print("rbd/b", 1, 0) // no total: nothing
	p.print("rbd/b", 50, 200)
	want := "rbd/a: 0% (0/100 objects)\nrbd/a: 10% (10/100 objects)\nrbd/a: 50% (55/100 objects)\nrbd/a: 100% (100/100 objects)\nrbd/b: 20% (50/200 objects)\n"
	if b.String() != want {
		t.Errorf("got\n%s\nwant\n%s", b.String(), want)
	}
}
