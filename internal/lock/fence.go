package lock

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"syscall"
	"time"

	"github.com/ceph/go-ceph/rados"

	"github.com/flattend/flattend/internal/cephconn"
)

// Fencing. Breaking a holder's lock is safe only if Ceph blocklists the holder's client first:
// then its flatten I/O stops too. librbd does it when rbd_blocklist_on_break_lock is on, which
// cephconn.Dial sets on every connection whatever ceph.conf says. After a break flattend still
// checks the OSD map's blocklist, adds the holder itself if it is missing (mon 'profile rbd'
// allows `osd blocklist add`), and refuses the slot if it still cannot see it there.

var (
	// ErrNotFenced means a holder whose lock was broken is not in the blocklist and could not be
	// added: it may still write.
	ErrNotFenced = errors.New("the broken holder is not blocklisted")
	// ErrFenceUnverified means the blocklist could not be read (the key may not list it): the
	// holder was most likely blocklisted by librbd, but nobody checked.
	ErrFenceUnverified = errors.New("could not verify that the broken holder is blocklisted")
)

// cephTime is how the monitors print a blocklist entry's expiry.
const cephTime = "2006-01-02T15:04:05.999999-0700"

// Blocklisted reports whether the client at addr is in the OSD map's blocklist, and until when.
func Blocklisted(conn *rados.Conn, addr string) (bool, time.Time, error) {
	out, err := monCommand(conn, map[string]any{"prefix": "osd blocklist ls", "format": "json"})
	if err != nil {
		return false, time.Time{}, err
	}
	var entries []struct {
		Addr  string `json:"addr"`
		Until string `json:"until"`
	}
	// Decode the first value only: some releases print more after it.
	if err := json.NewDecoder(bytes.NewReader(out)).Decode(&entries); err != nil {
		return false, time.Time{}, fmt.Errorf("osd blocklist ls: %w", err)
	}
	for _, e := range entries {
		if e.Addr == addr {
			until, _ := time.Parse(cephTime, e.Until)
			return true, until, nil
		}
	}
	return false, time.Time{}, nil
}

// Fence makes sure the client at addr, whose lock was (or is being) broken, is blocklisted: it
// looks in the blocklist and, if addr is missing, adds it and looks again. It returns when the
// entry expires, or an error wrapping ErrNotFenced or ErrFenceUnverified.
func Fence(conn *rados.Conn, addr string) (time.Time, error) {
	ok, until, err := Blocklisted(conn, addr)
	if err != nil {
		return time.Time{}, fmt.Errorf("%w: %s: %w", ErrFenceUnverified, addr, cephconn.WithHint(err))
	}
	if ok {
		return until, nil
	}
	_, aerr := monCommand(conn, map[string]any{"prefix": "osd blocklist", "blocklistop": "add", "addr": addr})
	if ok, until, err = Blocklisted(conn, addr); err == nil && ok {
		return until, nil
	}
	if aerr == nil {
		aerr = err
	}
	return time.Time{}, fmt.Errorf("%w: %s (osd blocklist add: %v)", ErrNotFenced, addr, aerr)
}

func monCommand(conn *rados.Conn, cmd map[string]any) ([]byte, error) {
	b, _ := json.Marshal(cmd)
	out, status, err := conn.MonCommand(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w (%s)", cmd["prefix"], err, status)
	}
	return out, nil
}

// BlocklistExpiry is how long the monitors blocklist a client when librbd breaks its lock
// (mon_osd_blocklist_default_expire: flattend asks for no other time). known is false when this
// key may read neither the monitors' config nor the config database (mon 'profile rbd' reads only
// the latter), and the option is not in the latter: then it is Ceph's default, or set in the
// monitors' own ceph.conf.
func BlocklistExpiry(conn *rados.Conn) (d time.Duration, known bool, err error) {
	const opt = "mon_osd_blocklist_default_expire"
	out, err := monCommand(conn, map[string]any{"prefix": "config get", "who": "mon", "key": opt})
	if err == nil {
		return parseSeconds(out)
	}
	if !cephconn.IsErrno(err, syscall.EACCES) && !cephconn.IsErrno(err, syscall.EPERM) {
		return 0, false, err
	}
	out, err = monCommand(conn, map[string]any{"prefix": "config dump", "format": "json"})
	if err != nil {
		return 0, false, err
	}
	var opts []struct{ Section, Name, Value string }
	if err := json.Unmarshal(out, &opts); err != nil {
		return 0, false, fmt.Errorf("config dump: %w", err)
	}
	found := ""
	for _, o := range opts {
		if o.Name == opt && (o.Section == "mon" || o.Section == "global" && found == "") {
			found = o.Value
		}
	}
	if found == "" {
		return 0, false, nil
	}
	return parseSeconds([]byte(found))
}

func parseSeconds(b []byte) (time.Duration, bool, error) {
	s, err := strconv.ParseFloat(string(bytes.TrimSpace(b)), 64)
	if err != nil {
		return 0, false, fmt.Errorf("mon_osd_blocklist_default_expire %q: %w", b, err)
	}
	return time.Duration(s * float64(time.Second)), true, nil
}
