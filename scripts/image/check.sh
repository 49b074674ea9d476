#!/usr/bin/env bash
# Checks the image scripts/image/build.sh made (target/image/vpc-cni.oci.tar) by running its
# binaries through containerd, as the lab's kubelet will (run as root):
#   - a throwaway containerd (`vpc-cni-conformance containerd start`: its own config, root, state
#     and sockets under a temporary directory) inside a network namespace this script creates;
#   - the archive imported into it (namespace k8s.io);
#   - each check a `ctr run --rm` container in its own new, empty network namespace (ctr's
#     default: no --net-host, no CNI), which the first check confirms (only `lo`);
#   - then containerd stopped and everything removed: containers, snapshots, images (with
#     containerd's root), FIFOs, runc state, the namespace, the temporary directory.
# The host's network namespace and its interfaces are never touched.
#
# Usage: scripts/image/check.sh [--keep-log]   (IMAGE, as for build.sh)
#   --keep-log  keep containerd's log as target/image/check-containerd.log

# shellcheck disable=SC2016 # the sh -c scripts below expand in the container, not here
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
. scripts/image/common.sh

KEEP_LOG=0
case ${1:-} in
  --keep-log) KEEP_LOG=1 ;;
  '') ;;
  -h | --help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
  *) die "unknown argument $1 (see --help)" ;;
esac

[[ $(id -u) -eq 0 ]] || die "check.sh must run as root (containerd, ip netns); run: sudo $0"
[[ -s $ARCHIVE ]] || die "$ARCHIVE is missing; build it first: make image (scripts/image/build.sh)"
for tool in containerd ctr runc ip python3; do
  command -v "$tool" >/dev/null || die "$tool is not installed; run: bash scripts/setup-clients.sh"
done
CONFORMANCE=$REPO/target/debug/vpc-cni-conformance
if ! [[ -x $CONFORMANCE ]]; then
  say "building $CONFORMANCE (it starts and stops the throwaway containerd)"
  "${CARGO:-cargo}" build -p conformance --bin vpc-cni-conformance
fi

NS=vpccni-imgchk-$$
TMP=$(mktemp -d /var/tmp/vpc-cni-image-check.XXXXXX)
CTD=$TMP/containerd
STARTED=0
finish() {
  local rc=$?
  if ((STARTED)); then
    if ((KEEP_LOG)); then
      cp "$CTD/containerd.log" "$REPO/target/image/check-containerd.log" 2>/dev/null || true
    fi
    "$CONFORMANCE" containerd stop --dir "$CTD" >"$TMP/stop.json" ||
      { echo "check: containerd stop reported problems:" >&2; cat "$TMP/stop.json" >&2; rc=1; }
    if python3 -c 'import json,sys; sys.exit(1 if json.load(open(sys.argv[1]))["errors"] else 0)' "$TMP/stop.json" 2>/dev/null; then :; else
      echo "check: containerd stop left errors:" >&2; cat "$TMP/stop.json" >&2; rc=1
    fi
  fi
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "$TMP"
  exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT TERM

ip netns add "$NS"
mkdir -p "$TMP/net.d" "$TMP/fifo" "$TMP/runc"
t0=$SECONDS
# CRI is not used here, but the conformance containerd needs a CNI bin dir to start.
"$CONFORMANCE" containerd start --netns "$NS" --dir "$CTD" --cni-bin /usr/lib/cni \
  --cni-conf "$TMP/net.d" >"$TMP/start.json" || die "could not start containerd (see above)"
STARTED=1
CTR=(ctr --address "$CTD/containerd.sock" -n k8s.io)
"${CTR[@]}" images import "$ARCHIVE" >/dev/null || die "ctr images import $ARCHIVE failed"
"${CTR[@]}" images ls -q | grep -qxF "$IMAGE" ||
  die "after importing $ARCHIVE, containerd has no image $IMAGE (it has: $("${CTR[@]}" images ls -q | grep -v "^sha256:" | tr '\n' ' ')); IMAGE must match the build"
# Sizes as containerd sees them: its content store keeps the compressed layers; the snapshots
# are the unpacked file systems (with the pause image's 1 MB the conformance containerd imports).
content=$("${CTR[@]}" images ls | awk -v i="$IMAGE" '$1 == i {print $(NF-3), $(NF-2)}')
unpacked=$(du -sh "$CTD/root/io.containerd.snapshotter.v1.overlayfs/snapshots" 2>/dev/null | cut -f1)
say "containerd in netns $NS, $IMAGE imported ($((SECONDS - t0)) s): content ${content:-?}, unpacked ${unpacked:-?}"

# run NAME EXPECTED_RC PATTERN [ENV=VALUE ...] -- ARGV...: runs ARGV in a new container and
# checks its exit code and that its stdout+stderr match the extended regular expression PATTERN.
# --fifo-dir and --runc-root keep ctr's FIFOs and runc's state under $TMP.
FAILED=0
N=0
run() {
  local name=$1 want=$2 pattern=$3
  shift 3
  local envs=()
  while [[ $1 != -- ]]; do envs+=(--env "$1"); shift; done
  shift
  N=$((N + 1))
  local rc=0 out
  out=$("${CTR[@]}" run --rm --fifo-dir "$TMP/fifo" --runc-root "$TMP/runc" "${envs[@]}" \
    "$IMAGE" "imgchk-$$-$N" "$@" 2>&1) || rc=$?
  # JSON may be pretty-printed: PATTERN may also match the output with blanks and newlines removed.
  if [[ $rc -eq $want ]] && { grep -qE -- "$pattern" <<<"$out" || grep -qE -- "$pattern" <<<"$(tr -d ' \n' <<<"$out")"; }; then
    printf 'ok    %-28s %s\n' "$name" "$(tr -s ' \n' '  ' <<<"$out" | cut -c1-100)"
  else
    printf 'FAIL  %-28s exit %s (want %s), output:\n%s\n' "$name" "$rc" "$want" "$out"
    FAILED=$((FAILED + 1))
  fi
}

# The container's network namespace is a new one: only the loopback device.
run "own network namespace" 0 '^lo$' -- sh -c \
  'devs=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d " "); echo "$devs"; [ "$devs" = lo ]'
run "vpc-cni-agent --version" 0 "^vpc-cni-agent $VERSION" -- /app/vpc-cni-agent --version
# The DaemonSet's init container runs `vpc-cni-agent init` (it needs IMDS, so only its help here).
run "vpc-cni-agent init --help" 0 'HOST_CNI_BIN_PATH' -- /app/vpc-cni-agent init --help
# ctr keeps a container's stdin open, so close it here: run by hand, the plugin says what it
# is on stderr and exits 1 (older plugins answered with a CNI error naming CNI_COMMAND).
run "vpc-cni (no CNI_COMMAND)" 1 '^vpc-cni .*CNI_COMMAND|CNI_COMMAND is not set' -- \
  sh -c 'exec /app/vpc-cni </dev/null'
run "vpc-cni VERSION" 0 '"supportedVersions":.*"1\.0\.0"' CNI_COMMAND=VERSION -- /app/vpc-cni
run "portmap VERSION" 0 '"supportedVersions":.*"1\.0\.0"' CNI_COMMAND=VERSION -- /app/cni/portmap
run "bandwidth VERSION" 0 '"supportedVersions":.*"1\.0\.0"' CNI_COMMAND=VERSION -- /app/cni/bandwidth
run "nft --version" 0 '^nftables v' -- nft --version
run "iptables-save --version" 0 '^iptables-save v' -- iptables-save --version
run "iptables-restore --version" 0 '^iptables-restore v' -- iptables-restore --version
run "env defaults" 0 '^/app/vpc-cni$' -- sh -c \
  'printenv VPC_CNI_PLUGIN_BINARY; [ "$VPC_CNI_CHAINED_PLUGINS_DIR" = /app/cni ]'
run "CA certificates" 0 'ca-certificates\.crt' -- sh -c \
  'test -s /etc/ssl/certs/ca-certificates.crt && echo /etc/ssl/certs/ca-certificates.crt'
# Small: no apt lists or downloaded packages, no compiler, no man pages.
run "no caches, compilers, docs" 0 '^clean$' -- sh -c \
  'set -e; [ -z "$(ls /var/lib/apt/lists | grep -v -x -e lock -e partial)" ];
   ! ls /var/cache/apt/archives/*.deb 2>/dev/null; ! command -v cc gcc rustc >/dev/null;
   [ -z "$(ls -A /usr/share/man 2>/dev/null)" ]; echo clean'

# The entrypoint, from the image's configuration in the archive (ctr run replaces it).
entry=$(python3 - "$ARCHIVE" <<'EOF'
import json, sys, tarfile
t = tarfile.open(sys.argv[1])
blob = lambda d: json.load(t.extractfile("blobs/sha256/" + d.split(":")[1]))
manifest = blob(json.load(t.extractfile("index.json"))["manifests"][0]["digest"])
print(json.dumps(blob(manifest["config"]["digest"])["config"].get("Entrypoint")))
EOF
)
if [[ $entry == '["/app/vpc-cni-agent"]' ]]; then
  printf 'ok    %-28s %s\n' "entrypoint" "$entry"
else
  printf 'FAIL  %-28s %s (want ["/app/vpc-cni-agent"])\n' "entrypoint" "$entry"
  FAILED=$((FAILED + 1))
fi

left=$("${CTR[@]}" containers ls -q | wc -l)
[[ $left -eq 0 ]] || { echo "FAIL  $left container(s) left after --rm"; FAILED=$((FAILED + 1)); }
if ((FAILED)); then
  die "$FAILED of $((N + 1)) checks failed"
fi
say "all $((N + 1)) checks passed in $((SECONDS - t0)) s"
