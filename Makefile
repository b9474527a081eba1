# flattend — see README.md. `make demo` and `make test` work on a fresh Debian/Ubuntu machine as root.

SHELL := /bin/bash
GO ?= go
# go-ceph v0.34.0 needs the `pacific` tag against Ceph 16 (librbd 1.16); none against 17 and later.
# Recursive (=) on purpose: librbd.h is read when a recipe runs, after `deps` installed it, not
# when make parses this file (on a fresh machine it is not there yet).
LIBRBD_MINOR = $(shell sed -n 's/^\#define LIBRBD_VER_MINOR \([0-9]*\).*/\1/p' /usr/include/rbd/librbd.h 2>/dev/null)
GO_TAGS ?= $(shell [ -n "$(LIBRBD_MINOR)" ] && [ "$(LIBRBD_MINOR)" -le 16 ] && echo pacific)
GOFLAGS_TAGS = $(if $(GO_TAGS),-tags $(GO_TAGS),)
export GO_TAGS
export FLATTEND_BIN := $(CURDIR)/bin/flattend

.PHONY: all deps build test test-under-load unit lint bench soak demo clean

# The release the tests are told they run on (test/e2e checks `flattend version` against it):
# test/release.sh sets it in its chroots; here it is the host's, from its librbd.h.
FLATTEND_TEST_CEPH_RELEASE ?= $(if $(LIBRBD_MINOR),$(word $(LIBRBD_MINOR),x x x x x x x x x x x x x x x pacific quincy reef squid tentacle))
export FLATTEND_TEST_CEPH_RELEASE

ifneq ($(CEPH),)
# make test CEPH=reef (or tentacle): the same target, run inside a cached Debian chroot with that
# release's Ceph (test/release.sh); the host's Ceph, bin/ and processes are left alone.
all deps build test unit lint bench demo:
	bash test/release.sh $(CEPH) make --no-print-directory $@ $(if $(BENCH_ARGS),BENCH_ARGS='$(BENCH_ARGS)')
else

all: build

deps: ## Debian packages for building and for the local test cluster
	@bash test/cluster.sh deps

build: deps
	$(MAKE) --no-print-directory bin/flattend

VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)

bin/flattend: $(shell find cmd internal -name '*.go') go.mod go.sum
	$(GO) build $(GOFLAGS_TAGS) -buildvcs=auto -ldflags "-X main.version=$(VERSION)" -o $@ ./cmd/flattend

test: build ## the whole suite, unit and integration, against throwaway local Ceph clusters
	bash test/run.sh $(GO) test $(GOFLAGS_TAGS) -count=1 -timeout 40m ./...
	@echo "== again on a cephx cluster, flattend with its least-privilege key (mon/osd 'profile rbd')"
	FLATTEND_TEST_AUTH=cephx bash test/run.sh $(GO) test $(GOFLAGS_TAGS) -count=1 -timeout 40m ./internal/... ./test/...

RUNS ?= 3
test-under-load: build ## make test RUNS times in a row (default 3) beside a busy loop per core; stops at the first failure
	bash test/under-load.sh $(RUNS)

UNIT_PKGS := ./cmd/flattend ./internal/backoff ./internal/config ./internal/gate ./internal/humanize \
	./internal/libvirturi ./internal/rbdimage ./internal/scheduler ./internal/window ./internal/metrics ./deploy \
	./internal/journald ./internal/status

unit: deps ## pure-logic tests only, with fakes where Ceph would be (no cluster; seconds)
	$(GO) test $(GOFLAGS_TAGS) -count=1 $(UNIT_PKGS)
	$(GO) test $(GOFLAGS_TAGS) -count=1 -run 'RetryBusy' ./internal/lock
	$(GO) test $(GOFLAGS_TAGS) -count=1 -run 'Stale|Flags|EmptyFleet|Encode|Decode|JSONGolden' ./internal/fleet

lint: build
	bash test/verify-unit.sh
	test -z "$$(gofmt -l cmd internal test bench deploy 2>/dev/null)" || { gofmt -l cmd internal test bench deploy; exit 1; }
	$(GO) vet $(GOFLAGS_TAGS) ./...
	$(GO) tool staticcheck $(GOFLAGS_TAGS) ./...

bench: build ## measurements against a throwaway local cluster: a table and bench/results/*.json (BENCH_ARGS="-benches lock …" picks)
	bash test/run.sh $(GO) run $(GOFLAGS_TAGS) ./bench $(BENCH_ARGS)

SOAK_DURATION ?= 10m
SOAK_TIMEOUT ?= 45m
soak: build ## 4 nodes, 2 slots, random kill -9/SIGSTOP/network cuts/osd pause for SOAK_DURATION (root: network namespaces); bench/results/soak.json
	FLATTEND_SOAK=1 FLATTEND_SOAK_DURATION=$(SOAK_DURATION) FLATTEND_SOAK_RESULTS=$(CURDIR)/bench/results/soak.json \
		$(GO) test $(GOFLAGS_TAGS) -count=1 -v -run '^TestSoak$$' -timeout $(SOAK_TIMEOUT) ./test/soak/

demo: build ## several simulated nodes flattening in turn on a throwaway local cluster
	bash test/demo.sh

# The Debian package for this machine's release (debian/, dpkg-buildpackage): ./$(DEB). Its
# by-products (.buildinfo, .changes) stay in build/deb.
.PHONY: deb deb-test
DEB_VERSION = $(shell sh debian/version.sh $(VERSION))
DEB = flattend_$(DEB_VERSION)_$(shell dpkg --print-architecture).deb
deb: deps ## flattend_VERSION_ARCH.deb: apt install ./flattend_*.deb (see README, "Install on a hypervisor")
	rm -rf build/deb && mkdir -p build/deb
	GO="$(GO)" VERSION="$(VERSION)" DEB_VERSION="$(DEB_VERSION)" DEB_DESTDIR=build/deb \
		dpkg-buildpackage -b -us -uc --buildinfo-option=-ubuild/deb --changes-option=-ubuild/deb \
		--buildinfo-file=build/deb/flattend.buildinfo --changes-file=build/deb/flattend.changes
	rm -f flattend_*_$(shell dpkg --print-architecture).deb
	cp build/deb/$(DEB) .
	@echo "built $(DEB) ($$(du -h $(DEB) | cut -f1)): apt install ./$(DEB)"

deb-test: deb ## install, upgrade and purge that package in a fresh Debian chroot of this release
	bash test/deb-version-test.sh
	bash test/deb-test.sh $(DEB)

endif

clean:
	rm -rf bin build
