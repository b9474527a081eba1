package main

import (
	"bytes"
	"io"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/flattend/flattend/internal/flattener"
	"github.com/flattend/flattend/internal/metrics"
)

// `flattend version` and `--version` need no config, and say which librbd runs and whether the
// lost-copy-up verification is on with it.
func TestVersion(t *testing.T) {
	ceph := flattener.CephVersion()
	if ceph == "" {
		t.Fatal("the Ceph version of the loaded libraries is unknown")
	}
	want := "verification before each flatten (flatten.verify_copyups: auto): on"
	if flattener.CopyupFixed(ceph) {
		want = "verification before each flatten (flatten.verify_copyups: auto): off"
	}
	for _, arg := range []string{"version", "--version"} {
		var out bytes.Buffer
		if code := run([]string{arg}, &out, io.Discard); code != exitOK {
			t.Fatalf("%s: exit %d", arg, code)
		}
		for _, w := range []string{"flattend " + version + " (commit ", "librbd: Ceph " + ceph + " (librbd API ", want} {
			if !strings.Contains(out.String(), w) {
				t.Errorf("%s output lacks %q:\n%s", arg, w, out.String())
			}
		}
	}
}

func TestBuildInfoMetric(t *testing.T) {
	m := metrics.New("h1")
	m.BuildInfo("1.2.3", "abc", "16.2.15")
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	for _, want := range []string{`flattend_build_info{librbd="16.2.15",revision="abc",version="1.2.3"} 1`, `flattend_node_info{node="h1"} 1`} {
		if !strings.Contains(rec.Body.String(), want) {
			t.Errorf("metrics lack %s", want)
		}
	}
}
