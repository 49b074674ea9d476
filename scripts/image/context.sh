#!/usr/bin/env bash
# Prepares the build context of the node image (Containerfile at the repository root):
#   <out>/vpc-cni-agent, <out>/vpc-cni     the workspace's binaries (debug info stripped)
#   <out>/vpcctl                            the operator's CLI (reads the agent's introspection)
#   <out>/cni/portmap, <out>/cni/bandwidth  the plugins the conflist chains, from Debian's
#                                           containernetworking-plugins (/usr/lib/cni)
#   <out>/SOURCES                           where each file came from, with its sha256
# The binaries are built here, outside the image: no registry serves a Rust builder image to
# a multi-stage build on our machines. They link only glibc (and libgcc_s), so they must be
# built on Debian 12 or older (the image's base is debian:bookworm-slim).
#
# Usage: scripts/image/context.sh [--profile release|debug] [--no-build] [--out DIR]
#   --profile   cargo profile (default: release; `make image` in the lab passes debug)
#   --no-build  use the binaries already in target/<profile> instead of running cargo build
#   --out       the context directory (default: target/image-context); replaced as a whole
# Then: docker build -f Containerfile -t vpc-cni:latest target/image-context
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD

PROFILE=release
BUILD=1
OUT=$REPO/target/image-context
CHAINED_SRC=${VPC_CNI_CHAINED_PLUGINS_SRC:-/usr/lib/cni}
CHAINED=(portmap bandwidth)

while (($#)); do
  case $1 in
    --profile) PROFILE=${2:?--profile needs release or debug}; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --out) OUT=${2:?--out needs a directory}; shift 2 ;;
    -h | --help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
    *) echo "context: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case $PROFILE in
  release) cargo_profile=(--release) ;;
  debug) cargo_profile=() ;;
  *) echo "context: --profile must be release or debug, not $PROFILE" >&2; exit 2 ;;
esac

if ((BUILD)); then
  echo "context: cargo build${cargo_profile[*]:+ ${cargo_profile[*]}} -p agent -p plugin -p vpcctl --bins"
  "${CARGO:-cargo}" build "${cargo_profile[@]}" -p agent -p plugin -p vpcctl --bins
fi

# Where cargo put them: CARGO_TARGET_DIR when set, as cargo itself reads it.
BIN=${CARGO_TARGET_DIR:-$REPO/target}/$PROFILE
for b in vpc-cni-agent vpc-cni vpcctl; do
  if ! [[ -x $BIN/$b ]]; then
    echo "context: $BIN/$b is missing; build it (cargo build ${cargo_profile[*]} -p agent -p plugin -p vpcctl) or drop --no-build" >&2
    exit 1
  fi
done
for p in "${CHAINED[@]}"; do
  if ! [[ -x $CHAINED_SRC/$p ]]; then
    echo "context: $CHAINED_SRC/$p is missing; install Debian's containernetworking-plugins" \
      "(apt-get install containernetworking-plugins) or set VPC_CNI_CHAINED_PLUGINS_SRC to a directory holding ${CHAINED[*]}" >&2
    exit 1
  fi
done

rm -rf "$OUT"
mkdir -p "$OUT/cni"
# --strip-debug keeps the symbol table, so a panic's backtrace still names functions.
for b in vpc-cni-agent vpc-cni vpcctl; do
  strip --strip-debug -o "$OUT/$b" "$BIN/$b"
done
for p in "${CHAINED[@]}"; do
  cp "$CHAINED_SRC/$p" "$OUT/cni/$p"
done
chmod 0755 "$OUT"/vpc-cni-agent "$OUT"/vpc-cni "$OUT"/vpcctl "$OUT"/cni/*

{
  echo "# vpc-cni image build context, written by scripts/image/context.sh"
  echo "profile: $PROFILE"
  echo "commit: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)$(git -C "$REPO" diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
  echo "vpc-cni-agent: $("$OUT/vpc-cni-agent" --version 2>/dev/null || echo '?')"
  if pkg=$(dpkg-query -W -f='${Package} ${Version}' containernetworking-plugins 2>/dev/null) &&
    [[ $CHAINED_SRC == /usr/lib/cni ]]; then
    echo "chained plugins: $pkg (Debian)"
  else
    echo "chained plugins: $CHAINED_SRC"
  fi
  (cd "$OUT" && sha256sum vpc-cni-agent vpc-cni vpcctl cni/*)
} >"$OUT/SOURCES"

echo "context: $OUT ($(du -sh "$OUT" | cut -f1)): vpc-cni-agent, vpc-cni, vpcctl ($PROFILE), cni/{$(IFS=,; echo "${CHAINED[*]}")}"
