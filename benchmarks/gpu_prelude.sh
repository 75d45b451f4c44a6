# Sourced by the GPU benchmark scripts (on the GPU machine, from the repository root):
# the FFmpeg libraries the GPU image lacks (dist/libs/lvlibs.tar.xz, carried in one
# call: benchmarks/pack_ffmpeg_libs.sh) unpacked to /tmp/libs, and the binary
# (dist/bin/longview-cuda.xz, carried in the next call while the machine is warm)
# unpacked to /tmp/lv. Exits the calling script when one of them is still missing.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/tmp/libs/lvmiss NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if ! [ -d /tmp/libs/lvmiss ]; then
  [ -f dist/libs/lvlibs.tar.xz ] || { echo "no FFmpeg libraries: carry dist/libs first"; exit 1; }
  mkdir -p /tmp/libs && tar -C /tmp/libs -xJf dist/libs/lvlibs.tar.xz || exit 1
fi
if [ -f dist/bin/longview-cuda.xz ]; then
  python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('dist/bin/longview-cuda.xz'), open('/tmp/lv','wb'))" \
    && chmod +x /tmp/lv || exit 1
fi
[ -x /tmp/lv ] || { echo "libraries unpacked; carry dist/bin next"; exit 0; }
