#!/usr/bin/env bash
# Builds the vpc-cni node image in the lab, where no container registry is reachable and no
# Docker engine runs (run as root; `make image`):
#   1. the base image docker.io/library/debian:bookworm-slim, made from Debian's packages with
#      mmdebstrap (variant minbase, merged /usr, docs/man/locales filtered out as in Debian's
#      official slim image). Its mirror, and the apt options needed to reach it, are the
#      machine's own (/etc/apt): this repository names no mirror. Built once, reused while its
#      inputs (this recipe, scripts/image/base/*, the machine's sources and options) are unchanged;
#   2. the build context (scripts/image/context.sh: the binaries, Debian's portmap/bandwidth);
#   3. the Containerfile, unchanged, with buildah (vfs storage, chroot isolation, never pulls);
#      its RUN apt-get reaches the same mirror through the base's apt configuration;
#   4. target/image/vpc-cni.oci.tar, an OCI archive for `ctr -n k8s.io images import`;
#      with --import, imported into the containerd at $CONTAINERD_ADDRESS.
# Everything buildah and mmdebstrap keep lives under $VPC_CNI_IMAGE_WORK (/var/tmp/vpc-cni-image),
# not in the system's container storage. Network: no namespace, interface, route or rule is
# created; mmdebstrap's apt and the build's RUN apt-get download over the machine's own network
# stack, as the machine's apt does (buildah --network host: no CNI/netavark network is set up).
#
# Usage: scripts/image/build.sh [--profile debug|release] [--no-build] [--rebuild-base] [--import]
#        scripts/image/build.sh clean
#   --profile       cargo profile of the binaries (default: debug, already built by `make build`)
#   --no-build      use the binaries in target/<profile> as they are (no cargo build)
#   --rebuild-base  rebuild the base image even if its inputs did not change
#   --import        import the archive into containerd ($CONTAINERD_ADDRESS, else
#                   /run/containerd/containerd.sock), namespace k8s.io
#   clean           remove the work directory, the archive and the build context; with
#                   CONTAINERD_ADDRESS set, also the image from that containerd
# Environment: IMAGE (default docker.io/library/vpc-cni:latest, i.e. vpc-cni:latest), VPC_CNI_IMAGE_WORK,
#   VPC_CNI_IMAGE_APT_SOURCES (a sources file for the base, default the machine's Debian sources).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD

. scripts/image/common.sh
SUITE=bookworm
BASE_DIR=$REPO/scripts/image/base
# Bump when the base recipe below changes, so an existing base is rebuilt.
BASE_RECIPE=2

PROFILE=debug
CONTEXT_ARGS=()
REBUILD_BASE=0
IMPORT=0
CLEAN=0
while (($#)); do
  case $1 in
    --profile) PROFILE=${2:?--profile needs debug or release}; shift 2 ;;
    --no-build) CONTEXT_ARGS+=(--no-build); shift ;;
    --rebuild-base) REBUILD_BASE=1; shift ;;
    --import) IMPORT=1; shift ;;
    clean) CLEAN=1; shift ;;
    -h | --help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

[[ $(id -u) -eq 0 ]] || die "must run as root (mmdebstrap --mode=root, buildah with its own storage root); run: sudo $0 $*"
[[ $WORK == /* && $WORK != / ]] || die "VPC_CNI_IMAGE_WORK must be an absolute directory, not '$WORK'"

B=(buildah --root "$WORK/storage" --runroot "$WORK/run" --storage-driver vfs)
SOCK=${CONTAINERD_ADDRESS:-/run/containerd/containerd.sock}
CTR=(ctr --address "$SOCK" -n k8s.io)

# containers/image keeps a blob-info cache in /var/lib/containers/cache whatever the storage
# root is; remove it again when this script created it.
VAR_LIB_CONTAINERS_EXISTED=0
[[ -e /var/lib/containers ]] && VAR_LIB_CONTAINERS_EXISTED=1
cleanup() {
  if ((!VAR_LIB_CONTAINERS_EXISTED)) && [[ -d /var/lib/containers ]]; then
    rm -rf /var/lib/containers/cache
    rmdir /var/lib/containers 2>/dev/null || true
  fi
}
trap cleanup EXIT

# Mount points under $WORK (left by an interrupted mmdebstrap), deepest first.
mounts_under_work() {
  awk -v w="$WORK/" 'index($5, w) == 1 {print $5}' /proc/self/mountinfo | sort -r
}

if ((CLEAN)); then
  if [[ -d $WORK ]]; then
    for m in $(mounts_under_work); do umount -l "$m"; done
    if command -v buildah >/dev/null; then
      "${B[@]}" rm --all >/dev/null 2>&1 || true
      "${B[@]}" rmi --all --force >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK"
    say "removed $WORK"
  fi
  rm -rf "$ARCHIVE" "$CONTEXT"
  rmdir "$(dirname "$ARCHIVE")" 2>/dev/null || true
  say "removed $ARCHIVE and $CONTEXT"
  if [[ -n ${CONTAINERD_ADDRESS:-} ]]; then
    if "${CTR[@]}" images rm "$IMAGE" >/dev/null 2>&1; then
      say "removed $IMAGE from the containerd at $CONTAINERD_ADDRESS"
    else
      say "$IMAGE was not in the containerd at $CONTAINERD_ADDRESS"
    fi
  fi
  exit 0
fi

for tool in mmdebstrap buildah strip; do
  command -v "$tool" >/dev/null || die "$tool is not installed; run: bash scripts/setup-clients.sh (installs mmdebstrap and buildah from Debian's packages)"
done

if ((IMPORT)) && ! [[ -S $SOCK ]]; then
  die "--import: no containerd socket at $SOCK; start containerd or set CONTAINERD_ADDRESS"
fi

mkdir -p "$WORK/tmp"
exec 9>"$WORK/lock"
flock -n 9 || die "another build.sh holds $WORK/lock; wait for it to finish"
leftover=$(mounts_under_work)
[[ -z $leftover ]] || die "mounts left under $WORK by an interrupted run: $leftover; run: $0 clean"
export TMPDIR=$WORK/tmp
t_all=$SECONDS

# ---- 1. the base image -------------------------------------------------------------------------
# The machine's Debian sources, as scripts/setup-clients.sh finds them (deb822 or one-line).
SOURCES=${VPC_CNI_IMAGE_APT_SOURCES:-}
if [[ -z $SOURCES ]]; then
  for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
    if [[ -s $f ]] && grep -qE '^(Types:|deb )' "$f"; then SOURCES=$f; break; fi
  done
fi
[[ -n $SOURCES && -s $SOURCES ]] ||
  die "no Debian sources found in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list; set VPC_CNI_IMAGE_APT_SOURCES to a sources file for Debian $SUITE"
grep -qw "$SUITE" "$SOURCES" ||
  die "$SOURCES has no '$SUITE' suite; the base image is debian:$SUITE-slim: set VPC_CNI_IMAGE_APT_SOURCES to a sources file for Debian $SUITE"
# The machine's apt options that decide whether a mirror can be reached (a snapshot mirror's old
# Release files, a proxy). They go into the base's /etc/apt/apt.conf.d/99mmdebstrap, so the
# Containerfile's RUN apt-get uses them too.
apt-config dump | grep -E '^Acquire::(Check-Valid-Until|Check-Date|Max-ValidTime|Retries|https?::Proxy|ftp::Proxy)( |::)' \
  >"$WORK/host-apt.conf" || true

base_inputs=$(
  {
    echo "recipe $BASE_RECIPE $SUITE"
    cat "$BASE_DIR/dpkg-slim.cfg" "$BASE_DIR/90slim" "$SOURCES" "$WORK/host-apt.conf"
  } | sha256sum | cut -c1-16
)
have_base=$("${B[@]}" inspect --type image --format '{{index .ImageAnnotations "org.vpc-cni.base-inputs"}}' "$BASE" 2>/dev/null || true)
if ((!REBUILD_BASE)) && [[ $have_base == "$base_inputs" ]]; then
  say "base $BASE: reusing ($("${B[@]}" images --format '{{.Size}}' "$BASE"), inputs $base_inputs)"
else
  [[ -z $have_base ]] || say "base $BASE: inputs changed or --rebuild-base; rebuilding"
  say "base $BASE: mmdebstrap --variant=minbase $SUITE from $SOURCES"
  t=$SECONDS
  rm -f "$WORK/base.tar"
  # shellcheck disable=SC2016 # $1 is the chroot, expanded by mmdebstrap's hook shell
  mmdebstrap --variant=minbase --mode=root --format=tar \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --aptopt="$WORK/host-apt.conf" \
    --dpkgopt="$BASE_DIR/dpkg-slim.cfg" \
    --customize-hook='rm -f "$1/etc/resolv.conf" "$1/etc/hostname"' \
    "$SUITE" "$WORK/base.tar.tmp" "$SOURCES" >"$WORK/mmdebstrap.log" 2>&1 || {
    tail -n 25 "$WORK/mmdebstrap.log" >&2
    die "mmdebstrap failed (last lines above, all in $WORK/mmdebstrap.log); the base needs Debian's packages through the machine's apt configuration ($SOURCES)"
  }
  # An image carries no device nodes: the runtime mounts /dev.
  tar --delete --wildcards -f "$WORK/base.tar.tmp" './dev/?*'
  mv "$WORK/base.tar.tmp" "$WORK/base.tar"
  c=$("${B[@]}" from scratch)
  "${B[@]}" add "$c" "$WORK/base.tar" / >/dev/null
  # 90slim is added here, not by an mmdebstrap hook: mmdebstrap runs apt on the host with the
  # chroot's configuration, and 90slim's Post-Invoke commands are meant for the image only.
  "${B[@]}" copy --chmod 0644 "$c" "$BASE_DIR/90slim" /etc/apt/apt.conf.d/90slim >/dev/null
  "${B[@]}" config --os linux --arch "$(dpkg --print-architecture)" \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd bash \
    --annotation "org.vpc-cni.base-inputs=$base_inputs" \
    --created-by "mmdebstrap --variant=minbase $SUITE (vpc-cni scripts/image/build.sh)" "$c"
  "${B[@]}" commit --quiet --rm "$c" "$BASE" >/dev/null
  rm -f "$WORK/base.tar"
  "${B[@]}" rmi --prune >/dev/null 2>&1 || true
  say "base $BASE: built in $((SECONDS - t)) s ($("${B[@]}" images --format '{{.Size}}' "$BASE"))"
fi

# ---- 2. the build context ----------------------------------------------------------------------
bash scripts/image/context.sh --profile "$PROFILE" --out "$CONTEXT" "${CONTEXT_ARGS[@]}"

# ---- 3. the Containerfile ----------------------------------------------------------------------
say "buildah build -f Containerfile -t $IMAGE $CONTEXT"
t=$SECONDS
"${B[@]}" build --isolation chroot --network host --pull=never --layers \
  -f "$REPO/Containerfile" -t "$IMAGE" "$CONTEXT" >"$WORK/build.log" 2>&1 || {
  tail -n 25 "$WORK/build.log" >&2
  die "buildah build failed (last lines above, all in $WORK/build.log)"
}
# Intermediate images of earlier builds that nothing refers to any more.
"${B[@]}" rmi --prune >/dev/null 2>&1 || true
say "built $IMAGE in $((SECONDS - t)) s"

# ---- 4. the OCI archive ------------------------------------------------------------------------
mkdir -p "$(dirname "$ARCHIVE")"
rm -f "$ARCHIVE.tmp"
"${B[@]}" push --quiet "$IMAGE" "oci-archive:$ARCHIVE.tmp:$IMAGE"
mv "$ARCHIVE.tmp" "$ARCHIVE"

if ((IMPORT)); then
  "${CTR[@]}" images import "$ARCHIVE" >/dev/null || die "ctr images import $ARCHIVE failed"
  say "imported $IMAGE into the containerd at $SOCK (namespace k8s.io)"
fi

size=$("${B[@]}" images --format '{{.Size}}' "$IMAGE")
base_size=$("${B[@]}" images --format '{{.Size}}' "$BASE")
say "done in $((SECONDS - t_all)) s: $IMAGE $size uncompressed (base $base_size), archive $ARCHIVE $(du -h "$ARCHIVE" | cut -f1) (layers gzip-compressed)"
((IMPORT)) || say "import it: ctr -n k8s.io images import $ARCHIVE; check it: bash scripts/image/check.sh"
