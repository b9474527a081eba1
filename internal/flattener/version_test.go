package flattener

import "testing"

func TestCopyupFixed(t *testing.T) {
	for v, want := range map[string]bool{
		"16.2.15":          false,
		"17.2.8":           false,
		"18.2.4":           false,
		"18.2.5":           true,
		"18.2.7":           true,
		"18.2.7-1~bpo12+1": true,
		"19.2.0":           false,
		"19.2.1":           true,
		"19.2.3-45-gabc":   true,
		"19.3.0":           false,
		"20.2.4":           true,
		"":                 false,
		"garbage":          false,
		"18.x.9":           false,
		"18.2":             false,
	} {
		if got := CopyupFixed(v); got != want {
			t.Errorf("CopyupFixed(%q) = %v, want %v", v, got, want)
		}
	}
}
