#!/usr/bin/env bash
# Runs on a multi-GPU machine (device tool kind nvidia-h200-x4), from the repository
# root: the NCCL training path of issue 20, one process per GPU started by
# `longview train --nproc N` itself (no cargo or torchrun needed). The binary must be
# built with NCCL: `cargo build --release -p longview-cli --features nccl`, then
# `xz -T0 -1 -c target/release/longview > dist/bin/longview-cuda.xz`; carry dist/libs
# in one call and dist/bin in the next (benchmarks/gpu_prelude.sh).
#   bash benchmarks/gpu_multi_run.sh curves      # 10 debug steps: 1 GPU, 1x1 NCCL, SP4, DP2xSP2 (and sharded moments)
#   bash benchmarks/gpu_multi_run.sh 1.5b 650 1300   # the 1.5B shape on SP4 at ~128k / ~256k tokens
#   SCHEME=2d:2 SHARD=1 bash benchmarks/gpu_multi_run.sh 1.5b 650   # 2D attention, sharded moments
#   bash benchmarks/gpu_multi_run.sh infer   # 3600 frames asked about on all GPUs (SP inference)
# Outputs (console, metrics.jsonl) land in $OUT.
set -u
. benchmarks/gpu_prelude.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
gpus=$(nvidia-smi -L | wc -l)
run() { name=$1; shift; echo "== $name" | tee -a "$OUT/log.txt"; start=$(date +%s)
  "$@" > "$OUT/$name.txt" 2>&1; rc=$?
  echo "-- exit $rc after $(( $(date +%s) - start )) s" | tee -a "$OUT/log.txt"
  tail -n 14 "$OUT/$name.txt" | tee -a "$OUT/log.txt"; }
what=${1:-curves}; shift || true
if [ "$what" = curves ]; then
  # The same 10 steps of the debug run from the same seed: one GPU (no NCCL), a world
  # of one NCCL rank (the whole process path on one GPU), SP4 and DP2xSP2.
  common="--device cuda --dtype bf16 --steps 10 --no-progress --fresh"
  # The same run with AdamW's moments sharded over the ranks (run.shard_optimizer):
  # the default run's config plus that key.
  sed 's/^\[run\]/[run]\nshard_optimizer = true/' configs/debug-haystack.toml > /tmp/zero.toml
  run single timeout 300 /tmp/lv train $common --out /tmp/c-single
  run nccl1x1 timeout 300 /tmp/lv train $common --out /tmp/c-1x1 --parallel 1x1 --nproc 1
  run zero1x1 timeout 300 /tmp/lv train $common --config /tmp/zero.toml --out /tmp/c-zero1x1 --parallel 1x1 --nproc 1
  if [ "$gpus" -ge 4 ]; then
    run sp4 timeout 300 /tmp/lv train $common --out /tmp/c-sp4 --parallel 1x4 --nproc 4
    run dp2sp2 timeout 300 /tmp/lv train $common --out /tmp/c-dp2sp2 --parallel 2x2 --nproc 4
    run zero2x2 timeout 300 /tmp/lv train $common --config /tmp/zero.toml --out /tmp/c-zero2x2 --parallel 2x2 --nproc 4
    ls /tmp/c-zero2x2/checkpoints/step-000010 | tee -a "$OUT/log.txt"
  fi
  for r in single 1x1 zero1x1 sp4 dp2sp2 zero2x2; do cp /tmp/c-$r/metrics.jsonl "$OUT/metrics-$r.jsonl" 2>/dev/null; done
  python3 - "$OUT" <<'PY' | tee -a "$OUT/log.txt"
import json, os, sys
out = sys.argv[1]
def losses(name):
    path = os.path.join(out, f"metrics-{name}.jsonl")
    if not os.path.exists(path):
        return None
    return [json.loads(l)["loss"] for l in open(path) if '"loss"' in l]
ref = losses("single")
for name in ("1x1", "zero1x1", "sp4", "dp2sp2", "zero2x2"):
    got = losses(name)
    if ref is None or got is None:
        print(f"{name}: missing"); continue
    worst = max(abs(a - b) / max(abs(a), 1e-6) for a, b in zip(ref, got))
    print(f"{name}: {len(got)} steps, worst relative loss difference to one GPU {worst:.2e}")
    print("  one GPU:", " ".join(f"{x:.4f}" for x in ref))
    print(f"  {name}:", " ".join(f"{x:.4f}" for x in got))
PY
elif [ "$what" = infer ]; then
  # An hour of video (3600 frames, 709k prompt tokens unpooled) asked about on all
  # the GPUs: frames encoded in shares, zigzag-ring (or SCHEME) prefill, greedy
  # decoding against the sharded KV cache; then the same with 64 tokens a frame.
  lv="/tmp/lv infer-bench --device cuda --dtype bf16 --size 1.5b --new-tokens 64 --json $OUT/infer-sp.jsonl"
  sp="--nproc $gpus --parallel $gpus --sp-scheme ${SCHEME:-ring}"
  run "infer-sp$gpus-3600" timeout 500 $lv $sp --frames 3600
  run "infer-sp$gpus-3600-pool8" timeout 300 $lv $sp --frames 3600 --token-pool 8
elif [ "$what" = 1.5b ]; then
  # SCHEME=ulysses or SCHEME=2d:2 runs the LLM's attention on that scheme
  # (run.sp_scheme; the 1.5B's 12 q / 2 kv heads allow Ulysses degree 2 only, so 2d:2
  # on 4 GPUs); SHARD=1 shards AdamW's moments (run.shard_optimizer).
  cfg=/tmp/train_1.5b.toml; cp benchmarks/train_h200_1.5b.toml "$cfg"
  [ -n "${SCHEME:-}" ] && sed -i "s/^\[run\]/[run]\nsp_scheme = \"$SCHEME\"/" "$cfg"
  [ "${SHARD:-0}" = 1 ] && sed -i 's/^\[run\]/[run]\nshard_optimizer = true/' "$cfg"
  for frames in "$@"; do
    run "sp4-$frames${SCHEME:+-$SCHEME}" timeout 580 /tmp/lv train --config "$cfg" \
      --device cuda --dtype bf16 --frames "$frames" --steps ${STEPS:-3} --out "/tmp/sp4-$frames" \
      --no-progress --fresh --parallel 1x4 --nproc 4
    cp "/tmp/sp4-$frames/metrics.jsonl" "$OUT/metrics-sp4-$frames${SCHEME:+-$SCHEME}.jsonl" 2>/dev/null
    rm -rf "/tmp/sp4-$frames/checkpoints"
  done
fi
