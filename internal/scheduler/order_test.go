package scheduler

import (
	"strings"
	"testing"
	"time"

	"github.com/flattend/flattend/internal/discovery"
	"github.com/flattend/flattend/internal/rbdimage"
)

func TestOrder(t *testing.T) {
	day := func(d int) time.Time { return time.Date(2026, 1, d, 0, 0, 0, 0, time.UTC) }
	clones := func() []discovery.Clone {
		return []discovery.Clone{
			{Spec: rbdimage.Spec{Pool: "p", Image: "a"}, Depth: 1, Created: day(3), Overlap: 10},
			{Spec: rbdimage.Spec{Pool: "p", Image: "b"}, Depth: 2, Created: day(5), Overlap: 30},
			{Spec: rbdimage.Spec{Pool: "p", Image: "c"}, Depth: 1, Created: day(1), Overlap: 20},
			{Spec: rbdimage.Spec{Pool: "p", Image: "d"}, Depth: 2, Created: day(5), Overlap: 5},
			{Spec: rbdimage.Spec{Pool: "p", Image: "e"}, Depth: 1, Created: day(1), Overlap: 20},
		}
	}
	for _, tc := range []struct {
		keys []string
		want string
	}{
		{[]string{"depth", "age", "size"}, "d b c e a"},
		{[]string{"size"}, "d a c e b"},
		{[]string{"age", "depth"}, "c e a b d"},
		{nil, "a b c d e"},
	} {
		cs := clones()
		Order(cs, tc.keys)
		var got []string
		for _, c := range cs {
			got = append(got, c.Image)
		}
		if strings.Join(got, " ") != tc.want {
			t.Errorf("Order(%v) = %v, want %s", tc.keys, got, tc.want)
		}
	}
}
