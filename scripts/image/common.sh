# Sourced by scripts/image/build.sh and check.sh (from the repository root): the names both use.
# shellcheck shell=bash disable=SC2034 # the variables are for the scripts that source this

# The image's name: `vpc-cni:latest`, which deploy/base/daemonset.yaml runs (imagePullPolicy
# IfNotPresent), spelled as containerd's CRI and `docker build -t vpc-cni:latest` normalize it.
# Spelled out because buildah would make a short name localhost/vpc-cni:latest.
IMAGE=${IMAGE:-docker.io/library/vpc-cni:latest}
# The workspace's version, which `vpc-cni-agent --version` prints.
VERSION=$(awk -F'"' '/^\[workspace.package\]/{p=1} p && /^version *=/{print $2; exit}' Cargo.toml)
# The base the Containerfile names, as `docker pull debian:bookworm-slim` would store it.
BASE=docker.io/library/debian:bookworm-slim
# buildah's storage root, mmdebstrap's temporary directory, the lock.
WORK=${VPC_CNI_IMAGE_WORK:-/var/tmp/vpc-cni-image}
CONTEXT=$PWD/target/image-context
ARCHIVE=$PWD/target/image/vpc-cni.oci.tar

die() { echo "image: $*" >&2; exit 1; }
say() { echo "image: $*"; }
