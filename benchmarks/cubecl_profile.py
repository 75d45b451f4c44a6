"""Sums CubeCL's profiler log (CUBECL_DEBUG_LOG=1 CUBECL_DEBUG_OPTION=profile) by
kernel name: total device seconds, share and launches of the 40 largest.
    python3 benchmarks/cubecl_profile.py /tmp/cubecl.log [launch divisor]
The divisor (e.g. the decoded token count) also prints launches per unit."""
import collections
import re
import sys

total, count = collections.Counter(), collections.Counter()
unit = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"\| ([0-9.]+)(ns|µs|us|ms|s)\s+\| (.+)$", line.strip())
    if m:
        name = m.group(3).strip()[:100]
        total[name] += float(m.group(1)) * unit[m.group(2)]
        count[name] += 1
whole = sum(total.values())
launches = sum(count.values())
print(f"CubeCL kernels: {whole:.3f} s in {launches} launches, {len(total)} names")
if len(sys.argv) > 2:
    per = float(sys.argv[2])
    print(f"per unit ({per:g}): {launches / per:.0f} launches, {whole / per * 1e3:.2f} ms of kernels")
for name, seconds in total.most_common(40):
    print(f"{seconds:8.3f} s {100 * seconds / max(whole, 1e-12):5.1f}% {count[name]:7d} {name}")
