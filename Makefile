# hostmesh: the two commands that matter are `make demo` and `make test`.
# Both install what they need (Debian packages) when it is missing.

CARGO ?= cargo
PROFILE ?= dev
TARGET_DIR := target/$(if $(filter dev,$(PROFILE)),debug,$(PROFILE))
# Tests run two at a time: the machine has two cores, and the network
# namespace tests start several processes each.
TEST_THREADS ?= 2

.PHONY: all deps build test lint unit demo bench-dataplane bench-registry bench-config packages package-tools clean

all: build

deps:
	@scripts/deps.sh

build: deps
	$(CARGO) build --locked --profile $(PROFILE) --bins

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

# Every test: unit, conformance (embedded and real etcd), end to end in
# network namespaces, and the packages on a booted systemd (packages.rs:
# debootstrap, systemd-nspawn, apt, rpm, Ansible; about three minutes).
# Needs root.
test: deps package-tools lint
	$(CARGO) build --locked --bins
	$(CARGO) test --locked --workspace --no-fail-fast -- --test-threads=$(TEST_THREADS)

unit: deps
	$(CARGO) test --locked --workspace --lib

# The mesh on this machine: a controller on the embedded store, three hosts
# as network namespaces, a plain curl carried over mTLS. Needs root.
demo: deps
	$(CARGO) build --locked --profile $(PROFILE) --bins
	$(TARGET_DIR)/hostmesh-demo --bin-dir $(TARGET_DIR)

# The four packages from a release build, into target/packages/: meshd and
# mesh-controller (with meshctl), each as .deb and .rpm; lintian must pass.
# See docs/PACKAGING.md.
packages: deps package-tools
	packaging/build.sh --out target/packages
	@# lintian leaves mldbm-elf-* files in TMPDIR: give it one to remove.
	rm -rf target/lintian-tmp && mkdir -p target/lintian-tmp
	TMPDIR=$(CURDIR)/target/lintian-tmp lintian --fail-on error,warning target/packages/meshd_*.deb target/packages/mesh-controller_*.deb
	rm -rf target/lintian-tmp

# cargo-deb (pinned), installed from crates.io when missing.
package-tools:
	@packaging/tools.sh

clean:
	$(CARGO) clean

# Control-plane benchmarks, release builds; results and how to read them in
# docs/BENCHMARKS.md. Each prints Markdown tables and fails only on errors,
# never on a missed target.
# Issue 2: applies/s and watch latency on the embedded store and on etcd.
bench-registry: deps
	$(CARGO) run --locked --release -p hostmesh-tests --bin bench-registry

# Issue 4: 1,000 host config streams against a controller over etcd
# (fan-out latency, controller memory per host) and meshd's memory with
# 100,000 endpoints. Needs root for the optional capture run; 1,000
# streams need ~1,300 open files in this process and the controller.
bench-config: deps
	$(CARGO) build --locked --release -p hostmesh-controller --bin mesh-controller
	$(CARGO) build --locked --release -p hostmesh-meshd --bin meshd
	ulimit -n 65536 2>/dev/null || ulimit -n $$(ulimit -Hn); \
	$(CARGO) run --locked --release -p hostmesh-tests --bin bench-config

# The data plane side by side (direct, meshd over TCP and QUIC, an HAProxy
# mTLS pair), release binaries, results into docs/BENCHMARKS.md. Needs root.
bench-dataplane: deps
	@scripts/deps.sh bench
	$(CARGO) build --locked --release --bins
	@# meshd again on its own, as the packages build it: with the rest of the
	@# workspace cargo unifies tokio's features into it (the multi-thread
	@# scheduler and libm, ~0.5 MiB more RSS).
	$(CARGO) build --locked --release -p hostmesh-meshd --bin meshd
	@test -x target/tools/bin/oha || $(CARGO) install oha --locked --root target/tools
	target/release/bench-dataplane --bin-dir target/release --oha target/tools/bin/oha --out-dir docs/bench --update-docs docs/BENCHMARKS.md
