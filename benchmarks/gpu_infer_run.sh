#!/usr/bin/env bash
# Runs on the GPU machine (device tool, nvidia-h200), from the repository root: the
# inference targets of issue 17 in one call. `longview infer-bench` (the 1.5B shape,
# bf16, generated frames) beside `benchmarks/hf_infer_reference.py` (transformers,
# SDPA, the same phases) at growing frame counts, then an hour of video (3600 frames)
# with the token budgets (per frame: --token-pool 8 = 64 tokens; over time:
# --temporal-pool 8).
#   bash benchmarks/gpu_infer_run.sh [frame counts, default: 64 256 1024; "" for none]
#   LONG=0 ... skips the 3600-frame steps; LONG=only runs just them; CHUNKS="8192"
#   also times longview with those prefill chunks; RUNS=N (default 2) runs each side's
#   request N times, the first cold (longview compiles kernels and tunes cuBLASLt then);
#   PROFILE=1 adds a profiled run (below); SAMPLES="5" also times G sampled answers
#   decoded as one batch over the one prefill (what a GRPO rollout decodes); UNFUSED=1
#   also runs longview with its fused kernels off (LONGVIEW_FUSED=off); DECODE_TC=1
#   also decodes on the split-key kernel (LONGVIEW_DECODE_TENSOR_CORES=0); EAGER=1
#   also decodes without device graphs (LONGVIEW_DECODE_GRAPH=0); CHECK=1 first runs
#   `infer-bench --check-graph-decode` (graph against eager logits) at 64 frames.
#   NOBUDGET=1 (with LONG=1 or only) also asks about 3600 frames without a token budget
#   (NOBUDGET_S limits it, default 420 s; HF_LONG_S limits HF's, default 120 s).
#   SHIFTED=1 also runs each request with LONGVIEW_FLASH_WGMMA_SHIFTED=0 (the prefill
#   chunks' attention on the `mma.sync` forward instead of the wgmma one, the default
#   since session 34), the switch's effect in the same call.
# Carry dist/libs then dist/bin (benchmarks/gpu_prelude.sh). Results: $OUT/infer.jsonl
# (longview), $OUT/log.txt (both), one file per step.
set -u
. benchmarks/gpu_prelude.sh
PY=$(python3 -c "import torch" 2>/dev/null && echo python3 || echo /opt/torch/.venv/bin/python3)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
step() { name=$1; shift; echo "== $name" | tee -a "$OUT/log.txt"; start=$(date +%s)
  "$@" > "$OUT/$name.txt" 2>&1; rc=$?
  tail -n 6 "$OUT/$name.txt" | tee -a "$OUT/log.txt"
  echo "-- exit $rc after $(( $(date +%s) - start )) s" | tee -a "$OUT/log.txt"; }
lv="/tmp/lv infer-bench --device cuda --dtype bf16 --size 1.5b --new-tokens 64 --json $OUT/infer.jsonl"
if [ "${CHECK:-0}" = 1 ]; then
  step "check-graph-decode" timeout 200 /tmp/lv infer-bench --device cuda --dtype bf16 --size 1.5b \
    --frames 64 --new-tokens 32 --check-graph-decode
fi
if [ "${LONG:-1}" != only ]; then
  # No arguments: the default lengths; an empty argument ("") runs none of them
  # (PROFILE=1 alone).
  for frames in "${@-64 256 1024}"; do
    for f in $frames; do
      step "longview-$f" timeout 300 $lv --frames "$f" --runs "${RUNS:-2}"
      # CHUNKS="8192 ...": the same with other prefill chunks (2048 is the default).
      for c in ${CHUNKS:-}; do
        step "longview-$f-chunk$c" timeout 240 $lv --frames "$f" --prefill-chunk "$c"
      done
      # SHIFTED=1: the same request with the prefill chunks' causal attention (queries
      # after their cached keys) on the mma.sync forward, the wgmma one's effect in the
      # same call.
      if [ "${SHIFTED:-0}" = 1 ]; then
        step "longview-$f-mma-sync-prefill" env LONGVIEW_FLASH_WGMMA_SHIFTED=0 timeout 300 $lv --frames "$f" --runs "${RUNS:-2}"
      fi
      # UNFUSED=1: the same request with the fused kernels off (LONGVIEW_FUSED=off),
      # their effect in the same call.
      if [ "${UNFUSED:-0}" = 1 ]; then
        step "longview-$f-unfused" env LONGVIEW_FUSED=off timeout 300 $lv --frames "$f" --runs 2
      fi
      # SAMPLES="5": G answers sampled over the one prefill and decoded as one batch
      # (a GRPO rollout's decode: top-p 0.99, temperature 1), warm second run.
      for g in ${SAMPLES:-}; do
        step "longview-$f-g$g" timeout 300 $lv --frames "$f" --samples "$g" --runs 2
      done
      # EAGER=1: the same request decoded without device graphs
      # (LONGVIEW_DECODE_GRAPH=0: every step's operations launched one by one), their
      # effect in the same call.
      if [ "${EAGER:-0}" = 1 ]; then
        step "longview-$f-eager" env LONGVIEW_DECODE_GRAPH=0 timeout 300 $lv --frames "$f" --runs "${RUNS:-2}"
      fi
      # DECODE_TC=1: the decoding steps once more on the split-key kernel
      # (LONGVIEW_DECODE_TENSOR_CORES=0), one answer and the SAMPLES groups, their
      # effect in the same call (by default a step whose query heads fold into its kv
      # heads' rows decodes on the tensor cores with the keys sliced into the batch).
      if [ "${DECODE_TC:-0}" = 1 ]; then
        step "longview-$f-decode-split" env LONGVIEW_DECODE_TENSOR_CORES=0 timeout 300 $lv --frames "$f" --runs 2
        for g in ${SAMPLES:-}; do
          step "longview-$f-g$g-decode-split" env LONGVIEW_DECODE_TENSOR_CORES=0 timeout 300 $lv --frames "$f" --samples "$g" --runs 2
        done
      fi
      step "hf-$f" timeout 300 $PY benchmarks/hf_infer_reference.py --size 1.5b --frames "$f" --new-tokens 64 --runs "${RUNS:-2}"
    done
  done
fi
# PROFILE=1: 64 frames and 64 tokens once more under CubeCL's profiler (every kernel
# timed; cuBLASLt GEMMs are not CubeCL kernels and do not appear): the kernels by
# name, and launches per decoded token (prefill's few chunks included), in
# $OUT/profile.txt.
if [ "${PROFILE:-0}" = 1 ]; then
  rm -f /tmp/cubecl.log
  CUBECL_DEBUG_LOG=1 CUBECL_DEBUG_OPTION=profile step "longview-64-profiled" timeout 200 \
    $lv --frames 64 --runs 1
  python3 benchmarks/cubecl_profile.py /tmp/cubecl.log 64 | tee "$OUT/profile.txt"
fi
# LONG=0 skips the hour of video; LONG=only runs nothing else.
[ "${LONG:-1}" = 0 ] && exit 0
step "longview-3600-pool8" timeout 400 $lv --frames 3600 --token-pool 8
step "longview-3600-pool8-t8" timeout 200 $lv --frames 3600 --token-pool 8 --temporal-pool 8
# NOBUDGET=1: longview's hour of video without a token budget too (3600 frames x 196
# tokens, ~706k prompt tokens), the longest prompt issue 17 asks about.
if [ "${NOBUDGET:-0}" = 1 ]; then
  step "longview-3600-pool-none" timeout "${NOBUDGET_S:-420}" $lv --frames 3600
fi
step "hf-3600-pool-none" timeout "${HF_LONG_S:-120}" $PY benchmarks/hf_infer_reference.py --size 1.5b --frames 3600 --new-tokens 64
