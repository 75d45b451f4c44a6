#!/usr/bin/env bash
# Runs on the GPU machine (device tool), from the repository root: the attention
# kernels issue's measurements in one call, torch first. Build and carry (the binary
# alone fits the device tool's 64 MiB; it needs no FFmpeg libraries):
#   cargo build --release -p longview-kernels --no-default-features --features cuda --bin flash_bench
#   mkdir -p dist/fb && xz -T0 -9 -c target/release/flash_bench > dist/fb/flash_bench.xz
#   run: bash benchmarks/gpu_flash_run.sh   (carry ["dist/fb"])
# Steps (each under a time limit, output in $OUT): the tensor-core and decode kernels
# checked against the f64 reference (bf16, f16), torch SDPA flash/cuDNN on the
# benchmark shapes (H16 8k/32k, SigLIP D72, GQA 28:4 and 12:2 at 32k), the same shapes
# on longview's kernels, then one decoding step's attention (split-key decode
# kernels against the tensor-core forward at 4k-200k cached keys).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('dist/fb/flash_bench.xz'), open('/tmp/fb','wb'))" \
  && chmod +x /tmp/fb || { echo "carry dist/fb (see the top of this script)"; exit 1; }
PY=$(python3 -c "import torch" 2>/dev/null && echo python3 || echo /opt/torch/.venv/bin/python3)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
# Each step's whole output goes to $DIR/<name>.txt ($OUT unless a step sets DIR), its
# last lines to $OUT/log.txt.
step() { name=$1; limit=$2; shift 2; echo "== $name" | tee -a "$OUT/log.txt"; start=$(date +%s)
  dir=${DIR:-$OUT}; mkdir -p "$dir"
  timeout "$limit" "$@" > "$dir/$name.txt" 2>&1; rc=$?
  tail -n 12 "$dir/$name.txt" | tee -a "$OUT/log.txt"
  echo "-- exit $rc after $(( $(date +%s) - start )) s" | tee -a "$OUT/log.txt"; }
# STEPS picks the steps (default all four), e.g. STEPS="checks decode" for the decode
# kernels' A/B alone (`flash_bench --decode` times every decode variant).
wants() { [[ " ${STEPS:-checks torch longview decode} " == *" $1 "* ]]; }
wants checks && step checks "${CHECK_S:-240}" /tmp/fb --tc-only --check-only
wants torch && step torch "${TORCH_S:-150}" $PY benchmarks/flash_reference.py
# STEPS="sweep": each setting checked against f64 first, then timed at 32k causal, with
# the registers and spill bytes the driver gave each kernel (CUBECL_CUDA_KERNEL_REGS); a
# later "longview" step runs with the setting of the fastest forward+backward. A setting
# is a `+`-joined list of VAR=VALUE: SETTINGS="CUBECL_CUDA_CPP_KERNELS=tensor_core ..."
# (`-` is the defaults, and what is swept when neither is given); TILES="fw,fk,..."
# adds LONGVIEW_FLASH_TILES settings.
BEST=""
[ -n "${LONGVIEW_FLASH_TILES:-}" ] && BEST="LONGVIEW_FLASH_TILES=$LONGVIEW_FLASH_TILES"
if wants sweep; then
  best_tf=0
  # The device tool returns a limited number of files: the sweep's per-setting outputs
  # go to one folder, packed into $OUT/sweep.tar.gz at the end.
  DIR=$OUT/sweep
  all="${SETTINGS:-}"
  for t in ${TILES:-}; do all="$all LONGVIEW_FLASH_TILES=$t"; done
  [ -n "${all// /}" ] || all="-"
  for setting in $all; do
    vars=""; [ "$setting" = - ] || vars="${setting//+/ }"
    tag=$(echo "$setting" | tr -c 'A-Za-z0-9_\n-' '_' | cut -c1-100)
    step "check-$tag" "${SWEEP_CHECK_S:-90}" env $vars /tmp/fb --tc-only --check-only
    [ "$rc" = 0 ] || { echo "setting $setting failed its checks: not timed" | tee -a "$OUT/log.txt"; continue; }
    step "sweep-$tag" "${SWEEP_S:-60}" env $vars CUBECL_CUDA_KERNEL_REGS=1 /tmp/fb --sweep
    grep -h "kernel regs" "$DIR/sweep-$tag.txt" | cut -c1-240 | sort -u | tee -a "$OUT/log.txt"
    tf=$(grep -h '^tiles ' "$DIR/sweep-$tag.txt" | awk -F'|' '{print $(NF-1)+0}')
    if awk -v a="${tf:-0}" -v b="$best_tf" 'BEGIN { exit !(a > b) }'; then best_tf=$tf; BEST=$setting; fi
  done
  echo "fastest fwd+bwd: ${BEST:-defaults} ($best_tf TFLOP/s)" | tee -a "$OUT/log.txt"
  tar -czf "$OUT/sweep.tar.gz" -C "$OUT" sweep && rm -rf "$OUT/sweep"
  unset DIR
fi
if wants longview; then
  # The fastest setting's variables, exported (a following decode step uses them too).
  if [ -n "$BEST" ] && [ "$BEST" != - ]; then export ${BEST//+/ }; fi
  echo "longview settings: ${BEST:-defaults}" | tee -a "$OUT/log.txt"
  step longview "${BENCH_S:-240}" /tmp/fb --no-checks --no-scalar
fi
wants decode && step decode "${DECODE_S:-120}" /tmp/fb --decode
exit 0
