#!/usr/bin/env python3
"""torch's context parallelism (torch.distributed.tensor.experimental.context_parallel)
on the workload of `sp_check --bench`: causal bf16 scaled_dot_product_attention forward
+ backward over N total tokens sharded along the sequence over P GPUs. Run once per
GPU, e.g.

    torchrun --nproc-per-node 4 benchmarks/cp_reference.py --tokens 131072 [--heads 16
        --kv-heads 16 --dim 128 --reps 3 --rotate allgather|alltoall]

Prints the slowest rank's milliseconds per fwd+bwd and TFLOP/s (3.5 x the causal
forward's 2 H N^2 D). GQA (kv heads < heads) is expanded to full heads first, as SDPA's
flash backend needs equal head counts.
"""
import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.experimental import context_parallel
from torch.nn.attention import SDPBackend, sdpa_kernel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rotate", default="allgather", choices=["allgather", "alltoall"])
    a = ap.parse_args()

    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    mesh = init_device_mesh("cuda", (world,))
    try:
        from torch.distributed.tensor.experimental._attention import set_rotate_method

        set_rotate_method(a.rotate)
    except Exception as e:  # older/newer layouts of the private module
        if rank == 0:
            print(f"set_rotate_method unavailable ({e}); torch's default rotation")

    torch.manual_seed(0)
    shape = (1, a.heads, a.tokens, a.dim)
    mk = lambda: torch.rand(shape, device="cuda", dtype=torch.bfloat16) * 2 - 1
    q, k, v, g = mk(), mk(), mk(), mk()
    flops = 3.5 * 2 * a.heads * a.tokens**2 * a.dim

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        # Shards q, k, v, g in place along the sequence (load-balanced for causal
        # masks) and routes SDPA to ring attention over the mesh.
        with context_parallel(mesh, buffers=[q, k, v, g], buffer_seq_dims=[2, 2, 2, 2]):
            ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))

            def step():
                o = F.scaled_dot_product_attention(ql, kl, vl, is_causal=True)
                o.backward(g)
                ql.grad = kl.grad = vl.grad = None

            step()
            torch.cuda.synchronize()
            dist.barrier()
            t = time.perf_counter()
            for _ in range(a.reps):
                step()
            torch.cuda.synchronize()
            mine = (time.perf_counter() - t) / a.reps
            worst = torch.tensor([mine], device="cuda")
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    if rank == 0:
        s = worst.item()
        print(
            f"| torch context_parallel ({a.rotate}), {a.tokens} tokens, H{a.heads} D{a.dim}, P={world} "
            f"| {s*1e3:.1f} | {flops/s/1e12:.1f} | |",
            flush=True,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
