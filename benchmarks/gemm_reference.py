#!/usr/bin/env python3
"""torch's matmul (cuBLASLt) on the 1.5B model's GEMM shapes, the same products and
timing as `longview gemm` (--iters untimed, then --iters timed, one synchronisation), and
the side-by-side table when given longview's JSON lines.

    longview gemm --device cuda --dtype bf16 --tokens 32768 --json gemm.jsonl
    python3 benchmarks/gemm_reference.py --tokens 32768 --longview gemm.jsonl
"""
import argparse
import json
import os
import time

import torch


def shapes(tokens):
    # Keep in step with crates/cli/src/gemm.rs `shapes`.
    frames = -(-tokens // 197)
    patches = frames * 729
    return [
        ("llm gate/up", tokens, 1536, 8960),
        ("llm down", tokens, 8960, 1536),
        ("llm q/o", tokens, 1536, 1536),
        ("llm k/v", tokens, 1536, 256),
        ("vision fc1", patches, 1152, 4304),
        ("vision fc2", patches, 4304, 1152),
        ("vision qkv/out", patches, 1152, 1152),
        ("projector 1", frames * 196, 4608, 1536),
    ]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--longview", help="longview gemm --json output to compare with")
    a = p.parse_args()
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
    dev = "cuda"
    ours = {}
    if a.longview and os.path.exists(a.longview):
        for line in open(a.longview):
            r = json.loads(line)
            ours[(r["layer"], r["pass"])] = r["tflops"]
    rows = []
    for name, m_rows, k, n in shapes(a.tokens):
        x = torch.randn(m_rows, k, device=dev, dtype=dtype)
        w = torch.randn(k, n, device=dev, dtype=dtype)
        dy = torch.randn(m_rows, n, device=dev, dtype=dtype)
        passes = [
            ("fwd", lambda: x @ w, m_rows, n, k),
            ("dX", lambda: dy @ w.t(), m_rows, k, n),
            ("dW", lambda: x.t() @ dy, k, n, m_rows),
        ]
        for pname, f, m, nn, kk in passes:
            warm = [f() for _ in range(a.iters)]
            torch.cuda.synchronize()
            del warm
            t0 = time.perf_counter()
            out = [f() for _ in range(a.iters)]
            torch.cuda.synchronize()
            s = (time.perf_counter() - t0) / a.iters
            del out
            tf = 2 * m * nn * kk / s / 1e12
            rows.append((name, pname, m, nn, kk, tf, ours.get((name, pname))))
    print("| layer | pass | M x N x K | torch TFLOP/s | longview TFLOP/s | ratio |")
    print("|---|---|---|---|---|---|")
    worst = None
    for name, pname, m, nn, kk, tf, lv in rows:
        ratio = lv / tf if lv else None
        if ratio is not None:
            worst = ratio if worst is None else min(worst, ratio)
        print(f"| {name} | {pname} | {m} x {nn} x {kk} | {tf:.1f} | "
              f"{'' if lv is None else f'{lv:.1f}'} | {'' if ratio is None else f'{ratio:.3f}'} |")
    if worst is not None:
        print(f"smallest ratio longview/torch: {worst:.3f}")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main()
