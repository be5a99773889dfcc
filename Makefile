# The front door. Logic lives in cargo and in initrd/*.sh; this file only
# wires them together.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
export PATH := $(HOME)/.cargo/bin:$(PATH)

CARGO ?= cargo
AGENT_TARGET := x86_64-unknown-linux-gnu
AGENT := target/$(AGENT_TARGET)/release/ember-agent
export EMBER_CACHE ?= /var/cache/ember
export EMBER_IMAGES ?= $(CURDIR)/target/images

.PHONY: up test test-unit install deps test-deps build agent images bench bench-load lint fmt clean-cache

## up: install what is missing, build, make images, serve on 127.0.0.1:8080
## (foreground; Ctrl-C drains). EMBER_CONFIG=file or EMBER_LISTEN=addr to change.
up: deps build images
	exec ./target/release/ember serve

## test: install what is missing, then run every test (unit, component, VM).
## The VM suites must run here (EMBER_REQUIRE_VMS=1): none may skip itself.
test: test-deps images
	$(CARGO) build --release -p ember-gateway -p ember-loadtest
	EMBER_REQUIRE_VMS=1 $(CARGO) test --workspace --all-targets --no-fail-fast
	# The load-test suite at a few seconds a scenario, so it cannot rot.
	./target/release/ember-loadtest --profile quick --out target/loadtest-quick

## test-unit: every test that needs no VM, no root and no images: unit
## tests, the router against fake and real agents, the agent against the
## real host client (see README for its time).
test-unit:
	$(CARGO) test --workspace --lib --bins
	$(CARGO) test -p ember-guest-agent --tests

## install: ember and its home under PREFIX (default /usr/local): bin/ember,
## share/ember/{initrd,functions-examples} copied, share/ember/images linked
## to the built images (in EMBER_CACHE). Run from anywhere afterwards.
PREFIX ?= /usr/local
install: build images
	install -D -m 0755 target/release/ember $(PREFIX)/bin/ember
	mkdir -p $(PREFIX)/share/ember/images
	rm -rf $(PREFIX)/share/ember/initrd $(PREFIX)/share/ember/functions-examples
	cp -a initrd functions-examples $(PREFIX)/share/ember/
	for f in target/images/*; do ln -sfn "$$(readlink -f "$$f")" "$(PREFIX)/share/ember/images/$${f##*/}"; done

deps:
	./initrd/deps.sh

# What only the tests and benchmarks need on top (bubblewrap, zfs-fuse).
test-deps:
	./initrd/deps.sh --test

build:
	$(CARGO) build --release -p ember-gateway

# The guest agent is a static binary (glibc, crt-static) so it runs in any
# guest root; --target keeps its flags away from host builds.
agent:
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release -p ember-guest-agent --target $(AGENT_TARGET)

## images: the shared kernel, initrd, base and agent, then every image the
## shipped recipes (initrd/images/) and EMBER_CONFIG's [images] dirs name.
images: agent build
	./initrd/images.sh $(AGENT)
	./target/release/ember images build

## bench: VM and pool figures (see docs/BENCHMARKS.md).
bench: test-deps build images
	./target/release/ember vm bench --boots 10 --execs 100
	./target/release/ember pool bench --config pool/bench.toml --modes snapshot --burst 6 --rate 3 --steady 30s
	./loadtest/http-rtt.sh
	./loadtest/sessions-bench.sh
	./target/release/ember pool bench --config pool/bench-rollback.toml --modes rollback --burst 2 --rate 1 --steady 20s
	./initrd/zfs-test-pool.sh up
	./target/release/ember pool bench --config pool/bench-zfs.toml --modes rollback --burst 2 --rate 1 --steady 20s; \
	    rc=$$?; ./initrd/zfs-test-pool.sh down; exit $$rc

## bench-load: the load tests with oha and their baselines; report in target/loadtest.
bench-load: test-deps build images
	$(CARGO) build --release -p ember-loadtest
	./target/release/ember-loadtest --profile full --out target/loadtest

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean-cache:
	rm -rf $(EMBER_CACHE)/images
