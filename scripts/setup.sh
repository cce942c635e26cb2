#!/usr/bin/env bash
# Installs everything ferry needs on a fresh Debian machine with Node 20, from the lock file, and
# builds it (TypeScript and guests). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v clang >/dev/null 2>&1 || need_apt+=(clang)
command -v wasm-ld >/dev/null 2>&1 || need_apt+=(lld)
[ -f /usr/lib/wasm32-wasi/libc.a ] || need_apt+=(wasi-libc)
dpkg -s libclang-rt-dev-wasm32 >/dev/null 2>&1 || need_apt+=(libclang-rt-dev-wasm32)
[ -f /usr/include/xxhash.h ] || need_apt+=(libxxhash-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing Debian packages for C guests and native page hashing: ${need_apt[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

echo "setup: npm ci"
npm ci --no-audit --no-fund
echo "setup: building"
npm run build --silent
