// Package soak holds `make soak`: four flattend nodes sharing two slots run for minutes while
// random faults hit them (kill -9, SIGSTOP, a network cut, `ceph osd pause`), and an observer of
// its own, which reads only RADOS, checks that no more than two flattens ever run at once. It runs
// only when FLATTEND_SOAK is set; see docs/operations.md#the-soak.
package soak
