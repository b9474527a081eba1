package rbdimage

import "testing"

func TestParseAndString(t *testing.T) {
	for _, text := range []string{"p/i", "p/ns/i", "p/i@s", "p/ns/i@s"} {
		s, err := Parse(text)
		if err != nil {
			t.Fatalf("Parse(%q): %v", text, err)
		}
		if got := s.String(); got != text {
			t.Errorf("Parse(%q).String() = %q", text, got)
		}
	}
	if s, _ := Parse("p//i"); s != (Spec{Pool: "p", Image: "i"}) {
		t.Errorf("an empty namespace is the default one: %+v", s)
	}
	for _, bad := range []string{"", "p", "/i", "p/", "p/i@", "a/b/c/d", "p/ns/"} {
		if _, err := Parse(bad); err == nil {
			t.Errorf("Parse(%q) accepted", bad)
		}
	}
}
