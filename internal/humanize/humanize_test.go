package humanize

import (
	"strings"
	"testing"
)

func TestBytes(t *testing.T) {
	got := strings.Join([]string{Bytes(512), Bytes(64 << 20), Bytes(3 << 29)}, ", ")
	if got != "512 B, 64.0 MiB, 1.5 GiB" {
		t.Errorf("Bytes = %s", got)
	}
}
