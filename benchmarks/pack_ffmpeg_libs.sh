#!/usr/bin/env bash
# Packs the shared libraries `target/release/longview` loads (FFmpeg and what it
# links) that the GPU machine (Ubuntu 24.04 image) does not have into
# dist/libs/lvlibs.tar.xz, for benchmarks/gpu_train_bench.sh. The list of missing
# sonames came from `ldconfig -p` on that machine (2026-11-22); glibc and libstdc++
# are taken from the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
have_there='^(libc|libm|libpthread|libdl|librt|ld-linux-x86-64|libgcc_s|libstdc\+\+|libz|libbz2|liblzma|libxml2|libicu.*|libgnutls|libX11|libxcb|libXau|libXdmcp|libdrm|libOpenCL|libbsd|libmd|libbrotli.*|libblkid|libmount|libselinux|libpcre2-8|libffi|libexpat|libpng16|libgcrypt|libgpg-error|libp11-kit|libidn2|libtasn1|libnettle|libhogweed|libgmp|libzstd|libcrypto|libssl|libsystemd|libcap|libuuid|libxcb-.*)\.so'
rm -rf /tmp/lvmiss && mkdir -p /tmp/lvmiss dist/libs
ldd target/release/longview | awk '/=>/ {print $3}' | while read -r lib; do
  name=$(basename "$lib")
  if ! [[ "$name" =~ $have_there ]] || [[ "$name" =~ ^(libicudata|libicuuc|libxcb-dri3|libxcb-render|libxcb-shm|libX11-xcb)\. ]]; then
    cp -L "$lib" /tmp/lvmiss/
  fi
done
tar -C /tmp -cf - lvmiss | xz -T0 -9 > dist/libs/lvlibs.tar.xz
ls -la dist/libs/lvlibs.tar.xz
