#!/usr/bin/env bash
# Runs on the GPU machine (device tool), from the repository root, with the packaged
# binary carried in dist/ (`cargo xtask package`). Prints longview's forward+backward
# throughput next to PyTorch + transformers on the same shapes, same GPU, same call.
#   bash benchmarks/gpu_model_bench.sh "--size debug --frames 8" "--size 1.5b --frames 8"
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
bin=/tmp/longview
python3 -c "import lzma; open('$bin','wb').write(lzma.open('dist/longview-cuda.xz').read())" && chmod +x $bin
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
for shape in "$@"; do
  echo "== $shape" | tee -a "$OUT/log.txt"
  timeout 280 $bin bench --device cuda --dtype bf16 $shape --text-tokens 64 --warmup 2 --iters 5 \
    --json "$OUT/bench.jsonl" 2>&1 | grep -v "^\s*$" | tail -n 4 | tee -a "$OUT/log.txt"
  timeout 200 python3 benchmarks/hf_reference.py $shape --text-tokens 64 --dtype bf16 --attn sdpa 2>&1 | tail -n 2 | tee -a "$OUT/log.txt"
  timeout 200 python3 benchmarks/hf_reference.py $shape --text-tokens 64 --dtype bf16 --attn eager 2>&1 | tail -n 2 | tee -a "$OUT/log.txt"
done
