// Package journald makes flattend's log lines carry their priority when stderr is systemd's
// journal stream: each line starts with sd-daemon's "<N>" prefix (sd-daemon(3)), which journald
// strips and stores as PRIORITY= (SyslogLevelPrefix=yes, the default), so that
// `journalctl -p warning -u flattend` shows warnings and errors only.
package journald

import (
	"fmt"
	"os"
	"strings"
	"syscall"

	"go.uber.org/zap/buffer"
	"go.uber.org/zap/zapcore"
)

// Priorities of sd-daemon(3) (syslog's levels).
const (
	sdCrit    = 2
	sdErr     = 3
	sdWarning = 4
	sdInfo    = 6
	sdDebug   = 7
)

// Priority is the syslog priority journald stores for a zap level.
func Priority(l zapcore.Level) int {
	switch {
	case l <= zapcore.DebugLevel:
		return sdDebug
	case l == zapcore.InfoLevel:
		return sdInfo
	case l == zapcore.WarnLevel:
		return sdWarning
	case l == zapcore.ErrorLevel:
		return sdErr
	default: // dpanic, panic, fatal
		return sdCrit
	}
}

// IsJournal reports whether f is the stream systemd connected to the journal: JOURNAL_STREAM
// ("device:inode", set by systemd for StandardError=journal) names f's device and inode. A
// process whose stderr was redirected since (a terminal, a file, a pipe) does not match.
func IsJournal(f *os.File) bool {
	v := os.Getenv("JOURNAL_STREAM")
	if v == "" || f == nil {
		return false
	}
	var dev, ino uint64
	if n, err := fmt.Sscanf(v, "%d:%d", &dev, &ino); n != 2 || err != nil {
		return false
	}
	fi, err := f.Stat() // fstat(2), without Fd()'s switch to blocking mode
	if err != nil {
		return false
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	return ok && uint64(st.Dev) == dev && st.Ino == ino
}

// Encoder wraps enc so that every line of every entry starts with the entry's priority prefix.
// A message with newlines gives several journal lines: each carries the prefix, or journald would
// store the continuation lines at its default priority.
func Encoder(enc zapcore.Encoder) zapcore.Encoder { return prefixEncoder{enc, buffer.NewPool()} }

// ConsoleConfig is cfg without the timestamp: journald stamps every line itself.
func ConsoleConfig(cfg zapcore.EncoderConfig) zapcore.EncoderConfig {
	cfg.TimeKey = zapcore.OmitKey
	return cfg
}

type prefixEncoder struct {
	zapcore.Encoder
	pool buffer.Pool // the prefixed lines' buffers, shared by the clones
}

func (p prefixEncoder) Clone() zapcore.Encoder { return prefixEncoder{p.Encoder.Clone(), p.pool} }

func (p prefixEncoder) EncodeEntry(ent zapcore.Entry, fields []zapcore.Field) (*buffer.Buffer, error) {
	line, err := p.Encoder.EncodeEntry(ent, fields)
	if err != nil {
		return nil, err
	}
	defer line.Free()
	prefix := fmt.Sprintf("<%d>", Priority(ent.Level))
	body := strings.TrimSuffix(line.String(), "\n")
	out := p.pool.Get()
	out.AppendString(prefix)
	out.AppendString(strings.ReplaceAll(body, "\n", "\n"+prefix))
	out.AppendByte('\n')
	return out, nil
}
