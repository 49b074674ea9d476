# vpc-cni: the two commands a user needs.
#   make demo   set up, build, bring up the local VPC lab, run the seed's experiment, tear down
#               (KEEP=1 leaves the lab running; `target/debug/vpc-lab down` removes it)
#   make test   set up, then lints, unit tests, namespace tests and lab tests (as root)
SHELL := /bin/bash
CARGO ?= cargo
LAB := target/debug/vpc-lab

.PHONY: setup build demo test lint unit clean

setup:
	@bash scripts/setup.sh

build: setup
	$(CARGO) build --workspace --bins

demo: build
	@set -e; trap '[ -n "$(KEEP)" ] || $(LAB) down' EXIT; \
	$(LAB) up; \
	$(LAB) demo; \
	if [ -n "$(KEEP)" ]; then echo "KEEP=1: the lab is still up; '$(LAB) down' removes it"; fi

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test: build lint
	$(CARGO) test --workspace --no-fail-fast

clean:
	-$(LAB) down
	$(CARGO) clean
