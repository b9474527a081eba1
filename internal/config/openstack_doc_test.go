package config

import (
	"fmt"
	"os"
	"regexp"
	"strings"
	"testing"
)

// The OpenStack quickstart's configs are what operators copy: each must load as it is written
// (its Ansible/Jinja parts filled in), without a warning, and name only pools that the guide's
// cephx command lets flattend write.
const openstackDoc = "../../docs/openstack.md"

// docConfigMarker precedes each ```yaml block of docs/openstack.md that is a flattend config.
const docConfigMarker = "<!-- flattend-config -->"

type docBlock struct {
	line int // of the block's first YAML line in the document
	text string
}

// markedYAMLBlocks returns the ```yaml blocks that follow a docConfigMarker line.
func markedYAMLBlocks(doc string) ([]docBlock, error) {
	lines := strings.Split(doc, "\n")
	var blocks []docBlock
	for i := 0; i < len(lines); i++ {
		if strings.TrimSpace(lines[i]) != docConfigMarker {
			continue
		}
		if i+1 >= len(lines) || strings.TrimSpace(lines[i+1]) != "```yaml" {
			return nil, fmt.Errorf("line %d: %s is not followed by a ```yaml line", i+1, docConfigMarker)
		}
		start := i + 2
		end := start
		for end < len(lines) && strings.TrimSpace(lines[end]) != "```" {
			end++
		}
		if end == len(lines) {
			return nil, fmt.Errorf("line %d: the yaml block does not end", start)
		}
		blocks = append(blocks, docBlock{line: start + 1, text: strings.Join(lines[start:end], "\n") + "\n"})
		i = end
	}
	return blocks, nil
}

var (
	jinjaExpr = regexp.MustCompile(`\{\{[^}]*\}\}`)
	jinjaTag  = regexp.MustCompile(`^\s*\{%.*%\}\s*$`)
)

// fillJinja turns an Ansible template into the config one host gets: every {{ expression }}
// becomes "h1" (valid as a node name and as the host of host:port), and lines that hold only a
// {% tag %} become empty, so the text inside an {% if %} is kept and checked too, and line
// numbers stay.
func fillJinja(tmpl string) (string, error) {
	var out []string
	for _, l := range strings.Split(tmpl, "\n") {
		if jinjaTag.MatchString(l) {
			l = ""
		}
		l = jinjaExpr.ReplaceAllString(l, "h1")
		if strings.Contains(l, "{{") || strings.Contains(l, "{%") || strings.Contains(l, "{#") {
			return "", fmt.Errorf("unsupported Jinja in %q", l)
		}
		out = append(out, l)
	}
	return strings.Join(out, "\n"), nil
}

var (
	cephxOSDCaps  = regexp.MustCompile(`osd '([^']*)'`)
	cephxWritable = regexp.MustCompile(`(?:^|,)\s*profile rbd pool=([A-Za-z0-9_.-]+)`)
)

// writablePools are the pools the doc's `ceph auth get-or-create client.flattend` command gives
// `profile rbd` (read-write) on.
func writablePools(doc string) (map[string]bool, error) {
	i := strings.Index(doc, "ceph auth get-or-create client.flattend")
	if i < 0 {
		return nil, fmt.Errorf("no `ceph auth get-or-create client.flattend` command")
	}
	m := cephxOSDCaps.FindStringSubmatch(doc[i:])
	if m == nil {
		return nil, fmt.Errorf("no osd '…' caps after `ceph auth get-or-create client.flattend`")
	}
	pools := map[string]bool{}
	for _, p := range cephxWritable.FindAllStringSubmatch(m[1], -1) {
		pools[p[1]] = true
	}
	return pools, nil
}

// docConfigProblems lists what is wrong with the marked configs of doc: each one a problem.
func docConfigProblems(name, doc string) []string {
	blocks, err := markedYAMLBlocks(doc)
	if err != nil {
		return []string{fmt.Sprintf("%s: %v", name, err)}
	}
	if len(blocks) == 0 {
		return []string{fmt.Sprintf("%s: no config marked %s", name, docConfigMarker)}
	}
	writable, err := writablePools(doc)
	if err != nil {
		return []string{fmt.Sprintf("%s: %v", name, err)}
	}
	var problems []string
	for _, b := range blocks {
		where := fmt.Sprintf("%s:%d", name, b.line)
		y, err := fillJinja(b.text)
		if err != nil {
			problems = append(problems, fmt.Sprintf("%s: %v", where, err))
			continue
		}
		// Blank lines in front: errors name the document's own lines.
		cfg, err := Parse(name, []byte(strings.Repeat("\n", b.line-1)+y))
		if err != nil {
			problems = append(problems, err.Error())
			continue
		}
		for _, w := range cfg.Warnings() {
			problems = append(problems, "warning: "+w.Error())
		}
		if !writable[cfg.Lock.Pool] {
			problems = append(problems, fmt.Sprintf("%s: lock.pool %q has no `profile rbd pool=%s` in the cephx command", where, cfg.Lock.Pool, cfg.Lock.Pool))
		}
		for _, p := range cfg.Discovery.Pools {
			if !writable[p.Pool] {
				problems = append(problems, fmt.Sprintf("%s: discovery pool %q has no `profile rbd pool=%s` in the cephx command", where, p.Pool, p.Pool))
			}
		}
	}
	return problems
}

func TestOpenStackDocConfigs(t *testing.T) {
	doc, err := os.ReadFile(openstackDoc)
	if err != nil {
		t.Fatal(err)
	}
	blocks, err := markedYAMLBlocks(string(doc))
	if err != nil {
		t.Fatal(err)
	}
	if len(blocks) < 2 { // the example config and the Ansible template
		t.Errorf("%s: %d configs marked %s, want at least 2", openstackDoc, len(blocks), docConfigMarker)
	}
	for _, p := range docConfigProblems(openstackDoc, string(doc)) {
		t.Error(p)
	}
}

// The checks above catch what they are for: a wrong key, a value error, a warning, a pool
// without write caps, Jinja the filler does not know.
func TestOpenStackDocConfigsCheckerRejects(t *testing.T) {
	const caps = "ceph auth get-or-create client.flattend \\\n    mon 'profile rbd' \\\n" +
		"    osd 'profile rbd pool=vms, profile rbd pool=volumes, profile rbd-read-only pool=images'\n\n"
	doc := func(yaml string) string {
		return "# doc\n\n" + caps + docConfigMarker + "\n```yaml\n" + yaml + "```\n"
	}
	good := "node: {{ inventory_hostname_short }}\nlock:\n  pool: vms\ndiscovery:\n  libvirt:\n    include_vm_disks: true\n" +
		"{% if shared %}\n  pools:\n    - pool: volumes\n      shared: true\n{% endif %}\nmetrics:\n  listen: \"{{ ip }}:9478\"\n"
	if p := docConfigProblems("good.md", doc(good)); len(p) > 0 {
		t.Fatalf("a good config rejected: %q", p)
	}
	for _, tc := range []struct{ name, yaml, want string }{
		{"wrong key", "lok:\n  pool: vms\ndiscovery: {libvirt: {}}\n", `lok: unknown key "lok"`},
		{"wrong nested key", "lock: {pool: vms}\ndiscovery:\n  libvirt:\n    include_vm_disk: true\n", `discovery.libvirt.include_vm_disk: unknown key`},
		{"bad value", "lock: {pool: vms}\ndiscovery: {libvirt: {}}\nflatten: {in_use: never}\n", `flatten.in_use`},
		{"warning", "lock: {pool: vms}\ndiscovery: {libvirt: {}}\ncleanup: {parent_snapshots: true, snapshot_pattern: \"^snapshot-\"}\n", `warning: `},
		{"lock pool without caps", "lock: {pool: rbd}\ndiscovery: {libvirt: {}}\n", `lock.pool "rbd" has no`},
		{"read-only discovery pool", "lock: {pool: vms}\ndiscovery: {pools: [{pool: images, shared: true}]}\n", `discovery pool "images" has no`},
		{"unknown jinja", "lock: {pool: vms}\ndiscovery: {libvirt: {}}\nnode: {{ a }}{% if b %}x{% endif %}\n", `unsupported Jinja`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := docConfigProblems("bad.md", doc(tc.yaml))
			if !strings.Contains(strings.Join(p, "\n"), tc.want) {
				t.Errorf("problems %q, want one containing %q", p, tc.want)
			}
		})
	}
	if p := docConfigProblems("none.md", "# doc\n\n"+caps+"```yaml\nlok: 1\n```\n"); len(p) != 1 || !strings.Contains(p[0], "no config marked") {
		t.Errorf("a doc without marked configs: %q", p)
	}
}
