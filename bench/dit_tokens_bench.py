"""Forward throughput of LinearDiT at 16x16, 32x32 and 64x64 latents: linear attention means ~linear in tokens.

    python bench/dit_tokens_bench.py            # 4 blocks x 512 wide, as the diffusers figure in shared/reference

Prints latents/s per size and the time ratio per 4x tokens (goal: <= 5x; diffusers' SANA transformer measured
3.4x and 4.5x on the same 2-core CPU). Sizes are timed interleaved, median of repeats, in one run.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import DiTConfig, LinearDiT  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="0: torch's default")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = DiTConfig(hidden_size=a.width, depth=a.depth, cross_heads=a.width // 64, caption_channels=2304)
    model = LinearDiT(cfg).eval()
    y, mask = torch.randn(a.batch, 300, 2304), torch.ones(a.batch, 300)
    mask[:, 20:] = 0
    sizes = (16, 32, 64)
    times = {s: [] for s in sizes}
    with torch.no_grad():
        for s in sizes:  # warm-up
            model(torch.randn(a.batch, 32, s, s), torch.full((a.batch,), 500.0), y, mask)
        for _ in range(a.repeats):
            for s in sizes:
                x = torch.randn(a.batch, 32, s, s)
                t0 = time.perf_counter()
                model(x, torch.full((a.batch,), 500.0), y, mask)
                times[s].append(time.perf_counter() - t0)
    med = {s: statistics.median(times[s]) for s in sizes}
    print(f"LinearDiT {a.depth} blocks x {a.width}, batch {a.batch}, {torch.get_num_threads()} threads")
    for s in sizes:
        print(f"{s:3d}x{s:<3d} latents ({s * s:5d} tokens): {a.batch / med[s]:8.2f} latents/s, {med[s] * 1000:8.1f} ms")
    print(f"time ratio 16->32: {med[32] / med[16]:.2f}x, 32->64: {med[64] / med[32]:.2f}x (4x tokens each; goal <= 5x)")


if __name__ == "__main__":
    main()
