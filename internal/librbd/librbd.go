// Package librbd is flattend's only cgo: go-ceph v0.34.0 wraps neither rbd_flatten_with_progress nor
// rbd_get_data_pool_id, so this package opens the image on go-ceph's rados_ioctx_t (same
// connection, hence same fencing) and calls them; it also asks the loaded Ceph libraries their
// version.
package librbd

/*
#cgo LDFLAGS: -lrbd -lrados -ldl
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <rbd/librbd.h>

extern int flattendProgress(uint64_t offset, uint64_t total, void *arg);

// libceph-common's `const char *ceph_version_to_str()` (C++, hence the mangled name): the
// version of the Ceph libraries this process runs with, e.g. "16.2.15". NULL if not found.
static const char *flattendCephVersion(void) {
	const char *(*f)(void) = (const char *(*)(void))dlsym(RTLD_DEFAULT, "_Z19ceph_version_to_strv");
	return f ? f() : NULL;
}
*/
import "C"

import (
	"runtime/cgo"
	"syscall"
	"unsafe"

	"github.com/ceph/go-ceph/rados"
)

// ProgressFunc is called by librbd about once per object; returning false aborts the flatten.
type ProgressFunc func(done, total uint64) bool

//export flattendProgress
func flattendProgress(offset, total C.uint64_t, arg unsafe.Pointer) C.int {
	h := cgo.Handle(*(*C.uintptr_t)(arg))
	if !h.Value().(ProgressFunc)(uint64(offset), uint64(total)) {
		return -C.ECANCELED // librbd finishes the in-flight copy-ups, then returns ECANCELED
	}
	return 0
}

// withImage opens name in ioctx, runs op on it with a C argument that carries progress to
// flattendProgress, and closes it. It returns where librbd failed and its errno (0 on success).
func withImage(ioctx *rados.IOContext, name string, progress ProgressFunc,
	op func(img C.rbd_image_t, arg unsafe.Pointer) (stage string, ret C.int)) (string, syscall.Errno) {
	cname := C.CString(name)
	defer C.free(unsafe.Pointer(cname))

	var img C.rbd_image_t
	if ret := C.rbd_open(C.rados_ioctx_t(ioctx.Pointer()), cname, &img, nil); ret < 0 {
		return "open", syscall.Errno(-ret)
	}
	defer C.rbd_close(img)

	h := cgo.NewHandle(progress)
	defer h.Delete()
	// The handle travels through C memory so no Go pointer is handed to librbd.
	arg := C.malloc(C.size_t(unsafe.Sizeof(C.uintptr_t(0))))
	defer C.free(arg)
	*(*C.uintptr_t)(arg) = C.uintptr_t(h)

	if stage, ret := op(img, arg); ret < 0 {
		return stage, syscall.Errno(-ret)
	}
	return "", 0
}

// FlattenWithProgress opens name in ioctx, flattens it and closes it.
func FlattenWithProgress(ioctx *rados.IOContext, name string, progress ProgressFunc) (stage string, errno syscall.Errno) {
	return withImage(ioctx, name, progress, func(img C.rbd_image_t, arg unsafe.Pointer) (string, C.int) {
		return "flatten", C.rbd_flatten_with_progress(img, C.librbd_progress_fn_t(C.flattendProgress), arg)
	})
}

// DataPoolID is the pool id of name's data objects (its own pool's, unless created with
// --data-pool).
func DataPoolID(ioctx *rados.IOContext, name string) (int64, syscall.Errno) {
	cname := C.CString(name)
	defer C.free(unsafe.Pointer(cname))
	var img C.rbd_image_t
	if ret := C.rbd_open_read_only(C.rados_ioctx_t(ioctx.Pointer()), cname, &img, nil); ret < 0 {
		return 0, syscall.Errno(-ret)
	}
	defer C.rbd_close(img)
	id := C.rbd_get_data_pool_id(img)
	if id < 0 {
		return 0, syscall.Errno(-id)
	}
	return int64(id), 0
}

// CephVersion is the version string of the Ceph libraries loaded ("" if unknown).
func CephVersion() string {
	if v := C.flattendCephVersion(); v != nil {
		return C.GoString(v)
	}
	return ""
}
