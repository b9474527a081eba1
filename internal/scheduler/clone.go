package scheduler

import (
	"github.com/flattend/flattend/internal/discovery"
	"github.com/flattend/flattend/internal/rbdimage"
)

// specOf is the image a discovered clone names.
func specOf(c discovery.Clone) rbdimage.Spec {
	return rbdimage.Spec{Pool: c.Pool, Namespace: c.Namespace, Image: c.Image}
}

// parentOf is the clone's parent snapshot, if known.
func parentOf(c discovery.Clone) (rbdimage.Spec, bool) {
	p, err := rbdimage.Parse(c.Parent)
	return p, err == nil && p.Snap != ""
}
