package backoff

import (
	"testing"
	"time"
)

func TestBackoff(t *testing.T) {
	b := Backoff{Min: 100 * time.Millisecond, Max: time.Second}
	bounds := []time.Duration{100, 200, 400, 800, 1000, 1000}
	for i, hi := range bounds {
		hi *= time.Millisecond
		d := b.Next()
		if d < hi/2 || d > hi {
			t.Errorf("wait %d = %s, want in [%s, %s]", i, d, hi/2, hi)
		}
	}
	b.Reset()
	if d := b.Next(); d > 100*time.Millisecond {
		t.Errorf("after Reset: %s", d)
	}
}
