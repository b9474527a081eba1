package config

import (
	"fmt"
	"regexp"
)

// Warnings are problems that do not stop flattend but that an operator should fix, in the same
// "file:line: field: problem" form as errors. `check` prints them; start and reload log them.
func (c *Config) Warnings() Errors { return c.parsed.warnings }

// foreignSnapshots are the RBD snapshot names that OpenStack services create and still track, with
// examples: parent-snapshot cleanup must never remove one. From the services' sources:
//   - Cinder names a volume snapshot after its snapshot_name_template, "snapshot-%s" with the
//     snapshot's uuid (cinder/db/api.py, used as Snapshot.name in cinder/objects/snapshot.py and
//     by the RBD driver); cloning a volume snapshots the source as "<new volume name>.clone_snap"
//     (cinder/volume/drivers/rbd.py, create_cloned_volume); the Ceph backup driver names its
//     snapshots "backup.<backup id>.snap.<timestamp>" (cinder/backup/drivers/ceph.py).
//   - Nova's direct snapshot of an RBD instance disk is named by a uuid without dashes
//     (nova/virt/libvirt/driver.py snapshot(): uuid.uuid4().hex, later
//     uuidutils.generate_uuid(dashed=False)); a resize keeps "nova-resize" for a revert
//     (RESIZE_SNAPSHOT_NAME, nova/virt/libvirt/utils.py).
//   - Glance's RBD store gives every image the snapshot "snap" that Nova and Cinder clone from
//     (DEFAULT_SNAPNAME, glance_store/_drivers/rbd.py); Nova's direct snapshot names the image it
//     uploads that way too.
var foreignSnapshots = []struct {
	what     string
	examples []string
}{
	{"Cinder's volume snapshots (snapshot-<uuid>)", []string{"snapshot-0b8f1d9e-7c6a-4f3e-9d2b-5a1c3e7f9b21",
		"snapshot-00000000-0000-0000-0000-000000000000", "snapshot-ffffffff-ffff-ffff-ffff-ffffffffffff"}},
	{"Cinder's clone snapshots (volume-<uuid>.clone_snap)", []string{"volume-0b8f1d9e-7c6a-4f3e-9d2b-5a1c3e7f9b21.clone_snap"}},
	{"Cinder's backup snapshots (backup.<uuid>.snap.<time>)", []string{"backup.0b8f1d9e-7c6a-4f3e-9d2b-5a1c3e7f9b21.snap.1767225600.12"}},
	{"Nova's instance snapshots (a uuid without dashes)", []string{"0b8f1d9e7c6a4f3e9d2b5a1c3e7f9b21",
		"00000000000000000000000000000000", "ffffffffffffffffffffffffffffffff"}},
	{"Nova's resize snapshot (nova-resize)", []string{"nova-resize"}},
	{"Glance's image snapshots (snap)", []string{"snap"}},
}

// snapshotPatternWarnings warns when cleanup.snapshot_pattern matches a name another tool
// creates: cleanup would remove a snapshot that tool still tracks (its volume or image breaks).
func (v *checker) snapshotPatternWarnings(re *regexp.Regexp) Errors {
	if re == nil {
		return nil
	}
	var ws Errors
	for _, f := range foreignSnapshots {
		for _, name := range f.examples {
			if re.MatchString(name) {
				ws = append(ws, v.at("cleanup.snapshot_pattern", fmt.Sprintf(
					"%q matches %s, e.g. %q: cleanup would remove snapshots that tool still tracks; use a prefix only your own tooling gives its snapshots, e.g. ^flattend-gc-",
					re.String(), f.what, name)))
				break
			}
		}
	}
	return ws
}
