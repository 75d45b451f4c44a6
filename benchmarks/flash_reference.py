#!/usr/bin/env python3
"""torch scaled_dot_product_attention on the shapes of `cargo bench -p longview-kernels
--bin flash_bench` (bf16, [B, H, S, D]), flash and cuDNN backends, forward and
forward+backward, TFLOP/s with FlashAttention's convention (forward 4 B H S^2 D, halved
when causal; backward 2.5x the forward). Run on the GPU machine:

    python3 benchmarks/flash_reference.py [--quick] [--128k]
"""
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def bench(name, b, h, s, d, causal, backend, reps):
    torch.manual_seed(0)
    mk = lambda: (torch.rand(b, h, s, d, device="cuda", dtype=torch.bfloat16) * 2 - 1).requires_grad_()
    q, k, v = mk(), mk(), mk()
    g = torch.rand(b, h, s, d, device="cuda", dtype=torch.bfloat16) * 2 - 1
    flops = 4 * b * h * s * s * d / (2 if causal else 1)
    with sdpa_kernel([backend]):
        try:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            o.backward(g)
        except RuntimeError as e:
            print(f"| {name} | B{b} H{h} S{s} D{d} | {'causal' if causal else 'full'} | {backend.name} | unavailable: {str(e)[:60]} |")
            return
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        torch.cuda.synchronize()
        fwd = (time.perf_counter() - t) / reps
        t = time.perf_counter()
        for _ in range(reps):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            o.backward(g)
        torch.cuda.synchronize()
        both = (time.perf_counter() - t) / reps
    print(f"| {name} | B{b} H{h} S{s} D{d} | {'causal' if causal else 'full'} | {backend.name} | "
          f"{fwd*1e3:.1f} ms | {flops/fwd/1e12:.1f} | {both*1e3:.1f} ms | {3.5*flops/both/1e12:.1f} |", flush=True)


def main():
    quick = "--quick" in sys.argv
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    print("| scenario | shape | mask | backend | fwd | fwd TFLOP/s | fwd+bwd | fwd+bwd TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for s in ([8192] if quick else [8192, 32768]):
        for causal in (True, False):
            for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
                bench("LLM", 1, 16, s, 128, causal, backend, 10)
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        bench("SigLIP (16 frames)", 16, 16, 729, 72, False, backend, 10)
    if "--128k" in sys.argv:
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            bench("LLM", 1, 16, 131072, 128, True, backend, 2)


if __name__ == "__main__":
    main()
