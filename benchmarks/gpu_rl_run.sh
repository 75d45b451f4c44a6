#!/usr/bin/env bash
# Runs on the GPU machine (device tool, nvidia-h200), from the repository root: issue
# 21's benchmark, one GRPO step of the 1.5B shape (G = 5) on generated needle videos
# with the video's visual tokens cached across rollouts and log-prob passes, against
# the same binary re-encoding the video in every pass (grpo.reencode_video), at the
# frame counts given (default 256 512). One prompt a step and 128 response tokens
# keep a step inside the call's time; every other setting is configs/1.5b-grpo.toml's.
#   bash benchmarks/gpu_rl_run.sh [frames ...]     (STEPS=2 steps a run, LIMIT=280 s a run)
#   MODES=cached / MODES=reencode: one side per device call, when both do not fit in
#   one call's 600 s (512 frames: ~100k prompt tokens a rollout).
#   DECODE_AB=1 also runs `infer-bench --samples 5` at each frame count in the same
#   call (the group of five decoded over one prefill, as a rollout decodes), to compare
#   its decode rate with the rollout's `decode_tokens_per_s` (first run 2026-12-06 at
#   256 frames: the warm rollout at 0.77x, benchmarks/grpo.md).
# Carry dist/libs then dist/bin (benchmarks/gpu_prelude.sh). Results: $OUT/log.txt,
# $OUT/<run>.txt (console) and $OUT/metrics-<run>.jsonl (rollout_s, update_s, ...).
set -u
. benchmarks/gpu_prelude.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
for frames in "${@:-256 512}"; do
  for f in $frames; do
    if [ "${DECODE_AB:-0}" = 1 ]; then
      echo "== infer-bench-$f-g5" | tee -a "$OUT/log.txt"
      timeout ${LIMIT:-280} /tmp/lv infer-bench --device cuda --dtype bf16 --size 1.5b --frames "$f" \
        --samples 5 --new-tokens 128 --runs 2 --json "$OUT/infer.jsonl" > "$OUT/infer-bench-$f-g5.txt" 2>&1
      echo "-- exit $?" | tee -a "$OUT/log.txt"
      grep "^| " "$OUT/infer-bench-$f-g5.txt" | tail -n 1 | tee -a "$OUT/log.txt"
    fi
    for mode in ${MODES:-cached reencode}; do
      cfg=/tmp/rl-$mode.toml
      sed -e 's/^batch_size = .*/batch_size = 1/' -e 's/^max_response_tokens = .*/max_response_tokens = 128/' \
        -e 's/^minibatches = .*/minibatches = 1/' -e 's/^eval_per_depth = .*/eval_per_depth = 0/' \
        -e "s/^frames = .*/frames = $f/" -e "s/^min_frames = .*/min_frames = $f/" \
        configs/1.5b-grpo.toml > "$cfg"
      [ "$mode" = reencode ] && printf '\n# benchmark: the video encoded again in every pass\n' >> "$cfg" \
        && sed -i 's/^\[grpo\]/[grpo]\nreencode_video = true/' "$cfg"
      name=rl-$mode-$f
      echo "== $name" | tee -a "$OUT/log.txt"; start=$(date +%s)
      timeout ${LIMIT:-280} /tmp/lv train --config "$cfg" --device cuda --dtype bf16 --frames "$f" --steps ${STEPS:-2} \
        --out "/tmp/$name" --fresh --no-progress > "$OUT/$name.txt" 2>&1
      echo "-- exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/log.txt"
      grep -E "step [0-9]+/|memory|summary|time" "$OUT/$name.txt" | tail -n 6 | tee -a "$OUT/log.txt"
      cp "/tmp/$name/metrics.jsonl" "$OUT/metrics-$name.jsonl" 2>/dev/null
      rm -rf "/tmp/$name/checkpoints"
    done
  done
done
