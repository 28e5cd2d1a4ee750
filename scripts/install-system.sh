#!/usr/bin/env bash
# Installs the system packages krgd needs: CRIU 4.x (with its Python bindings), FUSE 3, and the
# build tools for the project's C code and pyfuse3. Idempotent: what is already there is skipped,
# so a second run takes seconds. Run as root (make install does).
set -euo pipefail

CRIU_VERSION=4.1.1
CRIU_SHA256=f80a66cb3726bb2116266d4759ce3bcbfab7abdb6b6d430bf20dd41911717afe
PREFIX=/usr/local
PYCRIU_DIR=$PREFIX/share/kerrighed/pycriu     # pure-Python bindings, copied into each venv
CACHE=/var/cache/kerrighed
PATCHES=$(cd "$(dirname "$0")" && pwd)/criu-patches
STAMP=$PREFIX/share/kerrighed/criu.stamp          # which patches the installed build carries

# Everything Debian 12 and 13 both ship. The CRIU build deps are needed on 12 only, but they are
# also what pycriu needs at run time (protobuf), so one list serves both.
APT_PACKAGES=(
  build-essential pkg-config fuse3 libfuse3-dev libffi-dev python3-venv xz-utils ca-certificates
  protobuf-c-compiler libprotobuf-c-dev libprotobuf-dev protobuf-compiler libnl-3-dev libnet1-dev
  libcap-dev libbsd-dev libgnutls28-dev python3-protobuf libnftables-dev uuid-dev libdrm-dev
  iproute2 procps util-linux patch
  git sqlite3 tar e2fsprogs   # real workloads the KDFS tests run inside the mount (git, sqlite3, tar, make)
)

log() { printf 'install-system: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  log "must run as root (it installs system packages)"; exit 1
fi

. /etc/os-release
apt_updated=
apt_update() { [ -n "$apt_updated" ] || { apt-get update -qq; apt_updated=1; }; }

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  apt_update
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

criu_ok() {
  local bin
  bin=$(command -v criu 2>/dev/null) || return 1
  "$bin" --version 2>/dev/null | grep -q "Version: 4\." && [ -f "$PYCRIU_DIR/criu.py" ]
}

patches_id() { cat "$PATCHES"/*.patch | sha256sum | cut -d' ' -f1; }

# Without CAP_SYS_RESOURCE (some containers drop it even for root), stock CRIU cannot read the
# resource limits of another user's process, so it cannot dump users' jobs: our patched build can.
lacks_sys_resource() {
  local eff
  eff=$(awk '/^CapEff:/ {print $2}' /proc/self/status)
  (( (16#$eff >> 24 & 1) == 0 ))
}

if criu_ok && { ! lacks_sys_resource || [ "$(cat "$STAMP" 2>/dev/null)" = "$(patches_id)" ]; }; then
  log "criu $(criu --version | head -1 | awk '{print $2}') and pycriu already installed"
  exit 0
fi

if [ "${VERSION_ID:-}" != "12" ] && ! lacks_sys_resource && apt-cache policy criu 2>/dev/null | grep -q "Candidate: 4\."; then
  # Debian 13 and later ship a working CRIU 4.x.
  log "installing criu from Debian packages"
  apt_update
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends criu python3-pycriu >/dev/null
  mkdir -p "$(dirname "$PYCRIU_DIR")"
  rm -rf "$PYCRIU_DIR"
  cp -r /usr/lib/python3/dist-packages/pycriu "$PYCRIU_DIR"
  criu_ok && exit 0
  log "criu from Debian packages is not usable; building from source"
fi

# Debian 12: its criu 3.17 fails on current kernels (PLATFORM.md), and trixie's binary package
# needs glibc 2.38, so build trixie's upstream tarball.
mkdir -p "$CACHE"
tarball=$CACHE/criu_$CRIU_VERSION.orig.tar.xz
if ! echo "$CRIU_SHA256  $tarball" | sha256sum -c --status 2>/dev/null; then
  log "fetching criu $CRIU_VERSION source (Debian trixie)"
  uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$uri" ] || uri=$(awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  [ -n "$uri" ] || { log "cannot find the machine's Debian mirror in /etc/apt"; exit 1; }
  srcdir=$CACHE/apt-src
  mkdir -p "$srcdir/lists/partial" "$srcdir/archives/partial"
  printf 'deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s trixie main\n' "$uri" \
    > "$srcdir/sources.list"
  # A private apt configuration: the machine's own sources stay untouched.
  aptopts=(-o Dir::Etc::SourceList="$srcdir/sources.list" -o Dir::Etc::SourceParts=/dev/null
           -o Dir::State::Lists="$srcdir/lists" -o Dir::Cache::Archives="$srcdir/archives")
  apt-get "${aptopts[@]}" update -qq
  # The .dsc may be missing from the mirror while the orig tarball is there: keep what came.
  version=$(apt-cache "${aptopts[@]}" showsrc criu | awk -v v="$CRIU_VERSION-" '$1 == "Version:" && index($2, v) == 1 {print $2; exit}')
  [ -n "$version" ] || { log "Debian trixie no longer lists criu $CRIU_VERSION"; exit 1; }
  (cd "$CACHE" && apt-get "${aptopts[@]}" source --download-only "criu=$version" >/dev/null 2>&1) || true
  echo "$CRIU_SHA256  $tarball" | sha256sum -c --status || { log "criu tarball missing or wrong checksum: $tarball"; exit 1; }
fi

build=$CACHE/criu-$CRIU_VERSION
if [ ! -x "$build/criu/criu" ] || [ ! -f "$build/lib/pycriu/rpc_pb2.py" ] || \
   [ "$(cat "$build/.patches" 2>/dev/null)" != "$(patches_id)" ]; then
  log "building criu $CRIU_VERSION (about a minute)"
  rm -rf "$build"
  tar -C "$CACHE" -xf "$tarball"
  for patch in "$PATCHES"/*.patch; do
    patch -d "$build" -p1 --quiet < "$patch" || { log "cannot apply $patch"; exit 1; }
  done
  patches_id > "$build/.patches"
  make -C "$build" -j"$(nproc)" criu >"$CACHE/criu-build.log" 2>&1 || { tail -20 "$CACHE/criu-build.log"; exit 1; }
  make -C "$build" lib >>"$CACHE/criu-build.log" 2>&1 || { tail -20 "$CACHE/criu-build.log"; exit 1; }
fi
install -m 0755 "$build/criu/criu" "$PREFIX/sbin/criu"
mkdir -p "$(dirname "$PYCRIU_DIR")"
rm -rf "$PYCRIU_DIR"
cp -r "$build/lib/pycriu" "$PYCRIU_DIR"
find "$PYCRIU_DIR" -name '__pycache__' -prune -exec rm -rf {} +
criu_ok || { log "criu still not usable after the build"; exit 1; }
patches_id > "$STAMP"
log "criu $CRIU_VERSION installed at $PREFIX/sbin/criu"
