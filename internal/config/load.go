package config

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"
)

// Error is a configuration error at a place in a file.
type Error struct {
	File  string
	Line  int    // 0 when the problem is the file as a whole
	Field string // dotted path, empty when unknown
	Msg   string
}

func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString(e.File)
	if e.Line > 0 {
		b.WriteString(":" + strconv.Itoa(e.Line))
	}
	b.WriteString(": ")
	if e.Field != "" {
		b.WriteString(e.Field + ": ")
	}
	b.WriteString(e.Msg)
	return b.String()
}

// Errors is every problem found in one file, in file order.
type Errors []*Error

func (es Errors) Error() string {
	msgs := make([]string, len(es))
	for i, e := range es {
		msgs[i] = e.Error()
	}
	return strings.Join(msgs, "\n")
}

// Load reads, decodes (strictly: unknown keys are errors), fills in defaults and validates path.
// Any error is a config.Errors.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		var msg string
		switch {
		case errors.Is(err, os.ErrNotExist):
			msg = "no such file (write one; see config.example.yaml)"
		case errors.Is(err, os.ErrPermission):
			msg = "permission denied"
		default:
			msg = err.Error()
		}
		return nil, Errors{{File: path, Msg: msg}}
	}
	return Parse(path, data)
}

var yamlLine = regexp.MustCompile(`^(?:yaml: )?line (\d+): (.*)$`)

// Parse is Load on bytes already read; path only names them in errors.
func Parse(path string, data []byte) (*Config, error) {
	return guard(path, func() (*Config, error) { return parse(path, data) })
}

// guard runs f and turns a panic in it into an Error: whatever a hostile file does to a
// library, `check` reports it and a reload keeps the running config instead of killing the
// daemon.
func guard(path string, f func() (*Config, error)) (cfg *Config, err error) {
	defer func() {
		if r := recover(); r != nil {
			cfg, err = nil, Errors{{File: path, Msg: fmt.Sprintf("cannot read this configuration (internal error: %v)", r)}}
		}
	}()
	return f()
}

func parse(path string, data []byte) (*Config, error) {
	cfg, places, es := decode(path, data)
	if len(es) > 0 {
		return nil, es
	}
	cfg.applyPresenceDefaults(places)
	if es := cfg.validate(places); len(es) > 0 {
		return nil, es
	}
	return &cfg, nil
}

// decode reads data over Defaults() and returns, with it, the line of every key path set.
func decode(path string, data []byte) (Config, map[string]int, Errors) {
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return Config{}, nil, Errors{yamlError(path, err.Error(), nil)}
	}
	places := map[string]int{}
	lineFields := map[int]string{}
	if len(root.Content) > 0 {
		doc := root.Content[0]
		if doc.Kind != yaml.MappingNode {
			return Config{}, nil, Errors{{File: path, Line: doc.Line, Msg: "the configuration must be a mapping of keys (node:, ceph:, lock: …)"}}
		}
		walk(doc, "", places, lineFields)
	}

	cfg := Defaults()
	cfg.Path = path
	if len(bytes.TrimSpace(data)) == 0 {
		return cfg, places, nil
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&cfg); err != nil {
		var te *yaml.TypeError
		if !errors.As(err, &te) {
			return Config{}, nil, Errors{yamlError(path, err.Error(), lineFields)}
		}
		var es Errors
		for _, m := range te.Errors {
			es = append(es, yamlError(path, m, lineFields))
		}
		return Config{}, nil, es
	}
	return cfg, places, nil
}

// applyPresenceDefaults fills in the defaults that depend on which keys are present, which
// Defaults() cannot express.
func (c *Config) applyPresenceDefaults(places map[string]int) {
	// Ceph's tools take the name (client.flattend) and the id (flattend): so does the file.
	c.Ceph.User = strings.TrimPrefix(c.Ceph.User, "client.")
	for i := range c.Discovery.Pools {
		if _, set := places[fmt.Sprintf("discovery.pools[%d].owner_key", i)]; !set && !c.Discovery.Pools[i].Shared {
			c.Discovery.Pools[i].OwnerKey = DefaultOwnerKey
		}
	}
	if _, on := places["discovery.libvirt"]; on && c.Discovery.Libvirt == nil {
		c.Discovery.Libvirt = &LibvirtSource{} // `libvirt:` with nothing under it
	}
	if l := c.Discovery.Libvirt; l != nil && l.URI == "" {
		l.URI = DefaultLibvirtURI
	}
}

// walk records the line of every key path ("lock.pool", "discovery.pools[0].pool") and, per
// line, the path of the value that stands on it, so decoder errors can name their field.
func walk(n *yaml.Node, path string, places map[string]int, lineFields map[int]string) {
	switch n.Kind {
	case yaml.MappingNode:
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			p := k.Value
			if path != "" {
				p = path + "." + k.Value
			}
			places[p] = k.Line
			lineFields[k.Line] = p
			if v.Line != k.Line {
				lineFields[v.Line] = p
			}
			walk(v, p, places, lineFields)
		}
	case yaml.SequenceNode:
		for i, v := range n.Content {
			p := fmt.Sprintf("%s[%d]", path, i)
			places[p] = v.Line
			if _, ok := lineFields[v.Line]; !ok {
				lineFields[v.Line] = p
			}
			walk(v, p, places, lineFields)
		}
	}
}

var notFoundInType = regexp.MustCompile(`^field (\S+) not found in type \S+$`)
var cannotUnmarshal = regexp.MustCompile("^cannot unmarshal !!(\\w+) `(.*)` into (\\S+)$")

// yamlError turns a yaml.v3 message ("line 7: field x not found in type ...") into an Error.
func yamlError(path, msg string, lineFields map[int]string) *Error {
	e := &Error{File: path, Msg: msg}
	if m := yamlLine.FindStringSubmatch(msg); m != nil {
		e.Line, _ = strconv.Atoi(m[1])
		e.Msg = m[2]
		if !strings.Contains(e.Msg, "already defined") {
			e.Field = lineFields[e.Line]
		}
	}
	e.Msg = strings.TrimPrefix(e.Msg, "yaml: ")
	if m := notFoundInType.FindStringSubmatch(e.Msg); m != nil {
		e.Msg = fmt.Sprintf("unknown key %q", m[1])
	} else if m := cannotUnmarshal.FindStringSubmatch(e.Msg); m != nil {
		want := m[3]
		switch {
		case strings.HasPrefix(want, "[]"):
			want = "a list"
		case strings.HasPrefix(want, "config."), strings.HasPrefix(want, "map"):
			want = "a mapping of keys"
		case strings.HasPrefix(want, "int"):
			want = "a whole number"
		}
		e.Msg = fmt.Sprintf("%q is a %s, expected %s", m[2], yamlKind(m[1]), want)
	}
	return e
}

func yamlKind(tag string) string {
	switch tag {
	case "str":
		return "string"
	case "seq":
		return "list"
	case "map":
		return "mapping"
	case "float":
		return "number"
	}
	return tag
}
