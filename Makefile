# hostmesh: the two commands that matter are `make demo` and `make test`.
# Both install what they need (Debian packages) when it is missing.

CARGO ?= cargo
PROFILE ?= dev
TARGET_DIR := target/$(if $(filter dev,$(PROFILE)),debug,$(PROFILE))
# Tests run two at a time: the machine has two cores, and the network
# namespace tests start several processes each.
TEST_THREADS ?= 2

.PHONY: all deps build test lint unit demo bench-dataplane bench-registry bench-config packages clean

all: build

deps:
	@scripts/deps.sh

build: deps
	$(CARGO) build --locked --profile $(PROFILE) --bins

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

# Every test: unit, conformance (embedded and real etcd), end to end in
# network namespaces. Needs root.
test: deps lint
	$(CARGO) build --locked --bins
	$(CARGO) test --locked --workspace --no-fail-fast -- --test-threads=$(TEST_THREADS)

unit: deps
	$(CARGO) test --locked --workspace --lib

# The mesh on this machine: a controller on the embedded store, three hosts
# as network namespaces, a plain curl carried over mTLS. Needs root.
demo: deps
	$(CARGO) build --locked --profile $(PROFILE) --bins
	$(TARGET_DIR)/hostmesh-demo --bin-dir $(TARGET_DIR)

clean:
	$(CARGO) clean
