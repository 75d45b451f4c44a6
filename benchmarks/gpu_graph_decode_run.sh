#!/usr/bin/env bash
# Runs on the GPU machine (device tool), from the repository root, after dist/libs and
# with dist/bin carried (benchmarks/gpu_prelude.sh): the checks and timings of decoding
# with captured device graphs (`longview_infer::graph_decode`).
# 1. `infer-bench --check-graph-decode` (graph steps against eager steps, same prompt
#    and tokens) in bf16 with the eager steps on the same split-key kernel
#    (LONGVIEW_DECODE_TENSOR_CORES=0), and in f32;
# 2. `gpu_infer_run.sh` at 64 and 1024 frames with HF in the same call, each length
#    also eager (EAGER=1);
# 3. the graph at 1024 frames with more key slices (LONGVIEW_DECODE_SPLITS).
# PART=groups instead: the checks for a GRPO-like group of five over a shared prefix
# (bf16, f32), then `infer-bench --samples 5` at 256 and 1024 (FRAMES)
# frames captured and eager (LONGVIEW_DECODE_GRAPH=0), two runs each.
# PART=checks: checks only: the tensor-core kernel tests (`tensor_core` test binary,
# carried as dist/tc/tensor_core.xz, when present), the single row's graph check on the
# default kernels (the counted tensor-core slices in bf16), on the split-key kernel
# (bit-equal) and in f32, then the group checks in bf16 and f32.
# Results under $OUT (log.txt, infer.jsonl, one file per step).
set -u
. benchmarks/gpu_prelude.sh
check="/tmp/lv infer-bench --device cuda --size 1.5b --frames 64 --new-tokens 32 --check-graph-decode"
run() { name=$1; shift; echo "== $name" | tee -a "$OUT/log.txt"
  "$@" > "$OUT/$name.txt" 2>&1; echo "-- exit $?" | tee -a "$OUT/log.txt"
  tail -n 3 "$OUT/$name.txt" | tee -a "$OUT/log.txt"; }
if [ "${PART:-single}" = checks ]; then
  if [ -f dist/tc/tensor_core.xz ]; then
    python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('dist/tc/tensor_core.xz'), open('/tmp/tc','wb'))"
    chmod +x /tmp/tc
    run tensor-core-tests timeout 300 /tmp/tc --ignored --test-threads 1
  fi
  run check-bf16 timeout 120 $check --dtype bf16
  run check-bf16-split env LONGVIEW_DECODE_TENSOR_CORES=0 timeout 120 $check --dtype bf16
  run check-f32 timeout 120 $check --dtype f32
  run check-group5-bf16 timeout 120 $check --dtype bf16 --samples 5
  run check-group5-f32 timeout 120 $check --dtype f32 --samples 5
  exit 0
fi
if [ "${PART:-single}" = groups ]; then
  run check-group5-bf16 timeout 200 $check --dtype bf16 --samples 5
  run check-group5-f32 timeout 200 $check --dtype f32 --samples 5
  lv="/tmp/lv infer-bench --device cuda --dtype bf16 --size 1.5b --new-tokens 64 --samples 5 --runs 2 --json $OUT/infer.jsonl"
  for f in ${FRAMES:-256 1024}; do
    run "group5-$f" timeout 200 $lv --frames $f
    run "group5-$f-eager" env LONGVIEW_DECODE_GRAPH=0 timeout 200 $lv --frames $f
  done
  exit 0
fi
run check-bf16-split env LONGVIEW_DECODE_TENSOR_CORES=0 timeout 120 $check --dtype bf16
run check-f32 timeout 200 $check --dtype f32
EAGER=1 RUNS=2 LONG=0 bash benchmarks/gpu_infer_run.sh 64 1024
for s in ${SPLITS:-264 528}; do
  run "longview-1024-splits$s" env LONGVIEW_DECODE_SPLITS=$s timeout 200 /tmp/lv infer-bench \
    --device cuda --dtype bf16 --size 1.5b --new-tokens 64 --frames 1024 --runs 2 \
    --json "$OUT/infer.jsonl"
done
