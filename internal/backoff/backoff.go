// Package backoff is a jittered exponential backoff, for waits that many nodes share.
package backoff

import (
	"math/rand/v2"
	"time"
)

// Backoff is a jittered exponential backoff between Min and Max ("full jitter" on the upper half:
// each wait is uniform in [d/2, d] so that many waiting nodes spread out).
type Backoff struct {
	Min, Max time.Duration
	cur      time.Duration
}

// Next returns the wait before the next attempt and doubles the bound.
func (b *Backoff) Next() time.Duration {
	if b.cur < b.Min {
		b.cur = b.Min
	}
	d := b.cur
	b.cur = min(b.cur*2, b.Max)
	half := d / 2
	return half + rand.N(d-half+1)
}

// Reset starts over from Min.
func (b *Backoff) Reset() { b.cur = 0 }
