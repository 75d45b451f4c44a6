#!/usr/bin/env bash
# Runs on the GPU machine (device tool), from the repository root: the Hopper warpgroup
# MMA building block (kernels/src/wgmma). Build and carry (both fit the 64 MiB together;
# the test binary is optional: `flash_bench --wgmma` runs the same f64 checks and prints them):
#   cargo build --release -p longview-kernels --no-default-features --features cuda --bin flash_bench
#   xz -T2 -6 -c target/release/flash_bench > dist/fb/flash_bench.xz
#   cargo test -p longview-kernels --no-default-features --features cuda --test wgmma --no-run --release
#   mkdir -p dist/wg && xz -T2 -6 -c target/release/deps/wgmma-<hash> > dist/wg/wgmma.xz
#   run: bash benchmarks/gpu_wgmma_run.sh   (carry ["dist/fb", "dist/wg"])
# Output in $OUT: wgmma_test.txt (the test binary, when carried), cublas.txt (torch's bf16
# matmul at 8192^3, cuBLASLt's rate in this call), wgmma_rate.txt (`flash_bench --wgmma`: the f64 checks of every helper, then the rate).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
unpack() { python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('$1'), open('$2','wb'))" && chmod +x "$2"; }
unpack dist/fb/flash_bench.xz /tmp/fb || { echo "carry dist/fb"; exit 1; }
PY=$(python3 -c "import torch" 2>/dev/null && echo python3 || echo /opt/torch/.venv/bin/python3)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
if [ -f dist/wg/wgmma.xz ] && unpack dist/wg/wgmma.xz /tmp/wg; then
  timeout 120 /tmp/wg --ignored --test-threads 1 --nocapture > "$OUT/wgmma_test.txt" 2>&1
  echo "wgmma test: exit $?" | tee -a "$OUT/wgmma_test.txt"
  grep -E "within|test result|panicked" "$OUT/wgmma_test.txt" | head -30
fi
timeout 120 $PY - > "$OUT/cublas.txt" 2>&1 <<'PYEOF'
import time, torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
b = torch.randn_like(a)
for _ in range(5):
    a @ b
torch.cuda.synchronize()
best = None
for _ in range(3):
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / 20
    best = dt if best is None else min(best, dt)
print(f"torch {torch.__version__} matmul bf16 8192^3: {best * 1e3:.3f} ms, {2 * 8192**3 / best / 1e12:.1f} TFLOP/s (best of 3 x 20)")
PYEOF
cat "$OUT/cublas.txt"
timeout ${WGMMA_S:-300} /tmp/fb --wgmma > "$OUT/wgmma_rate.txt" 2>&1
echo "flash_bench --wgmma: exit $?" | tee -a "$OUT/wgmma_rate.txt"
cat "$OUT/wgmma_rate.txt"
