"""
LinearDiT's forward against diffusers' SanaTransformer2DModel on a CPU, same weights and config, side by side.

The diffusers model is built with random weights (every tensor, so none sits at a zero init), saved with
save_pretrained and read back by LinearDiT.from_pretrained (model.py's diffusers-layout loader), so both compute
the same function: the relative difference of their outputs is printed first. Then each size is timed for both
models in turn, ours then diffusers', round after round (other jobs share the CPU: a load change hits both),
and the medians are printed per size with their ratio, and per step to the next size (4x the tokens for a
doubled side) each model's own time ratio. Without diffusers installed it says so in one line and stops.
Both models run with the memory allocator as sample.py sets it on a CPU (--malloc=keep: model.keep_freed_memory,
freed memory is reused, not handed back to the OS) or with glibc's defaults (--malloc=glibc, every tensor over
32 MB fresh pages from the OS).

    python bench/diffusers_bench.py                      # 4 blocks x 512, batch 2, 32x32 and 64x64 latents
    python bench/diffusers_bench.py --depth=1 --width=64 --sizes=4,8 --repeats=1 --threads=1   # seconds
    python bench/diffusers_bench.py --threads=1 --repeats=7 --malloc=glibc
"""

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: model.py
from model import LinearDiT, keep_freed_memory  # noqa: E402

# defaults, overridden by --key=value
depth = 4
width = 512  # self-attention heads of 32 channels, cross-attention heads of 64
batch = 2
sizes = "32,64"  # latent sides (32 channels each), timed in this order
repeats = 5  # timing rounds; each round times every size with both models
threads = 0  # torch threads; 0 keeps torch's default
qk_norm = True  # SANA-1.5's RMSNorm on q and k (False: SANA-1.0)
text_tokens = 300  # caption length, of which the first 20 are real tokens (the rest masked)
malloc = "keep"  # keep: freed memory reused (as sample.py on a CPU); glibc: glibc's defaults


def parse_args(argv):
    known = {"depth": int, "width": int, "batch": int, "sizes": str, "repeats": int, "threads": int,
             "qk_norm": str, "text_tokens": int, "malloc": str}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__)
            print("options: " + ", ".join(f"--{k}={globals()[k]}" for k in known))
            sys.exit(0)
        key, _, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or key not in known or not value:
            fail(f"bad argument {arg!r}; use --key=value with key in {sorted(known)}")
        try:
            globals()[key] = known[key](value)
        except ValueError:
            fail(f"bad argument {arg!r}: --{key} takes a {known[key].__name__}")
    if str(qk_norm).lower() not in ("true", "false"):
        fail(f"bad --qk_norm={qk_norm!r}: use True or False")
    globals()["qk_norm"] = str(qk_norm).lower() == "true"
    if malloc not in ("keep", "glibc"):
        fail(f"bad --malloc={malloc!r}: use keep or glibc")
    if not all(s.strip().isdigit() and int(s) > 0 for s in sizes.split(",")):
        fail(f"bad --sizes={sizes!r}: comma-separated latent sides, e.g. 32,64")
    if width % 64 or min(depth, batch, repeats, text_tokens) < 1:
        fail("--width must be a multiple of 64 and --depth, --batch, --repeats, --text_tokens >= 1")


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def make_models():
    """(ours, diffusers') with the same weights; random, so every tensor matters."""
    import diffusers

    torch.manual_seed(0)
    theirs = diffusers.SanaTransformer2DModel(
        in_channels=32, out_channels=32, num_attention_heads=width // 32, attention_head_dim=32, num_layers=depth,
        num_cross_attention_heads=width // 64, cross_attention_head_dim=64, cross_attention_dim=width,
        caption_channels=2304, mlp_ratio=2.5, dropout=0.0, attention_bias=False, sample_size=32, patch_size=1,
        norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=None,
        qk_norm="rms_norm_across_heads" if qk_norm else None).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        ours = LinearDiT.from_pretrained(folder).eval()
    return ours, theirs


def main():
    parse_args(sys.argv[1:])
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("diffusers is not installed: nothing to compare against (pip install diffusers); skipped")
        return
    if threads:
        torch.set_num_threads(threads)
    kept = malloc == "keep" and keep_freed_memory()
    ours, theirs = make_models()
    sides = [int(s) for s in sizes.split(",")]
    g = torch.Generator().manual_seed(1)
    y = torch.randn(batch, text_tokens, 2304, generator=g)
    mask = torch.zeros(batch, text_tokens)
    mask[:, :20] = 1
    t = torch.full((batch,), 500.0)  # an integer timestep: the official model would truncate it (model.py)
    xs = {s: torch.randn(batch, 32, s, s, generator=g) for s in sides}
    run = {"ours": lambda x: ours(x, t, y, mask),
           "diffusers": lambda x: theirs(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask).sample}
    times = {(name, s): [] for s in sides for name in run}
    with torch.no_grad():
        a, b = run["ours"](xs[sides[0]]), run["diffusers"](xs[sides[0]])  # also the warm-up
        print(f"LinearDiT vs diffusers {diffusers.__version__} SanaTransformer2DModel: {depth} blocks x {width}, "
              f"batch {batch}, qk_norm {qk_norm}, {torch.get_num_threads()} threads; same weights, outputs differ "
              f"by {((a - b).norm() / b.norm()).item():.1e} (relative)")
        allocator = "freed memory kept for reuse" if kept else "glibc's defaults" if malloc == "glibc" else "defaults"
        print(f"memory allocator (--malloc={malloc}): {allocator}")
        for s in sides[1:]:
            run["ours"](xs[s]), run["diffusers"](xs[s])
        for _ in range(repeats):
            for s in sides:
                for name, forward in run.items():
                    t0 = time.perf_counter()
                    forward(xs[s])
                    times[name, s].append(time.perf_counter() - t0)
    def ratio(a, b):  # median over rounds of one round's a / b: a load change within a round hits both
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    print(f"forward time, median of {repeats} interleaved rounds; ratios are medians of each round's ratio")
    print(f"{'latents':>9s} {'tokens':>7s} {'ours ms':>9s} {'diffusers ms':>13s} {'ours/diffusers':>15s}")
    for s in sides:
        print(f"{s:4d}x{s:<4d} {s * s:7d} {statistics.median(times['ours', s]) * 1e3:9.1f} "
              f"{statistics.median(times['diffusers', s]) * 1e3:13.1f} {ratio(('ours', s), ('diffusers', s)):15.2f}")
    for s0, s1 in zip(sides, sides[1:]):
        ours, theirs = ratio(("ours", s1), ("ours", s0)), ratio(("diffusers", s1), ("diffusers", s0))
        print(f"{s0}x{s0} -> {s1}x{s1} ({s1 * s1 / (s0 * s0):.0f}x tokens): ours {ours:.2f}x the time, "
              f"diffusers {theirs:.2f}x")


if __name__ == "__main__":
    main()
