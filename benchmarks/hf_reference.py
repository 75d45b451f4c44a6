#!/usr/bin/env python3
"""Reference throughput for `longview bench`: the same VLM shapes in PyTorch +
Hugging Face transformers, forward+backward on random weights and generated inputs.

    python3 benchmarks/hf_reference.py --size 1.5b --frames 8 --text-tokens 64 --dtype bf16

Same model as longview (SigLIP tower run to layer -2, VILA mlp_downsample projector,
Qwen2ForCausalLM on spliced input embeddings, mean next-token loss over the answer
half of the text tokens, LM head on those rows only), same sequence layout (tokens_per_frame placeholders + one
separator per frame). Prints one table row in the format of `longview bench`.
Tested with torch 2.11/2.15 and transformers 5.x.
"""
import argparse
import time

import torch
import torch.nn as nn
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

SIZES = {
    "debug": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=40, patch_size=8),
                  text=dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                            tie_word_embeddings=False)),
    "1.5b": dict(vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                             image_size=384, patch_size=14),
                 text=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                           num_attention_heads=12, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True)),
    "7b": dict(vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                           image_size=384, patch_size=14),
               text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6, tie_word_embeddings=False)),
}


def flat_square(x):
    n, a, b, c = x.shape
    if a % 2:
        x = torch.cat([x, x.new_zeros(n, 1, b, c)], 1); a += 1
    if b % 2:
        x = torch.cat([x, x.new_zeros(n, a, 1, c)], 2); b += 1
    x = x.reshape(n, a, b // 2, 2 * c).permute(0, 2, 1, 3).contiguous()
    return x.reshape(n, (b // 2) * (a // 2), 4 * c)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="debug", choices=SIZES)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--dtype", default="bf16", choices=["f32", "bf16"])
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--checkpointing", action="store_true",
                   help="transformers' gradient checkpointing (per-layer recompute) in both towers")
    p.add_argument("--adamw", action="store_true",
                   help="a training step as `longview train` runs it: f32 weights (master copies) with the "
                        "forward and backward under bf16 autocast, gradient-norm clipping at 1.0, then fused "
                        "AdamW (lr 2e-5, weight decay 0) and the gradients zeroed")
    a = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    # --adamw: weights stay f32, autocast computes in `compute` (bf16 for --dtype bf16).
    compute = dtype
    if a.adamw:
        dtype = torch.float32
    s = SIZES[a.size]
    torch.manual_seed(0)
    vision = SiglipVisionModel(SiglipVisionConfig(**s["vision"], vision_use_head=False,
                                                  attn_implementation=a.attn)).to(dev, dtype)
    text_cfg = dict(s["text"])
    theta = text_cfg.pop("rope_theta")
    llm = Qwen2ForCausalLM(Qwen2Config(**text_cfg, rope_parameters={"rope_type": "default", "rope_theta": theta},
                                       attn_implementation=a.attn)).to(dev, dtype)
    vh, th = s["vision"]["hidden_size"], s["text"]["hidden_size"]
    if a.checkpointing:
        vision.gradient_checkpointing_enable()
        llm.gradient_checkpointing_enable()
        vision.train()
        llm.train()
    proj = nn.Sequential(nn.LayerNorm(4 * vh), nn.Linear(4 * vh, th), nn.GELU(), nn.Linear(th, th)).to(dev, dtype)
    side = s["vision"]["image_size"] // s["vision"]["patch_size"]
    per_frame = ((side + 1) // 2) ** 2
    vocab = s["text"]["vocab_size"]
    placeholder = vocab - 1
    answer = a.text_tokens // 2
    prompt = a.text_tokens - answer
    row = (list(range(1, prompt // 2 + 1)) + ([placeholder] * per_frame + [vocab - 2]) * a.frames
           + list(range(prompt // 2 + 1, prompt + 1)) + list(range(100, 100 + answer)))
    ids = torch.tensor([row] * a.batch, device=dev)
    labels = ids.clone()
    labels[:, : len(row) - answer] = -100
    pixels = torch.rand(a.batch * a.frames, 3, side * s["vision"]["patch_size"], side * s["vision"]["patch_size"],
                        device=dev, dtype=dtype) * 2 - 1

    params = [q for m in (vision, proj, llm) for q in m.parameters()]
    opt = torch.optim.AdamW(params, lr=2e-5, weight_decay=0.0, fused=dev == "cuda") if a.adamw else None

    def step():
        with torch.autocast(dev, dtype=compute, enabled=a.adamw and compute != torch.float32):
            feats = vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
            n, t, c = feats.shape
            visual = proj[1:](proj[0](flat_square(feats.reshape(n, side, side, c))))
            emb = llm.get_input_embeddings()(ids)
            emb = emb.masked_scatter((ids == placeholder).unsqueeze(-1), visual.reshape(-1, th).to(emb.dtype))
            # LM head on the supervised rows only, as longview's loss does.
            hidden = llm.model(inputs_embeds=emb).last_hidden_state[:, :-1]
            targets = labels[:, 1:]
            rows = targets != -100
            logits = llm.lm_head(hidden[rows])
            loss = nn.functional.cross_entropy(logits.float(), targets[rows])
        loss.backward()
        if opt is not None:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()

    for _ in range(a.warmup):
        step()
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(a.iters):
        step()
    sec = (time.perf_counter() - t0) / a.iters
    tokens = a.batch * len(row)
    # Peak allocated, and the caching allocator's peak reservation (what longview's
    # "reserved" column measures: its memory pool's reservation).
    mem = (f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB peak allocated, "
           f"{torch.cuda.max_memory_reserved() / 2**30:.1f} GiB") if dev == "cuda" else "n/a"
    ckpt = (", checkpointing" if a.checkpointing else "") + (", f32 weights + autocast, clip, AdamW" if a.adamw else "")
    print(f"| {a.size} (torch {torch.__version__}, {a.attn}{ckpt}) | {dev} | {a.dtype} | {a.batch}x{len(row)} | "
          f"{a.batch * a.frames} | {sec:.3f} | {tokens / sec:.0f} | - | {mem} peak reserved |")


if __name__ == "__main__":
    main()
