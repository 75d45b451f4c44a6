#!/usr/bin/env python3
"""Reference for `longview infer-bench`: the same VLM shapes in PyTorch + Hugging Face
transformers (random weights), timed in the same phases: vision encoding (SigLIP to
layer -2 + the mlp_downsample projector, --frame-batch frames at a time), prefill
(the whole prompt in one forward with transformers' default cache, as `generate`
does; time to the first token's logits) and greedy decoding of --new-tokens tokens
with that cache, then the peak allocated memory. Same prompt layout as longview's
(tokens_per_frame placeholders + one separator a frame, the text around them).

    python3 benchmarks/hf_infer_reference.py --size 1.5b --frames 256 --dtype bf16

Prints one row in the format of `longview infer-bench`.
"""
import argparse
import time

import torch
import torch.nn as nn
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from hf_reference import SIZES, flat_square


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="debug", choices=SIZES)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--text-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--frame-batch", type=int, default=32)
    p.add_argument("--dtype", default="bf16", choices=["f32", "bf16"])
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--runs", type=int, default=1,
                   help="runs of the whole request, each reported (the first is cold)")
    a = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    s = SIZES[a.size]
    torch.manual_seed(0)
    vision = SiglipVisionModel(SiglipVisionConfig(**s["vision"], vision_use_head=False,
                                                  attn_implementation=a.attn)).to(dev, dtype).eval()
    text_cfg = dict(s["text"])
    theta = text_cfg.pop("rope_theta")
    llm = Qwen2ForCausalLM(Qwen2Config(**text_cfg, rope_parameters={"rope_type": "default", "rope_theta": theta},
                                       attn_implementation=a.attn)).to(dev, dtype).eval()
    vh, th = s["vision"]["hidden_size"], s["text"]["hidden_size"]
    proj = nn.Sequential(nn.LayerNorm(4 * vh), nn.Linear(4 * vh, th), nn.GELU(), nn.Linear(th, th)).to(dev, dtype)
    side = s["vision"]["image_size"] // s["vision"]["patch_size"]
    per_frame = ((side + 1) // 2) ** 2
    vocab = s["text"]["vocab_size"]
    placeholder = vocab - 1
    half = a.text_tokens // 2
    row = (list(range(1, half + 1)) + ([placeholder] * per_frame + [vocab - 2]) * a.frames
           + list(range(half + 1, a.text_tokens + 1)))
    ids = torch.tensor([row], device=dev)
    pixels = torch.rand(a.frames, 3, side * s["vision"]["patch_size"], side * s["vision"]["patch_size"],
                        device=dev, dtype=dtype) * 2 - 1

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def once():
        with torch.inference_mode():
            sync()
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            parts = []
            for start in range(0, a.frames, a.frame_batch):
                batch = pixels[start:start + a.frame_batch]
                feats = vision(pixel_values=batch, output_hidden_states=True).hidden_states[-2]
                n, _, c = feats.shape
                parts.append(proj[1:](proj[0](flat_square(feats.reshape(n, side, side, c)))))
            visual = torch.cat(parts)
            sync()
            encode_s = time.perf_counter() - t0

            t0 = time.perf_counter()
            emb = llm.get_input_embeddings()(ids)
            emb = emb.masked_scatter((ids == placeholder).unsqueeze(-1), visual.reshape(-1, th))
            out = llm(inputs_embeds=emb, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            sync()
            prefill_s = time.perf_counter() - t0

            t0 = time.perf_counter()
            cache = out.past_key_values
            generated = [token]
            for _ in range(a.new_tokens - 1):
                out = llm(input_ids=token, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                generated.append(token)
            sync()
            decode_s = time.perf_counter() - t0
        return encode_s, prefill_s, decode_s, len(generated)

    prompt = len(row)
    for run in range(1, a.runs + 1):
        encode_s, prefill_s, decode_s, n = once()
        mem = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB peak" if dev == "cuda" else "n/a"
        label = f" run {run} of {a.runs}" if a.runs > 1 else ""
        print(f"| {a.size} (torch {torch.__version__}, {a.attn}){label} | {dev} | {a.dtype} | {a.frames} | {prompt} | "
              f"{encode_s:.3f} | {prefill_s:.3f} | {prompt / prefill_s:.0f} | {n / decode_s:.1f} | {mem} |", flush=True)
        if dev == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
