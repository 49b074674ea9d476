#!/usr/bin/env bash
# Installs everything `make demo` and `make test` need on a fresh Debian machine (run as root).
# Idempotent: each step is skipped when its result is already present.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(iproute2 nftables iptables ebtables iputils-ping procps curl python3-venv)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing apt packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The EC2 API emulator (moto) lives in a project-local virtualenv.
MOTO_VERSION=5.2.5
if ! .venv/bin/moto_server --help >/dev/null 2>&1; then
  echo "setup: creating .venv with moto[server]==${MOTO_VERSION}"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check "moto[server]==${MOTO_VERSION}"
fi

# Real CNI clients for the conformance tests (containerd + CRI, cnitool from Debian's source),
# the reference plugins and benchmark tools; also protoc, which the CRI client's build needs.
bash scripts/setup-clients.sh
