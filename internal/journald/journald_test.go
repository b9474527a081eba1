package journald

import (
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zapcore"
	"golang.org/x/sys/unix"
)

// Every zap level maps to sd-daemon(3)'s priority, so `journalctl -p warning` keeps warn and above.
func TestPriority(t *testing.T) {
	for l, want := range map[zapcore.Level]int{
		zapcore.DebugLevel: 7, zapcore.InfoLevel: 6, zapcore.WarnLevel: 4, zapcore.ErrorLevel: 3,
		zapcore.DPanicLevel: 2, zapcore.PanicLevel: 2, zapcore.FatalLevel: 2,
	} {
		if got := Priority(l); got != want {
			t.Errorf("Priority(%s) = %d, want %d", l, got, want)
		}
	}
}

func consoleConfig() zapcore.EncoderConfig {
	return zapcore.EncoderConfig{TimeKey: "ts", LevelKey: "level", MessageKey: "msg", LineEnding: "\n",
		EncodeTime: zapcore.RFC3339NanoTimeEncoder, EncodeLevel: zapcore.CapitalLevelEncoder,
		EncodeDuration: zapcore.StringDurationEncoder}
}

// Each line starts with its level's prefix, continuation lines of a multi-line message too, and
// the console format has no timestamp (journald adds its own).
func TestEncoderPrefixesEveryLine(t *testing.T) {
	enc := Encoder(zapcore.NewConsoleEncoder(ConsoleConfig(consoleConfig())))
	when := time.Date(2026, 3, 15, 1, 2, 3, 0, time.UTC)
	for _, tc := range []struct {
		level zapcore.Level
		msg   string
		want  string
	}{
		{zapcore.DebugLevel, "d", "<7>DEBUG\td\n"},
		{zapcore.InfoLevel, "i", "<6>INFO\ti\n"},
		{zapcore.WarnLevel, "w", "<4>WARN\tw\n"},
		{zapcore.ErrorLevel, "two\nlines", "<3>ERROR\ttwo\n<3>lines\n"},
		{zapcore.FatalLevel, "f", "<2>FATAL\tf\n"},
	} {
		buf, err := enc.Clone().EncodeEntry(zapcore.Entry{Level: tc.level, Time: when, Message: tc.msg}, nil)
		if err != nil {
			t.Fatal(err)
		}
		if got := buf.String(); got != tc.want {
			t.Errorf("%s: got %q, want %q", tc.level, got, tc.want)
		}
		if strings.Contains(buf.String(), "2026") {
			t.Errorf("%s: the timestamp is printed: %q", tc.level, buf.String())
		}
	}
}

// IsJournal matches JOURNAL_STREAM against the file's own device and inode only.
func TestIsJournal(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(w.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	other, err := os.CreateTemp(t.TempDir(), "log")
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	for _, tc := range []struct {
		env  string
		f    *os.File
		want bool
	}{
		{fmt.Sprintf("%d:%d", st.Dev, st.Ino), w, true},
		{fmt.Sprintf("%d:%d", st.Dev, st.Ino), other, false}, // stderr redirected to a file
		{fmt.Sprintf("%d:%d", st.Dev, st.Ino+1), w, false},
		{"", w, false},
		{"garbage", w, false},
		{fmt.Sprintf("%d:%d", st.Dev, st.Ino), nil, false},
	} {
		t.Setenv("JOURNAL_STREAM", tc.env)
		if got := IsJournal(tc.f); got != tc.want {
			t.Errorf("JOURNAL_STREAM=%q: IsJournal = %v, want %v", tc.env, got, tc.want)
		}
	}
}
