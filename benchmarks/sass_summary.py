"""Summarises a per-instruction SASS table from Nsight Compute
(`<kernel>_sass.csv.gz`, written by benchmarks/gpu_flash_profile.sh).

    python3 benchmarks/sass_summary.py opcodes FILE      executed instructions and
                                                          stall samples by opcode
    python3 benchmarks/sass_summary.py stalls FILE [N]    stall reasons overall, by
                                                          opcode, and the N hottest
                                                          instructions
    python3 benchmarks/sass_summary.py phases FILE [W]    stall and instruction shares
                                                          of each W-instruction window
                                                          (where in the kernel the time goes)
"""
import collections
import csv
import gzip
import re
import sys


def load(path):
    rows = list(csv.reader(gzip.open(path, "rt")))
    header, data = rows[1], [r for r in rows[2:] if len(r) > 3]
    col = {name: header.index(name) for name in header}
    return header, data, col


def opcode(source, detailed=False):
    m = re.match(r"(@!?U?P\w+\s+)?([A-Z0-9_]+)(\.[A-Z0-9_.]+)?", source.strip())
    if not m:
        return "?"
    if detailed and m.group(2) in ("LDSM", "HMMA", "LDS", "STS", "LDG", "STG", "MUFU"):
        return m.group(2) + (m.group(3) or "")
    return m.group(2)


def num(row, i):
    return int(row[i] or 0)


def main():
    if len(sys.argv) < 3 or sys.argv[1] not in ("opcodes", "stalls", "phases"):
        sys.exit(__doc__)
    mode, path = sys.argv[1], sys.argv[2]
    header, data, col = load(path)
    src, executed = col["Source"], col["Instructions Executed"]
    samples = col["Warp Stall Sampling (All Samples)"]
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    total_exec = sum(num(r, executed) for r in data)
    total_samples = max(sum(num(r, samples) for r in data), 1)
    if mode == "opcodes":
        ops, stalls = collections.Counter(), collections.Counter()
        for r in data:
            op = opcode(r[src], detailed=True)
            ops[op] += num(r, executed)
            stalls[op] += num(r, samples)
        print(f"executed {total_exec / 1e9:.2f}G warp instructions")
        for op, n in ops.most_common(30):
            print(f"{op:28s} {n / 1e6:9.1f}M {100 * n / total_exec:5.1f}%"
                  f"  stall samples {100 * stalls[op] / total_samples:5.1f}%")
    elif mode == "stalls":
        overall = collections.Counter()
        by_op = collections.defaultdict(collections.Counter)
        for r in data:
            op = opcode(r[src])
            for h in reasons:
                overall[h] += num(r, col[h])
                by_op[op][h] += num(r, col[h])
        whole = max(sum(overall.values()), 1)
        print("reasons: " + ", ".join(f"{k[6:]} {100 * v / whole:.1f}%" for k, v in overall.most_common(10)))
        for op, c in sorted(by_op.items(), key=lambda kv: -sum(kv[1].values()))[:12]:
            print(f"{op:6s} {100 * sum(c.values()) / whole:5.1f}%: "
                  + ", ".join(f"{k[6:]} {100 * v / whole:.1f}" for k, v in c.most_common(3)))
        hottest = sorted(range(len(data)), key=lambda i: -num(data[i], samples))
        for i in hottest[: int(sys.argv[3]) if len(sys.argv) > 3 else 20]:
            r = data[i]
            print(f"{i:5d} {100 * num(r, samples) / total_samples:5.2f}%"
                  f" exec {num(r, executed) / 1e6:7.1f}M  {r[src].strip()[:70]}")
    elif mode == "phases":
        width = int(sys.argv[3]) if len(sys.argv) > 3 else 50
        for start in range(0, len(data), width):
            window = data[start:start + width]
            st = sum(num(r, samples) for r in window)
            ex = sum(num(r, executed) for r in window)
            if st / total_samples < 0.005 and ex / max(total_exec, 1) < 0.005:
                continue
            ops = collections.Counter()
            for r in window:
                ops[opcode(r[src])] += num(r, executed)
            print(f"{start:5d}-{start + width:5d} stall {100 * st / total_samples:5.1f}%"
                  f" exec {100 * ex / max(total_exec, 1):5.1f}%  "
                  + " ".join(f"{k}:{v * 100 // max(ex, 1)}" for k, v in ops.most_common(5)))


if __name__ == "__main__":
    main()
