package gate

import (
	"encoding/json"
	"errors"
	"testing"
)

// Replies as Ceph 16 prints them, trimmed.
func TestHealthReply(t *testing.T) {
	for _, tc := range []struct{ reply, want string }{
		{`{"status":"HEALTH_OK","checks":{}}`, ""},
		{`{"status":"HEALTH_WARN","checks":{"OSDMAP_FLAGS":{"severity":"HEALTH_WARN","summary":{"message":"noout flag(s) set"}}}}`, ""},
		{`{"status":"HEALTH_WARN","checks":{"OSD_NEARFULL":{"severity":"HEALTH_WARN","summary":{"message":"1 nearfull osd(s)"}}}}`, "health gate closed: OSD_NEARFULL: 1 nearfull osd(s)"},
		{`{"status":"HEALTH_ERR","checks":{"MON_DOWN":{"severity":"HEALTH_ERR","summary":{"message":"no quorum"}}}}`, "health gate closed: MON_DOWN: no quorum"},
		{`{"status":"HEALTH_ERR","checks":{}}`, "health gate closed: cluster is HEALTH_ERR"},
		{`{"status":"HEALTH_WARN","checks":{"POOL_FULL":{"severity":"HEALTH_WARN","summary":{"message":"1 pool(s) full"},"detail":[{"message":"pool 'other' is full (running out of quota)"}]}}}`, ""},
		{`{"status":"HEALTH_WARN","checks":{"POOL_FULL":{"severity":"HEALTH_WARN","summary":{"message":"1 pool(s) full"},"detail":[{"message":"pool 'vms' is full (running out of quota)"}]}}}`, "health gate closed: POOL_FULL: pool 'vms' is full (running out of quota)"},
	} {
		var h healthReply
		if err := json.Unmarshal([]byte(tc.reply), &h); err != nil {
			t.Fatal(err)
		}
		check(t, tc.reply, h.closed("vms"), tc.want)
	}
}

func TestStatusReply(t *testing.T) {
	for _, tc := range []struct{ reply, want string }{
		{`{"pgmap":{"pgs_by_state":[{"state_name":"active+clean","count":16}]}}`, ""},
		{`{"pgmap":{"pgs_by_state":[{"state_name":"active+clean","count":12},{"state_name":"active+recovering+degraded","count":3},{"state_name":"active+remapped+backfill_wait","count":1}]}}`,
			"recovery gate closed: 3 pgs active+recovering+degraded, 1 pgs active+remapped+backfill_wait"},
		{`{"pgmap":{"pgs_by_state":[{"state_name":"active+clean+scrubbing+deep","count":2}]}}`, ""},
	} {
		var p statusReply
		if err := json.Unmarshal([]byte(tc.reply), &p); err != nil {
			t.Fatal(err)
		}
		check(t, tc.reply, p.closed(), tc.want)
	}
}

func check(t *testing.T, reply string, err error, want string) {
	t.Helper()
	switch {
	case want == "" && err != nil:
		t.Errorf("%s: closed (%v), want open", reply, err)
	case want != "" && (err == nil || err.Error() != want || !errors.Is(err, ErrClosed)):
		t.Errorf("%s:\n got %v\nwant %s", reply, err, want)
	}
}
