#!/usr/bin/env bash
# Installs the real CNI clients the conformance tests drive (run as root on Debian 12):
#   - apt: containerd (with its CRI plugin), runc, busybox-static, Debian's CNI plugins
#     (/usr/lib/cni: ptp, host-local, ...; portmap and bandwidth, which the lab's agents chain
#     after vpc-cni), Go (to build cnitool), iperf3, hyperfine, and protoc
#     (protobuf-compiler: the k8s-cri crate of crates/conformance generates its CRI client at build time),
#     mmdebstrap and buildah (`make image`: the base image from Debian's packages, then the
#     Containerfile built without a Docker engine; scripts/image/build.sh)
#   - .cache/bin/cnitool, built offline from Debian's *source* package of the CNI library
#     (no binary package ships it); /etc/apt is not touched: a private sources list and
#     lists directory live under .cache/aptsrc
#   - .cache/pause-oci.tar, an OCI image "localhost/pause:lab" holding busybox-static with
#     entrypoint `busybox sleep 100000` (the sandbox image containerd's CRI plugin runs)
# Idempotent: each step is skipped when its result is already present.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
CACHE=$REPO/.cache

if [[ $(id -u) -ne 0 ]]; then
  echo "setup-clients: must run as root (apt-get install); run: sudo bash scripts/setup-clients.sh" >&2
  exit 1
fi

# ---- 1. Debian packages ----------------------------------------------------------------------
APT_PACKAGES=(containerd runc busybox-static containernetworking-plugins golang-go
  golang-github-appc-cni-dev iperf3 hyperfine dpkg-dev xz-utils protobuf-compiler
  mmdebstrap buildah)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup-clients: installing apt packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# ---- 2. cnitool from Debian's source package golang-github-appc-cni --------------------------
CNITOOL=$CACHE/bin/cnitool
# cnitool without arguments prints its usage and exits 1
if ! [[ -x $CNITOOL ]] || [[ $("$CNITOOL" 2>&1 || true) != *"cnitool add"* ]]; then
  echo "setup-clients: building $CNITOOL from Debian's source package golang-github-appc-cni"
  APTSRC=$CACHE/aptsrc
  rm -rf "$APTSRC/pkg"
  mkdir -p "$APTSRC/lists/partial" "$APTSRC/pkg" "$CACHE/bin"
  # The mirror URI comes from the machine's own Debian sources (deb822 or one-line format).
  uri=""
  if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
    uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  fi
  if [[ -z $uri && -f /etc/apt/sources.list ]]; then
    uri=$(awk '$1=="deb"{for(i=2;i<=NF;i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' /etc/apt/sources.list)
  fi
  if [[ -z $uri ]]; then
    echo "setup-clients: no Debian mirror URI found in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list;" \
      "add a 'deb <URI> bookworm main' source and re-run" >&2
    exit 1
  fi
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
  printf 'deb-src %s %s main\n' "$uri" "$codename" >"$APTSRC/src.list"
  O=(-o "Dir::Etc::SourceList=$APTSRC/src.list" -o Dir::Etc::SourceParts=/dev/null
    -o "Dir::State::Lists=$APTSRC/lists" -o "Dir::Cache=$APTSRC/cache" -o APT::Sandbox::User=root)
  mkdir -p "$APTSRC/cache/archives/partial"
  apt-get "${O[@]}" update -qq
  (cd "$APTSRC/pkg" && apt-get "${O[@]}" source --download-only -qq golang-github-appc-cni >/dev/null)
  orig=$(ls "$APTSRC"/pkg/golang-github-appc-cni_*.orig.tar.* | head -n1)
  # GOPATH mode: the library source goes to its import path in a private GOPATH; anything
  # else it imports comes from Debian's /usr/share/gocode.
  GOP=$CACHE/gopath
  SRC=$GOP/src/github.com/containernetworking/cni
  rm -rf "$SRC"
  mkdir -p "$SRC"
  tar -xf "$orig" -C "$SRC" --strip-components=1
  (cd "$SRC" && GO111MODULE=off GOPATH="$GOP:/usr/share/gocode" GOPROXY=off GOFLAGS= \
    GOCACHE="$CACHE/gocache" go build -o "$CNITOOL.tmp" ./cnitool)
  mv "$CNITOOL.tmp" "$CNITOOL"
  rm -rf "$APTSRC/pkg"
fi

# ---- 3. the pause image (OCI layout tar) -----------------------------------------------------
PAUSE=$CACHE/pause-oci.tar
if ! [[ -s $PAUSE ]] || ! tar -tf "$PAUSE" index.json >/dev/null 2>&1; then
  echo "setup-clients: writing $PAUSE (localhost/pause:lab from /bin/busybox of busybox-static)"
  mkdir -p "$CACHE"
  python3 - "$PAUSE.tmp" <<'EOF'
import gzip, hashlib, io, json, os, sys, tarfile, time

out = sys.argv[1]
busybox = "/bin/busybox"
if not os.path.isfile(busybox) or b"ELF" not in open(busybox, "rb").read(4):
    sys.exit(f"setup-clients: {busybox} is missing or not an ELF binary; install busybox-static")

# layer: /bin/busybox (static) and /bin/sleep -> busybox, mtime 0 so the image is reproducible
raw = io.BytesIO()
with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as t:
    d = tarfile.TarInfo("bin"); d.type = tarfile.DIRTYPE; d.mode = 0o755; t.addfile(d)
    data = open(busybox, "rb").read()
    f = tarfile.TarInfo("bin/busybox"); f.size = len(data); f.mode = 0o755
    t.addfile(f, io.BytesIO(data))
    s = tarfile.TarInfo("bin/sleep"); s.type = tarfile.SYMTYPE; s.linkname = "busybox"; s.mode = 0o777
    t.addfile(s)
layer_tar = raw.getvalue()
diff_id = "sha256:" + hashlib.sha256(layer_tar).hexdigest()
layer_gz = gzip.compress(layer_tar, mtime=0)

def blob(b):
    return "sha256:" + hashlib.sha256(b).hexdigest(), b

layer_digest, _ = blob(layer_gz)
config = json.dumps({
    "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine),
    "os": "linux",
    "config": {"Entrypoint": ["/bin/busybox", "sleep", "100000"],
               "Env": ["PATH=/bin"], "WorkingDir": "/"},
    "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    "created": "1970-01-01T00:00:00Z",
}, sort_keys=True).encode()
config_digest, _ = blob(config)
manifest = json.dumps({
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
               "digest": config_digest, "size": len(config)},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": layer_digest, "size": len(layer_gz)}],
}, sort_keys=True).encode()
manifest_digest, _ = blob(manifest)
index = json.dumps({
    "schemaVersion": 2,
    "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                   "digest": manifest_digest, "size": len(manifest),
                   "annotations": {"io.containerd.image.name": "localhost/pause:lab",
                                   "org.opencontainers.image.ref.name": "lab"}}],
}, sort_keys=True).encode()

with tarfile.open(out, mode="w", format=tarfile.PAX_FORMAT) as t:
    def add(name, data):
        i = tarfile.TarInfo(name); i.size = len(data); i.mode = 0o644
        t.addfile(i, io.BytesIO(data))
    d = tarfile.TarInfo("blobs"); d.type = tarfile.DIRTYPE; d.mode = 0o755; t.addfile(d)
    d = tarfile.TarInfo("blobs/sha256"); d.type = tarfile.DIRTYPE; d.mode = 0o755; t.addfile(d)
    for dg, b in ((layer_digest, layer_gz), (config_digest, config), (manifest_digest, manifest)):
        add("blobs/sha256/" + dg.split(":")[1], b)
    add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
    add("index.json", index)
EOF
  mv "$PAUSE.tmp" "$PAUSE"
fi
echo "setup-clients: ok (containerd $(containerd --version 2>/dev/null | awk '{print $3}'), $CNITOOL, $PAUSE)"
