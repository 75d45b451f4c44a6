#!/usr/bin/env python3
"""Reference frame sampling with the tools users would otherwise use, on the video
`cargo bench -p longview-data --bench sampling` generated:

    python3 benchmarks/video_reference.py target/bench-videos/haystack-60min-640x360-30fps-gop30.mp4 1024 3600

Same request as longview: N uniform frames, indices round(linspace(0, n-1, N)),
RGB at 384x384 (PyAV and decord resize in their decoders; torchcodec decodes at the
native size and is resized with torch, as a user would). Tested with av 18.1.0,
decord 0.6.0, torchcodec 0.17.0 (pip, CPU). Peak RSS from resource.getrusage.
"""
import resource
import sys
import time

import numpy as np


def indices(n, count):
    return np.round(np.linspace(0, n - 1, count)).astype(int)


def pyav_sequential(path, idx):
    import av
    want = set(idx.tolist())
    out = []
    with av.open(path) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        for i, f in enumerate(c.decode(s)):
            if i in want:
                out.append(f.to_ndarray(format="rgb24", width=384, height=384))
            if i >= idx[-1]:
                break
    return len(out)


def decord_batch(path, idx):
    import decord
    vr = decord.VideoReader(path, width=384, height=384, num_threads=0)
    total = 0
    for chunk in np.array_split(idx, max(1, len(idx) // 256)):
        total += vr.get_batch(chunk.tolist()).shape[0]
    return total


def torchcodec_batch(path, idx):
    import torch
    from torchcodec.decoders import VideoDecoder
    d = VideoDecoder(path, num_ffmpeg_threads=0, seek_mode="exact")
    total = 0
    for chunk in np.array_split(idx, max(1, len(idx) // 256)):
        frames = d.get_frames_at(chunk.tolist()).data
        frames = torch.nn.functional.interpolate(frames.float(), size=(384, 384), mode="bilinear")
        total += frames.shape[0]
    return total


def main():
    path = sys.argv[1]
    counts = [int(c) for c in sys.argv[2:]] or [1024, 3600]
    import av
    with av.open(path) as c:
        n = c.streams.video[0].frames
    print(f"video: {path} ({n} frames)")
    print("| method | frames | seconds | peak RSS MiB (process so far) |")
    print("|---|---|---|---|")
    for name, fn in [("PyAV 18.1 sequential decode", pyav_sequential),
                     ("decord 0.6 get_batch", decord_batch),
                     ("torchcodec 0.17 get_frames_at", torchcodec_batch)]:
        for count in counts:
            idx = indices(n, count)
            t = time.perf_counter()
            got = fn(path, idx)
            sec = time.perf_counter() - t
            assert got == count, (name, got, count)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"| {name} | {count} | {sec:.2f} | {rss:.0f} |", flush=True)


if __name__ == "__main__":
    main()
