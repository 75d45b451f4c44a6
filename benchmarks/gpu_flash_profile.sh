#!/usr/bin/env bash
# Runs on the GPU machine (device tool), from the repository root: Nsight Compute
# profiles of the tensor-core attention kernels at B1 H16 S32768 D128 causal bf16
# (`flash_bench --sweep`), one launch of each kernel named in KERNELS (regexes of
# the kernel names, default "dkdv tc_forward"). Carry dist/fb (as gpu_flash_run.sh).
# Per kernel, in $OUT: <k>_sass.csv.gz (every SASS instruction with its executed count
# and stall samples); the summaries (throughput, occupancy, warp stalls, instruction
# mix: <k>_summary.txt) and ncu's own output go into one $OUT/profile_details.tar.gz
# (the device tool returns a limited number of files). Extra environment (tile or
# backend settings) is passed through. Read the tables with benchmarks/sass_summary.py.
# FB_ARGS (default --sweep) picks what flash_bench runs, NCU_ARGS adds ncu options; the
# experimental wgmma forward's first timed 32k causal launch (after its 5 checks and one
# untimed call):
#   KERNELS=^forward_kernel FB_ARGS=--wgmma NCU_ARGS="--launch-skip 6" bash benchmarks/gpu_flash_profile.sh
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('dist/fb/flash_bench.xz'), open('/tmp/fb','wb'))" \
  && chmod +x /tmp/fb || { echo "carry dist/fb"; exit 1; }
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
DETAIL=$OUT/profile_details; mkdir -p "$DETAIL"
for k in ${KERNELS:-dkdv tc_forward}; do
  name=$(echo "$k" | tr -cd 'A-Za-z0-9_')
  rep=/tmp/prof_$name
  # shellcheck disable=SC2086
  timeout "${PROFILE_S:-150}" "$NCU" -f -k "regex:$k" -c 1 ${NCU_ARGS:-} --set full --import-source no \
    -o "$rep" /tmp/fb ${FB_ARGS:---sweep} > "$DETAIL/${name}_run.txt" 2>&1
  echo "profile $k: exit $?" | tee -a "$OUT/log.txt"
  "$NCU" -i "$rep.ncu-rep" --page details --print-details all > "$DETAIL/${name}_summary.txt" 2>&1
  "$NCU" -i "$rep.ncu-rep" --page source --print-source sass --csv 2>&1 | gzip > "$OUT/${name}_sass.csv.gz"
  grep -E "Duration|Executed Instructions  |Registers Per|Warp Cycles Per Issued" "$DETAIL/${name}_summary.txt" | sort -u | tee -a "$OUT/log.txt"
done
tar -czf "$OUT/profile_details.tar.gz" -C "$OUT" profile_details && rm -rf "$DETAIL"
