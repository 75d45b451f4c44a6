#!/usr/bin/env bash
# Runs on the GPU machine (device tool), from the repository root: `longview train`
# with benchmarks/train_h200_1.5b.toml (the 1.5B shape, bf16 compute with f32 master
# weights and AdamW, attention-aware recomputation, flash attention) once per frame
# count given, e.g. `bash benchmarks/gpu_train_run.sh 162 490` (LIMIT_S: seconds a run
# may take, default 280; STEPS overrides run.steps). Each run's console
# output and metrics.jsonl land in $OUT; its checkpoint is deleted afterwards (the
# disk holds about two).
# Carry the binary (dist/bin/longview-cuda.xz) and the FFmpeg libraries the GPU image
# lacks (dist/libs/lvlibs.tar.xz, benchmarks/pack_ffmpeg_libs.sh): together they pass
# the device tool's 64 MiB carry limit, so carry dist/libs in one call (this script
# unpacks it to /tmp/libs and exits when no binary came along) and dist/bin in the next.
# TORCH=1: after each run, PyTorch + transformers' training step at the same shape in the
# same call (`benchmarks/hf_reference.py --adamw --checkpointing`: f32 weights under bf16
# autocast, SDPA, per-layer recompute, clipping, fused AdamW; 1 warm-up and 3 timed
# steps), the reference for `train_step_1.5b_*`.
# PHASES=1: `--phase-timings` (each step's parts between device syncs: master-weight
# cast, forward+backward, gradient cast, clipping, update), printed a step a line; the
# syncs slow the steps slightly, so time the rate in a run without it.
set -u
. benchmarks/gpu_prelude.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
limit=${LIMIT_S:-280}
for frames in "$@"; do
  run=/tmp/run-$frames
  rm -rf "$run"
  echo "== frames $frames" | tee -a "$OUT/log.txt"
  start=$(date +%s)
  timeout "$limit" /tmp/lv train --config benchmarks/train_h200_1.5b.toml --device cuda \
    --dtype bf16 --frames "$frames" ${STEPS:+--steps $STEPS} --out "$run" --no-progress \
    $([ "${PHASES:-0}" = 1 ] && echo --phase-timings) \
    > "$OUT/train-$frames.txt" 2>&1
  echo "exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/log.txt"
  tail -n 12 "$OUT/train-$frames.txt" | tee -a "$OUT/log.txt"
  cp "$run/metrics.jsonl" "$OUT/metrics-$frames.jsonl" 2>/dev/null
  # PHASES=1: each step's parts (--phase-timings), one line a step.
  if [ "${PHASES:-0}" = 1 ]; then
    python3 -c "
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line); p = r.get('phases') or {}
    print('step', r['step'], 'step_s', round(r['step_s'], 3), {k: round(v, 3) for k, v in p.items()})
" "$run/metrics.jsonl" | tee -a "$OUT/log.txt"
  fi
  du -sh "$run"/checkpoints/* 2>/dev/null | tee -a "$OUT/log.txt"
  rm -rf "$run"
  if [ "${TORCH:-0}" = 1 ]; then
    PY=$(python3 -c "import torch" 2>/dev/null && echo python3 || echo /opt/torch/.venv/bin/python3)
    echo "== torch, frames $frames" | tee -a "$OUT/log.txt"
    timeout 250 $PY benchmarks/hf_reference.py --size 1.5b --text-tokens 64 --dtype bf16 --frames "$frames" \
      --attn sdpa --checkpointing --adamw --warmup 1 --iters 3 2>&1 | tail -n 1 | tee -a "$OUT/log.txt"
  fi
done
