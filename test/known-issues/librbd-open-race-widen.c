// LD_PRELOAD shim for test/known-issues/librbd-open-race.sh. It widens one window in librbd
// 16.2.15 (Debian's 16.2.15+ds-0+deb12u2 build): in ImageState::complete_action_unlock, between
// handing a finished open to its caller and locking the image state's m_lock again. It sleeps
// WIDEN_US microseconds (default 5000) before the pthread_mutex_lock whose return address is
// librbd + OPENRACE_OFFSET (default 0x10375a, that build's). Run with MALLOC_PERTURB_ so that a
// lock of freed memory fails loudly instead of by luck.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int (*real_lock)(pthread_mutex_t *);
static unsigned long target;
static __thread int finding;

static int find_librbd(struct dl_phdr_info *info, size_t size, void *data) {
	(void)size;
	(void)data;
	if (info->dlpi_name && strstr(info->dlpi_name, "librbd.so.1")) {
		const char *off = getenv("OPENRACE_OFFSET");
		target = info->dlpi_addr + strtoul(off ? off : "0x10375a", NULL, 0);
	}
	return 0;
}

int pthread_mutex_lock(pthread_mutex_t *m) {
	if (!real_lock)
		real_lock = (int (*)(pthread_mutex_t *))dlsym(RTLD_NEXT, "pthread_mutex_lock");
	if (!target && !finding) {
		finding = 1;
		dl_iterate_phdr(find_librbd, NULL);
		finding = 0;
	}
	if (target && (unsigned long)__builtin_return_address(0) == target) {
		const char *us = getenv("WIDEN_US");
		usleep(us ? atoi(us) : 5000);
	}
	return real_lock(m);
}
