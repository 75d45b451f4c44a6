#!/usr/bin/env python3
"""Scaling model for sequence-parallel training of the LongVILA LLM shapes.

Predicts, per GPU, the time of one forward+backward of the LLM part (attention +
linear layers, attention-aware recomputation), the communication left exposed after
overlap, and the memory, for the zigzag ring, Ulysses and 2D attention (U x R), from
the kernel rates and the communication costs below. First checks the attention
model against every sequence-parallel run in benchmarks/sequence_parallel.md.

Python 3 standard library only:  python3 benchmarks/scaling_model.py
Prints markdown; benchmarks/scaling.md explains the formulas and pastes the output.

Every constant says where it comes from: "measured: FILE line N" (a number this
project measured), or "assumption" (not measured by this project).
"""

import math

GB = 1e9
GIB = 2.0**30
MS = 1e-3
US = 1e-6

# ----------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------

# Attention kernel rate, fwd+bwd, FlashAttention's convention (3.5 x the causal
# forward's 2 H N^2 D; the same count as sp_check and flash_bench).
# CALIBRATED from one-GPU runs (the only constants fitted to runs):
R_ATTN = {
    # measured: benchmarks/runs/sp_bench_h200x4_128k_fused_dq.txt line 1 (one H200,
    # 131072 tokens, H16 D128 causal, 1520.4 ms = 162.0 TFLOP/s). Kernels with the
    # fused dQ (commit 434e8c0). Used for every prediction past 4 GPUs.
    "fused": 162.0e12,
    # measured: benchmarks/runs/sp_bench_h200x4_128k.txt line 1 (1593.6 ms = 154.6
    # TFLOP/s), kernels of commit ed169fb (before the fused dQ). Used only for the
    # checks of the two runs made with that build (128k and 512k, H16).
    "ed169fb": 154.6e12,
}
# The calibration runs' shape: causal, 131072 tokens -> visible (q, k) pairs per head.
CAL_PAIRS = 131072.0**2 / 2

# How the rate depends on the block: measured on one H100 with the fused-dQ kernels,
# fwd+bwd TFLOP/s by block shape (benchmarks/flash_attention.md lines 48-53), keyed
# by visible (query, key) pairs per head. Only the RATIOS are used (rate at a block /
# rate at the 128k causal block): the H200 rate itself comes from R_ATTN. Outside the
# measured range the ratio is held flat (below 8k x 8k causal: optimistic, flagged).
FLASH_SHAPE_POINTS = [
    (8192.0**2 / 2, 126.6),   # S8192 causal   (line 48)
    (8192.0**2, 147.5),       # S8192 full     (line 49)
    (32768.0**2 / 2, 162.5),  # S32768 causal  (line 50)
    (32768.0**2, 160.3),      # S32768 full    (line 51)
    (131072.0**2 / 2, 167.1), # S131072 causal (line 53)
]
SMALLEST_MEASURED_PAIRS = FLASH_SHAPE_POINTS[0][0]
# Forward and backward are assumed to run at the same rate (backward = 2.5 x the
# forward's FLOPs). The H100 table's forward share at 128k causal is 405.3 of 1473.7
# ms = 27.5% (flash_attention.md line 53) against 1/3.5 = 28.6%: close.

# GEMM rates (bf16, cuBLASLt through longview, one H200, M = 32768 rows), measured:
# benchmarks/gemm.md lines 41-52, longview column, TFLOP/s (fwd, dX, dW).
GEMM_RATES = {
    "gate_up": (803.8e12, 784.3e12, 747.7e12),  # lines 41-43
    "down": (712.3e12, 741.4e12, 733.8e12),     # lines 44-46
    "q_o": (751.3e12, 725.9e12, 656.7e12),      # lines 47-49
    "k_v": (535.5e12, 514.0e12, 498.5e12),      # lines 50-52
}
# The 7B's shapes were not measured: assumption, the same rate per role as the 1.5B's
# (its products are larger; the 8192^3 product reaches 830.2 TFLOP/s, gemm.md line 88).
# Rows per GPU below 32768 were not measured either (flagged in the tables).
GEMM_MEASURED_ROWS = 32768

# Intra-node bandwidth of this code's NCCL transfers (ring shifts and the all-to-alls,
# both grouped ncclSend/ncclRecv in crates/comm/src/nccl/mod.rs), per GPU and
# direction. No project file measures it (sp_check prints no transfer timings), so:
# CALIBRATED: fitted at start-up (fit_intra_bandwidth) so that the model matches one
# multi-GPU run, the zigzag ring at 128k, H16, fused kernels, 423.0 ms
# (benchmarks/runs/sp_bench_h200x4_128k_fused_dq.txt line 5). Every other run is a
# held-out check. The fit lumps into "bandwidth" whatever of that run's time the other
# terms miss; the section "Bandwidth sensitivity" shows how weakly the 4-GPU runs pin
# it down.
CAL_BANDWIDTH_RUN = ("sp_bench_h200x4_128k_fused_dq.txt:5", 131072, 16, 16, "fused",
                     "ring zigzag", 423.0)
B_INTRA = None  # set by fit_intra_bandwidth()
# assumption, shown beside the fit: 355 GB/s, the all-reduce bus bandwidth of 1 GiB
# that the device tool's machine notes report for 4 NVLink-connected H100s through
# PyTorch's NCCL (/work/.library/device/KINDS.md, nvidia-h100-x4 row, measured by
# others, not by this project); H200 NVLink 4 datasheet: 450 GB/s per direction.
B_INTRA_ASSUMED = 355e9
LAT_INTRA = 10 * US  # assumption: NCCL p2p / all-to-all latency inside a node

# Inter-node: 400 Gb/s InfiniBand, one NIC per GPU (LongVILA's 32 x 8 GPUs).
B_INTER = 50e9  # parameter: 400 Gb/s = 50 GB/s per GPU, each direction
LAT_INTER = 20 * US  # parameter: assumption for one NCCL message between nodes
GPUS_PER_NODE = 8  # parameter

# Host synchronisation: every collective in crates/comm syncs the device first
# (buffers.rs sync_inputs) and polls NCCL's stream to completion (watchdog.rs
# finish); a ring step also launches its flash kernels and merge ops.
T_SYNC = 30 * US  # assumption: fixed cost per ring step and per collective call

# HBM traffic of the unfused elementwise ops (merges, f32 accumulation, casts,
# all-to-all re-layouts).
# assumption: 4.3 TB/s read+write, the device-to-device copy rate in the device
# tool's notes for one H200 (/work/.library/device/KINDS.md, nvidia-h200 rows;
# measured by others). Unfused Burn kernels reach less, so this term is a floor.
HBM_BW = 4.3e12
# Bytes moved per element, counted from the code (assumption: every op reads its
# inputs and writes its output once, no fusion):
# - one forward merge (crates/parallel/src/block.rs merge + flash::forward's cast of
#   O to f32): cast bf16->f32 (6), o1-o2 (12), weight * (8), o1 - (12), two
#   mask_where (2 x 12) = 62 bytes per O element.
EW_MERGE = 62.0
# - one backward step's accumulation (ring.rs add_rows: narrow + add + cat, and the
#   cast of the block's gradients to f32): cast (6) + add (12) + cat (8) = 26 bytes
#   per dQ/dK/dV element.
EW_ACC = 26.0
# - an all-to-all re-layout: the sender's contiguous copy (read + write) and the
#   receiver's cat (read + write) = 4 bytes of HBM traffic per byte exchanged.
EW_A2A = 4.0

# Gradient all-reduce at the end of the step (crates/train/src/grad_sync.rs
# all_reduce_grads: host-synchronous NCCL all-reduces of 64 MiB buckets of bf16
# gradients, not overlapped with the backward). NCCL's collective kernels, not the p2p path above: bus bandwidth
# B_AR inside a node (assumption: B_INTRA_ASSUMED), min(B_AR, GPUS_PER_NODE x B_INTER)
# across nodes (one ring per NIC). Per-call latency: assumption.
B_AR = B_INTRA_ASSUMED
BUCKET_BYTES = 64 * 2**20  # crates/train/src/grad_sync.rs BUCKET_BYTES
LAT_AR_INTRA = 30 * US
LAT_AR_INTER = 100 * US

# Memory.
# measured: benchmarks/gemm.md line 3, NVIDIA H200 143,771 MiB (datasheet: 141 GB).
HBM_CAPACITY = 143771 * 2.0**20
# What the trainer keeps per trainable parameter (crates/train/src/prepare.rs lines
# 160-166 and trainer.rs one_step; grads.rs optimizer): f32 master weights (4), the
# bf16 working copy of every step (2), gradients cast to f32 (4), AdamW's two f32
# moments (8). Nothing is sharded across ranks: every rank holds all of it.
BYTES_PER_TRAINABLE_PARAM = 4 + 2 + 4 + 8
# Frozen parameters (LoRA stage 4) keep the f32 master and the bf16 copy.
BYTES_PER_FROZEN_PARAM = 4 + 2
# One layer's replay (the backward's recompute segment) holds its activations and
# their gradients: assumption, 2 x the forward inventory (see layer_work_bytes).
REPLAY_GRAD_FACTOR = 2.0

# ----------------------------------------------------------------------------------
# Model shapes (models/src/vila/config.rs: qwen2_1_5b, qwen2_7b, siglip_so400m_384)
# ----------------------------------------------------------------------------------


class Llm:
    def __init__(self, name, hidden, layers, heads, kv_heads, inter, vocab, tied):
        self.name, self.d, self.L = name, hidden, layers
        self.H, self.Hk, self.D = heads, kv_heads, hidden // heads
        self.I, self.V, self.tied = inter, vocab, tied

    def matmuls(self):
        """(role, in, out) of one layer's products."""
        d, kv = self.d, self.Hk * self.D
        return [
            ("q_o", d, d), ("k_v", d, kv), ("k_v", d, kv), ("q_o", d, d),
            ("gate_up", d, self.I), ("gate_up", d, self.I), ("down", self.I, d),
        ]

    def params(self):
        """All LLM parameters (biases on q, k, v; two RMSNorms a layer)."""
        d, kv = self.d, self.Hk * self.D
        layer = sum(i * o for _, i, o in self.matmuls()) + d + 2 * kv + 2 * d
        emb = self.V * d * (1 if self.tied else 2)
        return self.L * layer + emb + d

    def tensors(self):
        return self.L * 12 + 2 + (0 if self.tied else 1)


QWEN_1_5B = Llm("Qwen2-1.5B", 1536, 28, 12, 2, 8960, 151936, True)
QWEN_7B = Llm("Qwen2-7B", 3584, 28, 28, 4, 18944, 152064, False)


def vision_params():
    """SigLIP so400m-384, 27 layers, plus the mlp_downsample projector (1.5B: 1536)."""
    h, m, L = 1152, 4304, 27
    layer = 4 * (h * h + h) + (h * m + m) + (m * h + h) + 4 * h
    tower = L * layer + 3 * 14 * 14 * h + h + 729 * h + 2 * h
    return tower, L * 16 + 5


def projector_params(d_llm):
    return 2 * 4608 + 4608 * d_llm + d_llm + d_llm * d_llm + d_llm


def vlm_params(llm):
    tower, tower_tensors = vision_params()
    return llm.params() + tower + projector_params(llm.d), llm.tensors() + tower_tensors + 6


# Self-check against the trainer's printout: "1966.15M parameters"
# (benchmarks/runs/train_h200_1.5b_650f.txt line 6).
assert abs(vlm_params(QWEN_1_5B)[0] / 1e6 - 1966.15) < 0.01, vlm_params(QWEN_1_5B)

# ----------------------------------------------------------------------------------
# Attention kernel time
# ----------------------------------------------------------------------------------


def shape_ratio(pairs):
    """Kernel rate at a block of `pairs` visible pairs per head, relative to the
    128k causal block, from FLASH_SHAPE_POINTS (piecewise linear in log pairs)."""
    pts = sorted(FLASH_SHAPE_POINTS)
    ref = dict(pts)[CAL_PAIRS]
    if pairs <= pts[0][0]:
        return pts[0][1] / ref
    if pairs >= pts[-1][0]:
        return pts[-1][1] / ref
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= pairs <= x1:
            t = (math.log(pairs) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return (y0 + t * (y1 - y0)) / ref
    raise AssertionError


def block_time(heads, pairs, D, kernel):
    """(forward, backward) seconds of one block: `pairs` visible pairs per head.
    FLOPs: forward 4 * heads * pairs * D (QK^T and PV), backward 2.5 x that."""
    fwd_flops = 4.0 * heads * pairs * D
    rate = R_ATTN[kernel] * shape_ratio(pairs) / shape_ratio(CAL_PAIRS)
    return fwd_flops / rate, 2.5 * fwd_flops / rate


# ----------------------------------------------------------------------------------
# Communication primitives
# ----------------------------------------------------------------------------------


def p2p(nbytes, crosses_nodes):
    """One ring shift (every rank sends one block to its neighbour at once)."""
    if crosses_nodes:
        return nbytes / B_INTER + LAT_INTER
    return nbytes / B_INTRA + LAT_INTRA


def all_to_all(nbytes, group, group_in_node):
    """One all-to-all in a group of `group` ranks; `nbytes` = each rank's whole tensor
    (it keeps 1/group). Inside a node the GPU's NVLink carries it; across nodes the
    share bound for other nodes goes through the GPU's NIC."""
    if group == 1:
        return 0.0
    if group_in_node:
        return nbytes * (group - 1) / group / B_INTRA + LAT_INTRA
    local = min(group, GPUS_PER_NODE)
    t_nvl = nbytes * (local - 1) / group / B_INTRA
    t_ib = nbytes * (group - local) / group / B_INTER
    return max(t_nvl, t_ib) + LAT_INTER


def check_heads(q_heads, kv_heads, degree):
    """crates/parallel/src/ulysses.rs check_heads (docs/algorithms.md section 3)."""
    if q_heads % degree:
        return f"{q_heads} q heads % {degree} != 0"
    if degree <= kv_heads and kv_heads % degree:
        return f"{kv_heads} kv heads % {degree} != 0"
    if degree > kv_heads and degree % kv_heads:
        return f"{degree} % {kv_heads} kv heads != 0"
    return None


# ----------------------------------------------------------------------------------
# One layer's attention, forward + backward, per scheme (the slowest rank)
# ----------------------------------------------------------------------------------


class Cost:
    """Seconds of one layer's attention fwd+bwd on the slowest rank."""

    def __init__(self):
        self.compute = 0.0     # flash kernels
        self.exposed = 0.0     # communication not hidden by compute (the code now:
                               # dK/dV ride the ring behind the next step, 2026-12-05)
        self.exposed_runs = 0.0  # same, for the code of the measured runs (dK/dV
                                 # shifted after each step and waited at once)
        self.elementwise = 0.0  # merges, accumulation, casts, re-layouts (HBM)
        self.sync = 0.0        # fixed per-step / per-call cost

    def total(self, runs=False):
        """runs=True: with the code the measured runs used (the checks)."""
        exp = self.exposed_runs if runs else self.exposed
        return self.compute + exp + self.elementwise + self.sync


def ring_cost(N_ring, P, H, Hk, D, kernel, zigzag, crosses_nodes, c=None):
    """Ring attention over P ranks, each holding n = N_ring / P tokens of H q heads
    and Hk kv heads (crates/parallel/src/ring.rs). Forward: K/V (bf16) posted before
    each step's compute (overlapped). Backward: K/V again (overlapped), and the dK/dV
    (f32) accumulated for the next block in flight during the step's compute, the
    last hop home exposed (the code since 2026-12-05). The runs in benchmarks/runs/
    used the code before: dK/dV shifted after every step and waited at once
    (`exposed_runs`)."""
    c = c or Cost()
    n = N_ring / P
    kv_bytes = 2 * Hk * n * D * 2
    dkv_bytes = 2 * Hk * n * D * 4
    t_kv, t_dkv = p2p(kv_bytes, crosses_nodes), p2p(dkv_bytes, crosses_nodes)
    for s in range(P):
        if zigzag or s == 0:
            pairs = n * n / 2  # step 0: causal n x n; zigzag steps: half a block
        else:
            pairs = n * n  # plain ring, last rank: every earlier block whole
        tf, tb = block_time(H, pairs, D, kernel)
        c.compute += tf + tb
        c.sync += 2 * T_SYNC
        if s < P - 1:  # a K/V block is in flight during this step, fwd and bwd
            for t_c in (tf, tb):
                c.exposed_runs += max(0.0, t_kv - t_c)
            c.exposed += max(0.0, t_kv - tf) + max(0.0, t_kv + t_dkv - tb)
        else:
            c.exposed += t_dkv  # the last hop home is never hidden
        if P > 1:
            c.exposed_runs += t_dkv
            c.sync += T_SYNC
        # HBM: forward merge of this step's partial (all n rows on the slowest rank),
        # backward accumulation of dQ, dK, dV in f32.
        if s > 0:
            c.elementwise += EW_MERGE * H * n * D / HBM_BW
        c.elementwise += EW_ACC * (H + 2 * Hk) * n * D / HBM_BW
    if P == 1:
        c.exposed = 0.0
    # delta = rowsum(dO * O) once (read O, dO, f32 casts, product): ~24 B/element.
    c.elementwise += 24.0 * H * n * D / HBM_BW
    return c


def ulysses_tensors(n, H, kv, D):
    """Bytes of each all-to-all of one layer (crates/parallel/src/ulysses.rs):
    forward q, k, v (bf16), O (bf16), LSE (f32); backward delta, LSE (f32), dO, q, k, v
    (bf16), dQ, dK, dV (f32). `kv`: kv heads after replication."""
    fwd = [H * n * D * 2, kv * n * D * 2, kv * n * D * 2, H * n * D * 2, H * n * 4]
    bwd = [H * n * 4, H * n * 4, H * n * D * 2, H * n * D * 2, kv * n * D * 2,
           kv * n * D * 2, H * n * D * 4, kv * n * D * 4, kv * n * D * 4]
    return fwd + bwd


def ulysses_exchange(c, n, H, Hk, D, group, in_node):
    kv = Hk * (group // Hk if group > Hk else 1)
    for nbytes in ulysses_tensors(n, H, kv, D):
        t = all_to_all(nbytes, group, in_node)
        c.exposed += t
        c.exposed_runs += t
        c.sync += T_SYNC
        c.elementwise += EW_A2A * nbytes / HBM_BW
    return kv


def ulysses_cost(N, P, H, Hk, D, kernel):
    """Ulysses over P ranks: all-to-alls (host-synchronous, not overlapped), then
    causal attention over all N tokens for H/P heads."""
    c = Cost()
    ulysses_exchange(c, N / P, H, Hk, D, P, P <= GPUS_PER_NODE)
    tf, tb = block_time(H / P, N * N / 2, D, kernel)
    c.compute += tf + tb
    c.elementwise += 24.0 * H * (N / P) * D / HBM_BW  # delta
    return c


def two_d_cost(N, U, R, H, Hk, D, kernel):
    """2D: Ulysses over U contiguous ranks, then a zigzag ring over R strided ranks
    for H/U heads on N/R tokens (crates/parallel/src/two_d.rs)."""
    c = Cost()
    P = U * R
    in_node = U <= GPUS_PER_NODE and GPUS_PER_NODE % U == 0
    kv = ulysses_exchange(c, N / P, H, Hk, D, U, in_node)
    ring_cost(N, R, H / U, kv / U, D, kernel, True, P > GPUS_PER_NODE, c)
    return c


def attention_cost(scheme, N, P, H, Hk, D, kernel, U=None):
    if scheme == "one GPU":
        tf, tb = block_time(H, N * N / 2, D, kernel)
        c = Cost()
        c.compute = tf + tb
        return c
    if scheme in ("ring plain", "ring zigzag"):
        return ring_cost(N, P, H, Hk, D, kernel, scheme == "ring zigzag",
                         P > GPUS_PER_NODE)
    if scheme == "Ulysses":
        return ulysses_cost(N, P, H, Hk, D, kernel)
    if scheme == "2D":
        return two_d_cost(N, U, P // U, H, Hk, D, kernel)
    raise ValueError(scheme)


# ----------------------------------------------------------------------------------
# Checks against the measured runs
# ----------------------------------------------------------------------------------

# (file, N, H, Hk, kernel build, scheme, measured ms, role). Files are under
# benchmarks/runs/ unless named otherwise; all on 4 H200s (one GPU for "one GPU").
RUNS = [
    ("sp_bench_h200x4_128k_fused_dq.txt:1", 131072, 16, 16, "fused", "one GPU", 1520.4, "calibrates R_ATTN[fused]"),
    ("sp_bench_h200x4_128k_fused_dq.txt:4", 131072, 16, 16, "fused", "ring plain", 730.9, "check"),
    ("sp_bench_h200x4_128k_fused_dq.txt:5", 131072, 16, 16, "fused", "ring zigzag", 423.0, "calibrates B_INTRA"),
    ("sequence_parallel.md:58 (repeat)", 131072, 16, 16, "fused", "ring zigzag", 423.8, "check (repeat)"),
    ("sp_bench_h200x4_128k_fused_dq.txt:6", 131072, 16, 16, "fused", "Ulysses", 395.6, "check"),
    ("sp_bench_h200x4_128k_fused_dq.txt:7", 131072, 16, 16, "fused", "2D", 408.3, "check"),
    ("sp_bench_h200x4_128k_gqa28_4.txt:1", 131072, 28, 4, "fused", "one GPU", 2657.4, "check"),
    ("sp_bench_h200x4_128k_gqa28_4.txt:4", 131072, 28, 4, "fused", "ring plain", 1216.5, "check"),
    ("sp_bench_h200x4_128k_gqa28_4.txt:5", 131072, 28, 4, "fused", "ring zigzag", 707.1, "check"),
    ("sp_bench_h200x4_128k_gqa28_4.txt:6", 131072, 28, 4, "fused", "Ulysses", 683.5, "check"),
    ("sp_bench_h200x4_128k_gqa28_4.txt:7", 131072, 28, 4, "fused", "2D", 692.4, "check"),
    ("sp_bench_h200x4_128k.txt:1", 131072, 16, 16, "ed169fb", "one GPU", 1593.6, "calibrates R_ATTN[ed169fb]"),
    ("sp_bench_h200x4_128k.txt:4", 131072, 16, 16, "ed169fb", "ring plain", 747.6, "check"),
    ("sp_bench_h200x4_128k.txt:5", 131072, 16, 16, "ed169fb", "ring zigzag", 448.4, "check"),
    ("sp_bench_h200x4_128k.txt:6", 131072, 16, 16, "ed169fb", "Ulysses", 410.8, "check"),
    ("sp_bench_h200x4_128k.txt:7", 131072, 16, 16, "ed169fb", "2D", 424.7, "check"),
    ("sp_bench_h200x4_512k.txt:2", 524288, 16, 16, "ed169fb", "one GPU", 25216.8, "check"),
    ("sp_bench_h200x4_512k.txt:5", 524288, 16, 16, "ed169fb", "ring plain", 11192.5, "check"),
    ("sp_bench_h200x4_512k.txt:6", 524288, 16, 16, "ed169fb", "ring zigzag", 6635.6, "check"),
    ("sp_bench_h200x4_512k.txt:7", 524288, 16, 16, "ed169fb", "Ulysses", 6343.7, "check"),
    ("sp_bench_h200x4_512k.txt:8", 524288, 16, 16, "ed169fb", "2D", 6415.3, "check"),
]


def predict_run(N, H, Hk, kernel, scheme):
    P = 1 if scheme == "one GPU" else 4
    return attention_cost(scheme, N, P, H, Hk, 128, kernel, U=2)


def fit_intra_bandwidth():
    """B_INTRA such that the calibration run (CAL_BANDWIDTH_RUN) is matched exactly
    (bisection on a log scale; the prediction falls as the bandwidth rises)."""
    global B_INTRA
    _, N, H, Hk, kern, scheme, meas = CAL_BANDWIDTH_RUN
    lo, hi = 1e9, 1e13
    for _ in range(200):
        B_INTRA = math.sqrt(lo * hi)
        if predict_run(N, H, Hk, kern, scheme).total(runs=True) > meas * MS:
            lo = B_INTRA
        else:
            hi = B_INTRA
    B_INTRA = math.sqrt(lo * hi)
    return B_INTRA


def print_checks():
    print("### Checks: predicted vs measured attention fwd+bwd (4 H200s, D128, causal, bf16)\n")
    print("Measured: `benchmarks/runs/<file>:<line>` (the tables of sequence_parallel.md). "
          "Predicted = kernels + exposed communication + elementwise + fixed per-step "
          f"cost, on the slowest rank, with B_INTRA = {B_INTRA / GB:.0f} GB/s (fitted).\n")
    print("| run (file:line) | N | heads | kernels | scheme | role | kernels ms | exposed comm ms | elementwise ms | fixed ms | predicted ms | measured ms | pred / meas |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    ratios = []
    for f, N, H, Hk, kern, scheme, meas, role in RUNS:
        c = predict_run(N, H, Hk, kern, scheme)
        pred = c.total(runs=True) / MS
        r = pred / meas
        if role.startswith("check"):
            ratios.append((scheme, r))
        print(f"| {f} | {N // 1024}k | H{H}/{Hk}kv | {kern} | {scheme} | {role} | "
              f"{c.compute / MS:.1f} | {c.exposed_runs / MS:.1f} | {c.elementwise / MS:.1f} | "
              f"{c.sync / MS:.2f} | {pred:.1f} | {meas:.1f} | {r:.3f} |")
    print()
    by = {}
    for sc, r in ratios:
        by.setdefault(sc, []).append(r)
    allr = [r for _, r in ratios]
    print(f"Held-out checks ({len(allr)} runs), predicted / measured: "
          f"{min(allr):.3f} to {max(allr):.3f}; by scheme: " + "; ".join(
              f"{sc} {min(v):.3f}-{max(v):.3f}" for sc, v in by.items()) + ".\n")


def print_bandwidth_sensitivity():
    global B_INTRA
    fit = B_INTRA
    print("### Bandwidth sensitivity of the 4-GPU checks\n")
    print("The same predictions with B_INTRA set to other values, everything else "
          "unchanged; predicted / measured:\n")
    values = [50e9, fit, 200e9, B_INTRA_ASSUMED, 450e9]
    head = [f"{v / GB:.0f} GB/s" + (" (fit)" if v == fit else "") +
            (" (assumed)" if v == B_INTRA_ASSUMED else "") for v in values]
    print("| run | scheme | " + " | ".join(head) + " |")
    print("|---|---|" + "---|" * len(values))
    spread = {v: [] for v in values}
    for f, N, H, Hk, kern, scheme, meas, role in RUNS:
        if scheme == "one GPU" or "repeat" in f:
            continue
        cells = []
        for v in values:
            B_INTRA = v
            r = predict_run(N, H, Hk, kern, scheme).total(runs=True) / MS / meas
            cells.append(f"{r:.3f}")
            if role.startswith("check"):
                spread[v].append(r)
        print(f"| {f} | {scheme} | " + " | ".join(cells) + " |")
    print("| held-out range | | " + " | ".join(
        f"{min(spread[v]):.3f}-{max(spread[v]):.3f}" for v in values) + " |")
    B_INTRA = fit
    print()


# ----------------------------------------------------------------------------------
# Full LLM step predictions
# ----------------------------------------------------------------------------------


def linear_time(llm, n):
    """One layer's products on n tokens, fwd + dX + dW, plus the recompute forward
    (attention-aware recomputation replays every linear forward once): 8 x params x n."""
    t = 0.0
    for role, i, o in llm.matmuls():
        flops = 2.0 * n * i * o
        fwd, dx, dw = GEMM_RATES[role]
        t += 2 * flops / fwd + flops / dx + flops / dw
    return t


def allreduce_time(nparams, ntensors, P):
    if P == 1:
        return 0.0
    bus = B_AR if P <= GPUS_PER_NODE else min(B_AR, GPUS_PER_NODE * B_INTER)
    lat = LAT_AR_INTRA if P <= GPUS_PER_NODE else LAT_AR_INTER
    calls = math.ceil(nparams * 2 / BUCKET_BYTES)  # 64 MiB buckets (ntensors before)
    return 2.0 * (P - 1) / P * nparams * 2 / bus + calls * (lat + T_SYNC)


def layer_work_bytes(llm, n):
    """One layer's replay under attention-aware recomputation, bf16 per token: x_in,
    norm1, q, k, v, roped q and k, O, o_proj out, residual, norm2, gate, up, silu,
    gate*up, down, out; times REPLAY_GRAD_FACTOR for their gradients."""
    d, HD, KD, I = llm.d, llm.H * llm.D, llm.Hk * llm.D, llm.I
    elems = 7 * d + 3 * HD + 3 * KD + 4 * I
    return REPLAY_GRAD_FACTOR * elems * 2 * n


def scheme_buffers(llm, scheme, n, P, U):
    """Peak extra bytes of the attention scheme during one layer's backward."""
    H, Hk, D = llm.H, llm.Hk, llm.D
    if scheme in ("ring zigzag", "2D"):
        # f32: dQ accumulator, block dQ, the flash kernel's dQ accumulator; dK/dV:
        # accumulator, received shift, block output; bf16: K/V current and incoming.
        kv = Hk
        if scheme == "2D":
            kv = Hk * (U // Hk if U > Hk else 1)
        ring = 3 * 4 * H * n * D + 3 * 2 * 4 * kv * n * D + 2 * 2 * 2 * kv * n * D
        if scheme == "2D":
            a2a = sum(ulysses_tensors(n, H, kv, D))
            return ring + a2a
        return ring
    if scheme == "Ulysses":
        kv = Hk * (P // Hk if P > Hk else 1)
        # every exchanged tensor exists on both sides, plus the f32 block gradients
        return 2 * sum(ulysses_tensors(n, H, kv, D)) + 4 * (H + 2 * kv) * n * D
    raise ValueError(scheme)


def memory(llm, scheme, N, P, U=None, stage="full"):
    nparams, _ = vlm_params(llm)
    if stage == "full":
        states = nparams * BYTES_PER_TRAINABLE_PARAM
    else:
        raise ValueError(stage)
    n = N / P
    kept = llm.L * n * (2 * llm.d + 2 * llm.H * llm.D + 4 * llm.H)  # input, O, LSE
    work = layer_work_bytes(llm, n) + scheme_buffers(llm, scheme, n, P, U)
    return states, kept, work


def step(llm, scheme, N, P, U=None):
    n = N / P
    c = attention_cost(scheme, N, P, llm.H, llm.Hk, llm.D, "fused", U=U)
    lin = linear_time(llm, n)
    nparams, ntensors = vlm_params(llm)
    ar = allreduce_time(nparams, ntensors, P)
    attn = c.total()
    total = llm.L * (attn + lin) + ar
    exposed = llm.L * c.exposed + ar
    exposed_runs = llm.L * c.exposed_runs + ar
    states, kept, work = memory(llm, scheme, N, P, U)
    mem = states + kept + work
    return dict(total=total, attn=llm.L * attn, compute=llm.L * c.compute,
                lin=llm.L * lin, ar=ar, exposed=exposed, exposed_runs=exposed_runs,
                ew=llm.L * (c.elementwise + c.sync), mem=mem, states=states,
                kept=kept, work=work, n=n)


def fit_mark(mem):
    if mem > HBM_CAPACITY:
        return " ✗"
    if mem > 0.9 * HBM_CAPACITY:
        return " ~"
    return ""


def small_mark(llm, scheme, N, P, U):
    """'*' where an attention block is smaller than the smallest measured flash block
    (8k x 8k causal): the kernel rate there is extrapolated (held flat)."""
    n = N / P
    if scheme == "Ulysses":
        pairs = N * N / 2
    elif scheme == "2D":
        pairs = (n * U) ** 2 / 2
    else:
        pairs = n * n / 2
    return "*" if pairs < SMALLEST_MEASURED_PAIRS else ""


PS = [8, 16, 32, 64, 128, 256]
NS = [262144, 524288, 1048576, 2097152]
NAMES = {262144: "256k", 524288: "512k", 1048576: "1M", 2097152: "2M"}


def why_impossible(llm, scheme, N, P, U):
    if N % (2 * P):
        return "N % 2P != 0"
    if scheme == "Ulysses":
        return check_heads(llm.H, llm.Hk, P)
    if scheme == "2D":
        if P % U:
            return f"U={U} does not divide P={P}"
        return check_heads(llm.H, llm.Hk, U)
    return None


def print_matrix(llm, scheme, U=None, hypothetical=False):
    title = scheme if scheme != "2D" else f"2D, U={U} x R=P/{U}"
    print(f"#### {llm.name}: {title}{' (hypothetical: head rule ignored)' if hypothetical else ''}\n")
    reasons = {why_impossible(llm, scheme, N, P, U) for P in PS for N in NS}
    if not hypothetical and None not in reasons:
        allowed = [p for p in range(1, llm.H + 1) if check_heads(llm.H, llm.Hk, p) is None]
        if scheme == "Ulysses":
            what = f"no P in {PS} divides the {llm.H} q heads"
        else:
            what = f"U={U} does not divide the {llm.H} q heads"
        print(f"Impossible at every P and N here: {what} (head rule, docs/algorithms.md "
              f"section 3; {llm.H} q / {llm.Hk} kv heads allow Ulysses degrees {allowed}).\n")
        return
    print("Cell: step s / exposed communication s / memory GiB per GPU.\n")
    print("| P | " + " | ".join(NAMES[N] for N in NS) + " |")
    print("|---|" + "---|" * len(NS))
    for P in PS:
        if hypothetical and scheme == "Ulysses" and P > llm.H:
            continue  # fewer than one head a GPU
        cells = []
        for N in NS:
            why = why_impossible(llm, scheme, N, P, U)
            if why and not hypothetical:
                cells.append(f"impossible ({why})")
                continue
            r = step(llm, scheme, N, P, U)
            cells.append(f"{r['total']:.1f} / {r['exposed']:.2f} / "
                         f"{r['mem'] / GIB:.0f}{fit_mark(r['mem'])}"
                         f"{small_mark(llm, scheme, N, P, U)}")
        print(f"| {P} | " + " | ".join(cells) + " |")
    print()


def print_point_sensitivity():
    """Step and exposed communication at 2M tokens on 256 GPUs when one assumption or
    parameter changes (the others as in the parameter table)."""
    global B_INTRA, B_INTER, LAT_INTER, T_SYNC
    base = dict(B_INTRA=B_INTRA, B_INTER=B_INTER, LAT_INTER=LAT_INTER, T_SYNC=T_SYNC)
    variants = [
        ("as in the parameter table", {}, 1.0),
        ("B_INTRA = 355 GB/s (assumed, not fitted)", {"B_INTRA": B_INTRA_ASSUMED}, 1.0),
        ("B_INTER = 25 GB/s (half the link)", {"B_INTER": 25e9}, 1.0),
        ("LAT_INTER = 100 us", {"LAT_INTER": 100 * US}, 1.0),
        ("T_SYNC = 100 us", {"T_SYNC": 100 * US}, 1.0),
        ("attention kernels at half R_ATTN (in-model rate, see limits)", {}, 0.5),
    ]
    print("### Sensitivity at 2M tokens on 256 GPUs\n")
    print("Step s / exposed communication s, one change at a time.\n")
    cols = [(QWEN_1_5B, "ring zigzag", None), (QWEN_1_5B, "2D", 4),
            (QWEN_7B, "ring zigzag", None), (QWEN_7B, "2D", 4)]
    print("| change | " + " | ".join(
        f"{m.name} {sc if sc != '2D' else '2D U=4'}" for m, sc, _ in cols) + " |")
    print("|---|" + "---|" * len(cols))
    keep_r = dict(R_ATTN)
    for name, change, r_scale in variants:
        for k, v in change.items():
            globals()[k] = v
        for k in R_ATTN:
            R_ATTN[k] = keep_r[k] * r_scale
        cells = []
        for m, sc, U in cols:
            r = step(m, sc, 2097152, 256, U)
            cells.append(f"{r['total']:.1f} / {r['exposed']:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
        for k, v in base.items():
            globals()[k] = v
        R_ATTN.update(keep_r)
    print()


def lora_trainable(llm, rank=8):
    """Stage 4 (docs/algorithms.md section 8): LoRA r8 on q, k, v, o, plus the input
    embeddings and the norms trainable."""
    d, kv = llm.d, llm.Hk * llm.D
    lora = llm.L * rank * ((d + d) * 2 + (d + kv) * 2)
    return lora, lora + llm.V * d + llm.L * 2 * d + d


def print_states():
    print("### Model states per GPU (weights, gradients, optimizer), GiB\n")
    print("Without sharding the trainer keeps, on every rank, f32 master weights, the bf16 "
          "working copy, f32 gradients and AdamW's two f32 moments (18 bytes per trained "
          "parameter; frozen parameters keep the f32 master and the bf16 copy, 6 bytes). "
          "`run.shard_optimizer = true` (crates/train/src/zero.rs) shards the moments over "
          "all P ranks: 10 + 8/P bytes per trained parameter. Sharding the f32 master too "
          "(Megatron's distributed optimizer; not built) would leave 6 + 12/P.\n")
    built, unbuilt = (4, 8, 256), (8, 256)
    print("| model | VLM parameters | stage 5, all weights, unsharded | stage 4 LoRA r8 + embeddings + norms, unsharded | "
          + " | ".join(f"stage 5 moments sharded, P={P}" for P in built) + " | "
          + " | ".join(f"stage 5 master + moments sharded (not built), P={P}" for P in unbuilt) + " |")
    print("|---|---|---|---|" + "---|" * (len(built) + len(unbuilt)))
    for llm in (QWEN_1_5B, QWEN_7B):
        total, _ = vlm_params(llm)
        lora, trainable = lora_trainable(llm)
        full = total * BYTES_PER_TRAINABLE_PARAM
        st4 = total * BYTES_PER_FROZEN_PARAM + trainable * (BYTES_PER_TRAINABLE_PARAM - BYTES_PER_FROZEN_PARAM)
        moments = [total * (10 + 8 / P) for P in built]
        both = [total * (6 + 12 / P) for P in unbuilt]
        print(f"| {llm.name} | {total / 1e6:.0f} M | {full / GIB:.1f}{fit_mark(full)} | "
              f"{st4 / GIB:.1f} ({trainable / 1e6:.0f} M trained) | "
              + " | ".join(f"{x / GIB:.1f}" for x in moments + both) + " |")
    print()


def print_breakdown():
    print("### Breakdown at the LongVILA point: 2M tokens on 256 GPUs (and 1M on 128)\n")
    print("| model | scheme | N | P | tokens/GPU | step s | attention kernels s | linears s | "
          "elementwise + fixed s | exposed comm s (code now: dK/dV pipelined) | exposed comm s (code of the measured runs) | "
          "grad all-reduce s | model states GiB | kept activations GiB | one layer's working set GiB | memory GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for llm in (QWEN_1_5B, QWEN_7B):
        for N, P in ((2097152, 256), (1048576, 128)):
            for scheme, U in (("ring zigzag", None), ("2D", 4)):
                r = step(llm, scheme, N, P, U)
                name = scheme if scheme != "2D" else f"2D U={U}"
                print(f"| {llm.name} | {name} | {NAMES[N]} | {P} | {r['n']:.0f} | "
                      f"{r['total']:.1f} | {r['compute']:.1f} | {r['lin']:.2f} | {r['ew']:.2f} | "
                      f"{r['exposed']:.2f} | {r['exposed_runs']:.2f} | {r['ar']:.2f} | "
                      f"{r['states'] / GIB:.1f} | {r['kept'] / GIB:.1f} | {r['work'] / GIB:.1f} | "
                      f"{r['mem'] / GIB:.1f}{fit_mark(r['mem'])} |")
    print()


def print_params():
    print("### Parameters\n")
    print("| name | value | source |")
    print("|---|---|---|")
    rows = [
        ("R_ATTN fused", f"{R_ATTN['fused'] / 1e12:.1f} TFLOP/s", "calibrated: runs/sp_bench_h200x4_128k_fused_dq.txt line 1"),
        ("R_ATTN ed169fb", f"{R_ATTN['ed169fb'] / 1e12:.1f} TFLOP/s", "calibrated: runs/sp_bench_h200x4_128k.txt line 1"),
        ("block-shape ratio", "8k causal 0.758 ... 128k causal 1.000", "measured (H100): flash_attention.md lines 48-53"),
        ("GEMM rates", "498.5-803.8 TFLOP/s by role and pass", "measured: gemm.md lines 41-52"),
        ("B_INTRA (ring shifts, all-to-alls)", f"{B_INTRA / GB:.0f} GB/s", "calibrated: runs/sp_bench_h200x4_128k_fused_dq.txt line 5 (zigzag ring)"),
        ("B_INTRA_ASSUMED (alternative)", f"{B_INTRA_ASSUMED / GB:.0f} GB/s", "assumption (device tool notes: 4x H100 all-reduce bus bandwidth)"),
        ("B_AR (gradient all-reduce bus bandwidth)", f"{B_AR / GB:.0f} GB/s", "assumption (same note)"),
        ("LAT_AR intra / inter", f"{LAT_AR_INTRA / US:.0f} / {LAT_AR_INTER / US:.0f} us per call", "assumption"),
        ("LAT_INTRA", f"{LAT_INTRA / US:.0f} us", "assumption"),
        ("B_INTER", f"{B_INTER / GB:.0f} GB/s per GPU", "parameter (400 Gb/s IB per GPU)"),
        ("LAT_INTER", f"{LAT_INTER / US:.0f} us", "parameter (assumption)"),
        ("GPUS_PER_NODE", f"{GPUS_PER_NODE}", "parameter"),
        ("T_SYNC", f"{T_SYNC / US:.0f} us per ring step / collective", "assumption"),
        ("HBM_BW", f"{HBM_BW / 1e12:.1f} TB/s", "assumption (device tool notes, H200 copy)"),
        ("EW_MERGE / EW_ACC / EW_A2A", f"{EW_MERGE:.0f} B / {EW_ACC:.0f} B / {EW_A2A:.0f}x", "counted from block.rs, ring.rs, ulysses.rs"),
        ("HBM capacity", f"{HBM_CAPACITY / GIB:.1f} GiB", "measured: gemm.md line 3 (143,771 MiB)"),
        ("bytes per trainable parameter", f"{BYTES_PER_TRAINABLE_PARAM}", "trainer code (prepare.rs, trainer.rs): f32 master + bf16 copy + f32 grads + 2 f32 moments, unsharded"),
        ("1.5B VLM parameters", f"{vlm_params(QWEN_1_5B)[0] / 1e6:.2f} M", "shapes; equals train_h200_1.5b_650f.txt line 6"),
        ("7B VLM parameters", f"{vlm_params(QWEN_7B)[0] / 1e6:.2f} M", "shapes (config.rs)"),
    ]
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print()


def print_memory_check():
    """The one-GPU trainer runs (the only measured memory): LLM part predicted,
    vision added by the same rule (layer inputs kept; 2x where the binary also kept
    the vision attention outputs)."""
    print("### Memory against the one-GPU trainer runs (1.5B VLM, one H200)\n")
    print("| run (file) | tokens | frames | model states GiB | LLM kept GiB | LLM layer replay GiB | "
          "vision kept GiB (estimate) | predicted GiB | measured peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    runs = [
        ("runs/train_h200_1.5b_162f.txt line 11", 31794, 162, 2, 55.6),
        ("runs/train_h200_1.5b_650f.txt line 11", 127442, 650, 1, 120.0),
    ]
    llm = QWEN_1_5B
    for f, N, frames, vis_factor, meas in runs:
        states = vlm_params(llm)[0] * BYTES_PER_TRAINABLE_PARAM
        kept = llm.L * N * (2 * llm.d + 2 * llm.H * llm.D + 4 * llm.H)
        work = layer_work_bytes(llm, N)
        vision = vis_factor * 27 * frames * 729 * 1152 * 2
        total = states + kept + work + vision
        print(f"| {f} | {N} | {frames} | {states / GIB:.1f} | {kept / GIB:.1f} | {work / GIB:.1f} | "
              f"{vision / GIB:.1f} | {total / GIB:.1f} | {meas} |")
    print()


def print_one_gpu_step_check():
    print("### The LLM part against the one measured model step (1.5B, 32k tokens, one H200)\n")
    llm = QWEN_1_5B
    N = 31978
    c = attention_cost("one GPU", N, 1, llm.H, llm.Hk, llm.D, "fused")
    attn = llm.L * c.total()
    lin = llm.L * linear_time(llm, N)
    print(f"Predicted LLM part (28 layers of attention {attn:.2f} s + linears {lin:.2f} s, "
          f"recompute included) = {attn + lin:.2f} s. Measured whole step (vision encoder, "
          "projector, every elementwise op, no optimizer step): 7.145 s "
          "(benchmarks/gemm.md line 88). The model leaves out "
          f"{7.145 - attn - lin:.1f} s of that step.\n")


def main():
    fit_intra_bandwidth()
    print("## Output of benchmarks/scaling_model.py\n")
    print_params()
    print_checks()
    print_bandwidth_sensitivity()
    print_memory_check()
    print_one_gpu_step_check()
    print("### Predictions: LLM part, one sequence of N tokens over P GPUs (SP degree P)\n")
    print("Step = 28 x (attention fwd+bwd + linear layers fwd+bwd+recompute) + gradient "
          "all-reduce. Memory (as built: stage 5, every weight trained, optimizer state "
          "not sharded): ✗ over the 140.4 GiB of an H200, ~ within 10% of it. "
          "`*`: attention blocks smaller than the smallest measured flash block (8k x 8k "
          "causal): the kernel rate there is extrapolated flat, so the time is optimistic. "
          "GEMM rates were measured at 32768 rows and are used unchanged at fewer rows.\n")
    for llm in (QWEN_1_5B, QWEN_7B):
        print_matrix(llm, "ring zigzag")
        print_matrix(llm, "Ulysses")
        print_matrix(llm, "2D", U=8)
        print_matrix(llm, "2D", U=4)
    print("#### Hypothetical, head rule ignored (fractional heads per GPU): what Ulysses "
          "and 2D U=8 would give if the head counts allowed them\n")
    for llm in (QWEN_1_5B, QWEN_7B):
        print_matrix(llm, "Ulysses", hypothetical=True)
        print_matrix(llm, "2D", U=8, hypothetical=True)
    print_breakdown()
    print_point_sensitivity()
    print_states()


if __name__ == "__main__":
    main()
