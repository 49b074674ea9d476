#!/bin/bash
# The performance baseline of issue 4 (docs/benchmarks.md): build, run `vpc-lab perf` (it brings
# up its own lab and takes it down), plot. As root, with nothing else using the lab.
#   scripts/bench/run.sh [vpc-lab perf options…]
set -euo pipefail
cd "$(dirname "$0")/../.."
# Release binaries, as a node runs them (vpc-lab runs the agent and plugin next to itself).
cargo build --release --workspace --bins
mkdir -p target/perf
target/release/vpc-lab perf --out target/perf/perf.json "$@" | tee target/perf/perf.md
.venv/bin/python -c 'import matplotlib' 2>/dev/null || .venv/bin/pip install -q matplotlib
.venv/bin/python scripts/bench/plot.py target/perf/perf.json docs
