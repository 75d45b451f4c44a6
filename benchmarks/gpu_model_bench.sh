#!/usr/bin/env bash
# Runs on the GPU machine (device tool), from the repository root, with the packaged
# binary (`cargo xtask package`: dist/bin) and the FFmpeg libraries (dist/libs) carried
# as benchmarks/gpu_prelude.sh says. Prints longview's forward+backward
# throughput next to PyTorch + transformers on the same shapes, same GPU, same call.
#   bash benchmarks/gpu_model_bench.sh "--size debug --frames 8" "--size 1.5b --frames 8"
set -u
. benchmarks/gpu_prelude.sh
bin=/tmp/lv
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
for shape in "$@"; do
  echo "== $shape" | tee -a "$OUT/log.txt"
  timeout 280 $bin bench --device cuda --dtype bf16 $shape --text-tokens 64 --warmup 2 --iters 5 \
    --json "$OUT/bench.jsonl" 2>&1 | grep -v "^\s*$" | tail -n 4 | tee -a "$OUT/log.txt"
  timeout 200 python3 benchmarks/hf_reference.py $shape --text-tokens 64 --dtype bf16 --attn sdpa 2>&1 | tail -n 2 | tee -a "$OUT/log.txt"
  timeout 200 python3 benchmarks/hf_reference.py $shape --text-tokens 64 --dtype bf16 --attn eager 2>&1 | tail -n 2 | tee -a "$OUT/log.txt"
done
