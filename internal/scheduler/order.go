package scheduler

import (
	"cmp"
	"slices"

	"github.com/flattend/flattend/internal/discovery"
)

// Order sorts clones for flattening by keys, most important first: "depth" puts the deepest
// clone chains first (each flatten of a deep clone shortens the chain every read walks), "age"
// the oldest clones (they have waited longest), "size" the smallest (more clones done per hour
// when the window is short). Ties end in spec order, so every pass uses the same order.
func Order(clones []discovery.Clone, keys []string) {
	slices.SortStableFunc(clones, func(a, b discovery.Clone) int {
		for _, k := range keys {
			var c int
			switch k {
			case "depth":
				c = cmp.Compare(b.Depth, a.Depth)
			case "age":
				c = a.Created.Compare(b.Created)
			case "size":
				c = cmp.Compare(a.Overlap, b.Overlap)
			}
			if c != 0 {
				return c
			}
		}
		return cmp.Compare(a.String(), b.String())
	})
}
