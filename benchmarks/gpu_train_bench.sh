#!/usr/bin/env bash
# Runs on the GPU machine (device tool), from the repository root. Prints longview's
# 1.5B forward+backward step at a given length and recompute mode (bench JSON lines
# into $OUT/bench.jsonl), and optionally the PyTorch reference in the same call.
#   bash benchmarks/gpu_train_bench.sh "--frames 162 --recompute attention-aware" ...
# ("torch:<args>" runs benchmarks/hf_reference.py instead, "profile:<args>" a profiled
# step, below.)
# Carry the packaged binary (dist/bin/longview-cuda.xz, `cargo xtask package`) and the
# FFmpeg libraries the GPU machine lacks (dist/libs/lvlibs.tar.xz, `bash
# benchmarks/pack_ffmpeg_libs.sh`), both unpacked by benchmarks/gpu_prelude.sh.
# Together they pass the device tool's 64 MiB carry limit, so carry dist/libs in one
# call and dist/bin in the next (the machine keeps /tmp/libs while it stays warm; it
# is released after 30 s idle).
set -u
. benchmarks/gpu_prelude.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
PY=$(python3 -c "import torch" 2>/dev/null && echo python3 || echo /opt/torch/.venv/bin/python3)
for shape in "$@"; do
  case "$shape" in
    torch:*) timeout 250 $PY benchmarks/hf_reference.py --size 1.5b --text-tokens 64 --dtype bf16 ${shape#torch:} \
               2>&1 | tail -n 1 | tee -a "$OUT/log.txt" ;;
    # "profile:<bench args>": one warm-up and one timed step under CubeCL's profiler,
    # the device time of its kernels summed by name per step ($OUT/profile.txt; the
    # cuBLASLt GEMMs are not CubeCL kernels and do not appear), and the last step split
    # into its phases ($OUT/phases.txt, benchmarks/cubecl_step_phases.py).
    profile:*) echo "== profiled: ${shape#profile:}" | tee -a "$OUT/log.txt"
       rm -f /tmp/cubecl.log
       CUBECL_DEBUG_LOG=1 CUBECL_DEBUG_OPTION=profile timeout 400 /tmp/lv bench --device cuda \
         --dtype bf16 --size 1.5b --text-tokens 64 --attention flash ${shape#profile:} \
         --warmup 1 --iters 1 > "$OUT/profiled.txt" 2>&1
       python3 benchmarks/cubecl_profile.py /tmp/cubecl.log 2 > "$OUT/profile.txt"
       python3 benchmarks/cubecl_step_phases.py /tmp/cubecl.log 30 > "$OUT/phases.txt" 2>&1
       tail -n 3 "$OUT/profiled.txt" | tee -a "$OUT/log.txt"
       head -n 20 "$OUT/phases.txt" | tee -a "$OUT/log.txt" ;;
    *) echo "== $shape" | tee -a "$OUT/log.txt"
       timeout 300 /tmp/lv bench --device cuda --dtype bf16 --size 1.5b --text-tokens 64 --attention flash \
         $shape --json "$OUT/bench.jsonl" 2>&1 | grep -v "^\s*$" | tail -n 4 | tee -a "$OUT/log.txt" ;;
  esac
done
