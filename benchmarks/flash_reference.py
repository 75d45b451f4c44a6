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


def bench(name, b, h, s, d, causal, backend, reps, hkv=None):
    """`hkv` < h: grouped-query attention through SDPA's `enable_gqa` (k, v keep hkv
    heads, as in longview's kernels); if a backend refuses it, k and v are expanded to
    h heads first (what transformers does without `enable_gqa`) and the row says so."""
    torch.manual_seed(0)
    hkv = hkv or h
    mk = lambda heads: (torch.rand(b, heads, s, d, device="cuda", dtype=torch.bfloat16) * 2 - 1).requires_grad_()
    q, k, v = mk(h), mk(hkv), mk(hkv)
    g = torch.rand(b, h, s, d, device="cuda", dtype=torch.bfloat16) * 2 - 1
    flops = 4 * b * h * s * s * d / (2 if causal else 1)
    heads = f"H{h}" if hkv == h else f"H{h}:{hkv}"
    gqa = {"enable_gqa": True} if hkv != h else {}
    attend = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, **gqa)
    label = backend.name
    with sdpa_kernel([backend]):
        try:
            o = attend()
            o.backward(g)
        except RuntimeError as e:
            if not gqa:
                print(f"| {name} | B{b} {heads} S{s} D{d} | {'causal' if causal else 'full'} | {label} | unavailable: {str(e)[:60]} |")
                return
            rep = h // hkv
            k_full = k.detach().repeat_interleave(rep, dim=1).requires_grad_()
            v_full = v.detach().repeat_interleave(rep, dim=1).requires_grad_()
            attend = lambda: F.scaled_dot_product_attention(q, k_full, v_full, is_causal=causal)
            label = f"{backend.name} (k, v expanded: no enable_gqa)"
            try:
                o = attend()
                o.backward(g)
            except RuntimeError as e:
                print(f"| {name} | B{b} {heads} S{s} D{d} | {'causal' if causal else 'full'} | {label} | unavailable: {str(e)[:60]} |")
                return
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            with torch.no_grad():
                attend()
        torch.cuda.synchronize()
        fwd = (time.perf_counter() - t) / reps
        t = time.perf_counter()
        for _ in range(reps):
            o = attend()
            o.backward(g)
        torch.cuda.synchronize()
        both = (time.perf_counter() - t) / reps
    print(f"| {name} | B{b} {heads} S{s} D{d} | {'causal' if causal else 'full'} | {label} | "
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
    if not quick:
        # The models' grouped-query shapes at 32k (Qwen2-7B 28:4, Qwen2-1.5B 12:2).
        for h, hkv in ((28, 4), (12, 2)):
            for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
                bench("LLM GQA", 1, h, 32768, 128, True, backend, 2, hkv=hkv)
    if "--128k" in sys.argv:
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            bench("LLM", 1, 16, 131072, 128, True, backend, 2)


if __name__ == "__main__":
    main()
