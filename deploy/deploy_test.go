// Package deploy holds what ships beside the binary (systemd unit, Prometheus rules, Grafana
// dashboard); its tests check the rules and the dashboard against the code.
package deploy

import (
	"encoding/json"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/flattend/flattend/internal/metrics"
)

// The alert rules pass promtool's check and their unit tests (a firing and a quiet case per
// alert). promtool comes with Debian's prometheus package (make deps): without it this fails.
func TestPromtoolRules(t *testing.T) {
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Fatalf("promtool not found (%v): install Debian's prometheus package (make deps)", err)
	}
	for _, args := range [][]string{{"check", "rules", "flattend.rules.yml"}, {"test", "rules", "flattend.rules.test.yml"}} {
		cmd := exec.Command(promtool, args...)
		cmd.Dir = "prometheus"
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}

// Every alert of the rules file has a test in flattend.rules.test.yml.
func TestEveryAlertTested(t *testing.T) {
	var tests struct {
		Tests []struct {
			AlertRuleTest []struct {
				Alertname string           `yaml:"alertname"`
				ExpAlerts []map[string]any `yaml:"exp_alerts"`
			} `yaml:"alert_rule_test"`
		} `yaml:"tests"`
	}
	readYAML(t, "prometheus/flattend.rules.test.yml", &tests)
	firing, quiet := map[string]bool{}, map[string]bool{}
	for _, tc := range tests.Tests {
		for _, a := range tc.AlertRuleTest {
			if len(a.ExpAlerts) > 0 {
				firing[a.Alertname] = true
			} else {
				quiet[a.Alertname] = true
			}
		}
	}
	for _, r := range rules(t) {
		if r.Alert == "" {
			continue
		}
		if !firing[r.Alert] || !quiet[r.Alert] {
			t.Errorf("alert %s: firing case %v, quiet case %v in flattend.rules.test.yml; want both", r.Alert, firing[r.Alert], quiet[r.Alert])
		}
	}
}

// The rules and the dashboard query only metrics flattend exports: renaming a metric fails here.
func TestQueriesUseExportedMetrics(t *testing.T) {
	exported := map[string]bool{}
	for _, n := range metrics.New("test").Names() {
		exported[n] = true
	}
	var exprs []string
	for _, r := range rules(t) {
		exprs = append(exprs, r.Expr)
	}
	dash, err := os.ReadFile("grafana/flattend.json")
	if err != nil {
		t.Fatal(err)
	}
	var d any
	if err := json.Unmarshal(dash, &d); err != nil {
		t.Fatalf("grafana/flattend.json: %v", err)
	}
	dashExprs := valuesOf(d, "expr")
	if len(dashExprs) == 0 {
		t.Fatal("grafana/flattend.json: no expr found")
	}
	exprs = append(exprs, dashExprs...)
	used := map[string]bool{}
	for _, e := range exprs {
		for _, n := range metricName.FindAllString(e, -1) {
			if !exported[n] {
				for _, suffix := range []string{"_bucket", "_sum", "_count"} {
					if base, ok := strings.CutSuffix(n, suffix); ok && exported[base] {
						n = base
					}
				}
			}
			used[n] = true
			if !exported[n] {
				t.Errorf("%s is not a metric flattend exports (in %q)", n, e)
			}
		}
	}
	if len(used) < 10 {
		t.Errorf("only %d flattend metrics used: the extraction is broken", len(used))
	}
	if !slices.ContainsFunc(templating(d), func(v map[string]any) bool { return v["type"] == "datasource" }) {
		t.Error("grafana/flattend.json: no data source variable")
	}
}

var metricName = regexp.MustCompile(`\bflattend_[a-zA-Z0-9_]+`)

type rule struct {
	Alert string `yaml:"alert"`
	Expr  string `yaml:"expr"`
}

func rules(t *testing.T) []rule {
	t.Helper()
	var f struct {
		Groups []struct {
			Rules []rule `yaml:"rules"`
		} `yaml:"groups"`
	}
	readYAML(t, "prometheus/flattend.rules.yml", &f)
	var rs []rule
	for _, g := range f.Groups {
		rs = append(rs, g.Rules...)
	}
	if len(rs) == 0 {
		t.Fatal("prometheus/flattend.rules.yml: no rules")
	}
	return rs
}

func readYAML(t *testing.T, path string, v any) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, v); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}

// valuesOf returns every string value under key in v, at any depth.
func valuesOf(v any, key string) []string {
	var out []string
	switch v := v.(type) {
	case map[string]any:
		for k, e := range v {
			if s, ok := e.(string); ok && k == key {
				out = append(out, s)
			}
			out = append(out, valuesOf(e, key)...)
		}
	case []any:
		for _, e := range v {
			out = append(out, valuesOf(e, key)...)
		}
	}
	return out
}

func templating(d any) []map[string]any {
	var out []map[string]any
	if m, ok := d.(map[string]any); ok {
		if tm, ok := m["templating"].(map[string]any); ok {
			if list, ok := tm["list"].([]any); ok {
				for _, e := range list {
					if v, ok := e.(map[string]any); ok {
						out = append(out, v)
					}
				}
			}
		}
	}
	return out
}
