#!/usr/bin/env bash
# Runs on the GPU machine (device tool), from the repository root: the cuBLASLt GEMM
# checks and benchmark (`longview gemm`) beside torch's matmul, then the 1.5B
# forward+backward step (`longview bench`) beside PyTorch + transformers, in one call.
#   bash benchmarks/gpu_gemm_run.sh [frames, default 162]
# Carry dist/libs (FFmpeg, benchmarks/pack_ffmpeg_libs.sh) in one call and dist/bin
# (`cargo xtask package`, moved to dist/bin/) in the next, as gpu_train_run.sh says.
set -u
. benchmarks/gpu_prelude.sh
frames=${1:-162}
PY=$(python3 -c "import torch" 2>/dev/null && echo python3 || echo /opt/torch/.venv/bin/python3)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
step() { echo "== $1" | tee -a "$OUT/log.txt"; shift; start=$(date +%s)
  "$@" > "$OUT/step.txt" 2>&1; rc=$?
  cat "$OUT/step.txt" >> "$OUT/full.txt"; tail -n 40 "$OUT/step.txt" | tee -a "$OUT/log.txt"
  echo "-- exit $rc after $(( $(date +%s) - start )) s" | tee -a "$OUT/log.txt"; }
step "gemm check bf16" timeout 90 /tmp/lv gemm --device cuda --dtype bf16 --check 1e-2 --no-bench
[ "${F16:-1}" = 1 ] && step "gemm check f16" timeout 60 /tmp/lv gemm --device cuda --dtype f16 --check 1e-2 --no-bench
step "gemm bench bf16" timeout 60 /tmp/lv gemm --device cuda --dtype bf16 --tokens 32768 --json "$OUT/gemm.jsonl"
step "torch gemm" timeout 45 $PY benchmarks/gemm_reference.py --tokens 32768 --longview "$OUT/gemm.jsonl"
[ "${LV_BENCH:-1}" = 1 ] && step "longview bench $frames frames" timeout 200 /tmp/lv bench --device cuda --dtype bf16 --size 1.5b \
  --text-tokens 64 --attention flash --frames "$frames" --recompute attention-aware --warmup 1 --iters 3 \
  --json "$OUT/bench.jsonl"
[ "${TORCH_BENCH:-1}" = 1 ] && step "torch bench $frames frames" timeout 130 $PY benchmarks/hf_reference.py --size 1.5b --text-tokens 64 \
  --dtype bf16 --frames "$frames" --attn sdpa --checkpointing --warmup 1 --iters 3
# PROFILE=1: one more step under CubeCL's profiler (every kernel timed; no warm-up,
# so CubeCL's autotune trials are in the sums under their kernels' names). cuBLASLt
# calls are not CubeCL kernels and do not appear. Sums by kernel name in
# $OUT/profile.txt.
if [ "${PROFILE:-0}" = 1 ]; then
  rm -f /tmp/cubecl.log
  CUBECL_DEBUG_LOG=1 CUBECL_DEBUG_OPTION=profile step "profiled step $frames frames" timeout 200 \
    /tmp/lv bench --device cuda --dtype bf16 --size 1.5b --text-tokens 64 --attention flash \
    --frames "$frames" --recompute attention-aware --warmup 0 --iters 1
  python3 benchmarks/cubecl_profile.py /tmp/cubecl.log | tee "$OUT/profile.txt"
fi
