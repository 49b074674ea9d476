# vpc-cni: the two commands a user needs.
#   make demo   set up, build, bring up the local VPC lab, run the seed's experiment, tear down
#               (KEEP=1 leaves the lab running; `target/debug/vpc-lab down` removes it;
#               DEPLOY=daemonset runs the agents as the DaemonSet's pods through the lab's
#               kubelet, from the node image built from the debug binaries)
#   make test   set up, then lints, unit tests, namespace tests and lab tests (as root), and the
#               crate-graph check (scripts/import-graph.py)
SHELL := /bin/bash
CARGO ?= cargo
LAB := target/debug/vpc-lab

.PHONY: setup build demo test lint unit clean image

setup:
	@bash scripts/setup.sh

build: setup
	$(CARGO) build --workspace --bins

demo: build
	@set -e; trap '[ -n "$(KEEP)" ] || $(LAB) down' EXIT; \
	$(if $(filter daemonset,$(DEPLOY)),bash scripts/image/build.sh --no-build --profile debug;) \
	$(LAB) up $(if $(DEPLOY),--deploy $(DEPLOY)); \
	$(LAB) demo; \
	if [ -n "$(KEEP)" ]; then echo "KEEP=1: the lab is still up; '$(LAB) down' removes it"; fi

# The node image (docs/image.md), without a registry or a Docker engine: the base from Debian's
# packages (mmdebstrap), the Containerfile with buildah, target/image/vpc-cni.oci.tar for
# `ctr -n k8s.io images import`. Debug binaries unless PROFILE=release. Check it with
# `bash scripts/image/check.sh`; `bash scripts/image/build.sh clean` removes it all.
image: setup
	bash scripts/image/build.sh $(if $(PROFILE),--profile $(PROFILE))

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	python3 scripts/import-graph.py --crates-only >/dev/null

# Root-only tests are #[ignore = "root: …"]: as root (CI) they all run, and fail if they cannot;
# without root they are listed as ignored, never passed.
test: build lint
	@if [ "$$(id -u)" = 0 ]; then \
	  set -x; $(CARGO) test --workspace --no-fail-fast -- --include-ignored; \
	elif [ -n "$$CI" ]; then \
	  echo "make test: CI must run as root (the root-only tests would be skipped)" >&2; exit 1; \
	else \
	  echo "make test: not root; the root-only tests are listed as ignored, not run" >&2; \
	  $(CARGO) test --workspace --no-fail-fast; \
	fi

clean:
	-$(LAB) down
	$(CARGO) clean
