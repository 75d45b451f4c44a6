"""Splits the last training step of a CubeCL profiler log (CUBECL_DEBUG_LOG=1
CUBECL_DEBUG_OPTION=profile, `longview bench ... --warmup 1 --iters 1`) into the
vision forward, text forward (with the head), text backward and vision backward, and
sums each phase's kernels: flash attention, copies (`into_contiguous`), the rest.
cuBLASLt GEMMs are not CubeCL kernels and appear in none.
    python3 benchmarks/cubecl_step_phases.py /tmp/cubecl.log [top]
Phases are found from the flash kernels: the vision tower's forward kernel is launched
twice a layer a step (forward and replay), the text's once; the step's first vision
kernel follows the previous step's last vision dK/dV kernel."""
import collections
import re
import sys

unit = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
seq = []
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"\| ([0-9.]+)(ns|µs|us|ms|s)\s+\| (.+)$", line.strip())
    if m:
        seq.append((m.group(3).strip()[:90], float(m.group(1)) * unit[m.group(2)]))
top = int(sys.argv[2]) if len(sys.argv) > 2 else 8
count = collections.Counter(n for n, _ in seq)
forward = sorted((n for n in count if n.startswith("FlashTcForwardKernel")), key=count.get)
dkdv = sorted((n for n in count if n.startswith("FlashTcDkdvKernel")), key=count.get)
if len(forward) < 2 or len(dkdv) < 2:
    sys.exit("expected the text's and the vision tower's flash kernels in the log")
text_fwd, vision_fwd = forward[0], forward[-1]
text_dkdv = [n for n in dkdv if count[n] == count[text_fwd]][0]
vision_dkdv = [n for n in dkdv if n != text_dkdv][0]
at = lambda name: [i for i, (n, _) in enumerate(seq) if n == name]
v_dkdv, t_fwd, t_dkdv, v_fwd = at(vision_dkdv), at(text_fwd), at(text_dkdv), at(vision_fwd)
layers_v, layers_t = len(v_dkdv) // 2, len(t_fwd) // 2
start = v_dkdv[layers_v - 1] + 1  # after the previous step's last vision dK/dV
# Boundaries: the last step's first text forward, first text dK/dV, first vision replay.
text_start = t_fwd[layers_t]
back_start = t_dkdv[layers_t]
replay = v_fwd[2 * layers_v + layers_v]
# Move each boundary back over the kernels that prepare its first layer's attention.
def back_to_previous_flash(i, floor):
    j = i - 1
    while j > floor and not seq[j][0].startswith("Flash"):
        j -= 1
    return j + 1
phases = [
    ("vision forward (stem, layers, projector)", start, back_to_previous_flash(text_start, start)),
    ("text forward and head", back_to_previous_flash(text_start, start), back_start),
    ("text backward", back_start, back_to_previous_flash(replay, back_start)),
    ("vision backward (replays)", back_to_previous_flash(replay, back_start), len(seq)),
]
whole = sum(t for _, t in seq[start:])
print(f"last step: {whole:.3f} s of CubeCL kernels in {len(seq) - start} launches "
      f"({layers_v} vision layers, {layers_t} text layers)")
print("| phase | total ms | flash ms | copies ms | other ms | launches |")
print("|---|---|---|---|---|---|")
for name, a, b in phases:
    part = seq[a:b]
    total = sum(t for _, t in part)
    flash = sum(t for n, t in part if n.startswith("Flash"))
    copies = sum(t for n, t in part if n.startswith("Copy"))
    print(f"| {name} | {total*1e3:.1f} | {flash*1e3:.1f} | {copies*1e3:.1f} | "
          f"{(total-flash-copies)*1e3:.1f} | {b - a} |")
sums, calls = collections.Counter(), collections.Counter()
for n, t in seq[start:]:
    sums[n] += t
    calls[n] += 1
print(f"\nlargest {top} kernels of the step:")
for n, t in sums.most_common(top):
    print(f"{t*1e3:9.1f} ms {calls[n]:6d} {n}")
