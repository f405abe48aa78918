"""
CAME-8bit memory and speed (SANA-1.5 Sec. 2.3, Eq. 2): the figures behind the README's optimizer table.

1. Optimizer-state bytes per parameter for every preset in model.PRESETS, from shapes alone (the models are
   built on the meta device, nothing is allocated): CAME-8bit, CAME-32, AdamW-32 (8 B/param) and
   bitsandbytes-style AdamW-8bit, the ratio to AdamW-32, and the paper's Eq. 2 estimate of the bytes saved
   next to the bytes actually saved against AdamW-32.
2. Bytes held between steps: everything reachable from the optimizer object after one step
   (came8bit.optimizer_held_bytes: state plus any buffer it keeps), for CAME-8bit and AdamW-32, every preset
   and two Linear(1024, 1024), stepped on the meta device (which stacks matrices at the GPU limit).
3. The laptop model ("shapes" preset) with real tensors: measured state and held bytes after one step (the
   state must equal the prediction) and the optimizer step time of CAME8bit against torch.optim.AdamW,
   interleaved in one run, each round in a rotated order: median over rounds of the time, and of each round's
   ratio to AdamW's. Gradients are fixed random tensors, so only the optimizer step is timed. With
   --compile=True also CAME-8bit with compile=True (its first step, which compiles, is timed on its own).

4. With --stacks: CAME-8bit also at other stack limits (came8bit.MAX_STACK, values per stack of same-shape
   matrices), timed in the same interleaved rounds; on a GPU this is where the limit was chosen.

    python bench/came8bit_bench.py                 # defaults below
    python bench/came8bit_bench.py --threads=1 --repeats=15
    python bench/came8bit_bench.py --threads=2 --compile=True
    python bench/came8bit_bench.py --device=cuda --timing_preset=sana1.5-1.6b --stacks=22 --repeats=5 --steps=3
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: came8bit.py, model.py
import came8bit  # noqa: E402
from came8bit import (CAME8bit, eq2_saved_bytes, optimizer_held_bytes, optimizer_state_bytes,  # noqa: E402
                      predicted_state_bytes)
from model import LinearDiT, PRESETS  # noqa: E402

# defaults, overridden by --key=value
threads = 0  # torch threads for the timing; 0 keeps torch's default
repeats = 11  # timing rounds; each round times every optimizer once, in turn
steps = 5  # optimizer steps per optimizer per round
lr = 1e-4
timing_preset = "shapes"  # the laptop model
device = "cpu"  # or "cuda": the timing on a GPU (synchronised around every round)
stacks = ""  # e.g. "22,26,30": also CAME-8bit with came8bit.MAX_STACK = 2^e on this device
compile = False  # also time CAME-8bit with compile=True


def parse_args(argv):
    known = {"threads": int, "repeats": int, "steps": int, "lr": float, "timing_preset": str, "device": str,
             "stacks": str, "compile": str}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__)
            print("options: " + ", ".join(f"--{k}={globals()[k]}" for k in known))
            sys.exit(0)
        key, _, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or key not in known or not value:
            raise SystemExit(f"bad argument {arg!r}; use --key=value with key in {sorted(known)}")
        globals()[key] = known[key](value)
    if timing_preset not in PRESETS:
        raise SystemExit(f"unknown preset {timing_preset!r}; choose from {sorted(PRESETS)}")
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise SystemExit(f"bad --device={device!r}: use cpu, or cuda on a machine with a GPU")
    if stacks and not all(e.strip().isdigit() and 0 < int(e) < 40 for e in stacks.split(",")):
        raise SystemExit(f"bad --stacks={stacks!r}: comma-separated exponents e (MAX_STACK = 2^e), e.g. 22,26,30")
    if str(compile).lower() not in ("true", "false"):
        raise SystemExit(f"bad --compile={compile!r}: use True or False")
    globals()["compile"] = str(compile).lower() == "true"


def memory_table():
    print("optimizer-state bytes per parameter (exact arithmetic from shapes; ratio = / AdamW-32)")
    header = (f"{'preset':14s} {'params':>8s} {'CAME-8bit':>10s} {'CAME-32':>8s} {'AdamW-32':>9s} "
              f"{'AdamW-8bit':>10s} {'8bit/AdamW':>10s} {'saved GB':>9s} {'Eq.2 GB':>8s}")
    print(header)
    for name, cfg in PRESETS.items():
        with torch.device("meta"):
            params = list(LinearDiT(cfg).parameters())
        n = sum(p.numel() for p in params)
        b = {o: predicted_state_bytes(params, o) for o in ("came8bit", "came", "adamw", "adamw8bit")}
        saved = b["adamw"] - b["came8bit"]
        print(f"{name:14s} {n / 1e6:7.1f}M {b['came8bit'] / n:10.3f} {b['came'] / n:8.3f} {b['adamw'] / n:9.3f} "
              f"{b['adamw8bit'] / n:10.3f} {b['came8bit'] / b['adamw']:10.4f} {saved / 1e9:9.2f} "
              f"{eq2_saved_bytes(params) / 1e9:8.2f}")
    print("Eq. 2 counts 24 B for every quantized value; against AdamW-32's 8 B/param at most ~7 B can be saved.")


def held_table():
    print("\nbytes held between steps per parameter (everything reachable from the optimizer object after one step "
          "on the meta device)")
    print(f"{'model':18s} {'CAME-8bit':>10s} {'AdamW-32':>9s} {'ratio':>7s}")
    models = {name: (lambda cfg=cfg: LinearDiT(cfg)) for name, cfg in PRESETS.items()}
    models["2x Linear(1024)"] = lambda: torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1024))
    for name, make in models.items():
        with torch.device("meta"):
            params = list(make().parameters())
        n = sum(p.numel() for p in params)
        held = {}
        for opt_name, make_opt in (("came8bit", CAME8bit), ("adamw", torch.optim.AdamW)):
            ps = [torch.nn.Parameter(torch.empty_like(p)) for p in params]
            for p in ps:
                p.grad = torch.empty_like(p)
            opt = make_opt(ps)
            opt.step()
            held[opt_name] = optimizer_held_bytes(opt)
        ours, adamw = held["came8bit"], held["adamw"]
        print(f"{name:18s} {ours / n:10.3f} {adamw / n:9.3f} {ours / adamw:7.4f}")


def make_optimizers(cfg):
    """One model copy per optimizer, same weights and the same fixed random gradients; -> ({name: (optimizer,
    stack limit or None)}, the parameters)."""
    torch.manual_seed(0)
    base = LinearDiT(cfg).to(device)
    grads = [torch.randn_like(p) * 1e-3 for p in base.parameters()]
    makers = {
        "AdamW": (lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=0.0), None),
        "CAME-8bit": (lambda ps: CAME8bit(ps, lr=lr), None),
        "CAME-32": (lambda ps: CAME8bit(ps, lr=lr, quantize=False), None),
    }
    if compile:
        makers["CAME-8bit compiled"] = (lambda ps: CAME8bit(ps, lr=lr, compile=True), None)
    for e in (int(e) for e in stacks.split(",") if stacks):
        makers[f"CAME-8bit 2^{e}"] = (lambda ps: CAME8bit(ps, lr=lr), 2**e)
    opts = {}
    for name, (make, stack) in makers.items():
        params = [p.detach().clone().requires_grad_() for p in base.parameters()]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opts[name] = (make(params), stack)
        t0 = time.perf_counter()
        step(*opts[name])  # allocate the state (and compile) before timing
        if name == "CAME-8bit compiled":
            print(f"CAME-8bit compiled: first step (compiling) {time.perf_counter() - t0:.1f} s")
    return opts, list(base.parameters())


def step(opt, stack):
    """One optimizer step, at stack limit `stack` for this device (None: came8bit.py's own)."""
    if stack is None:
        return opt.step()
    kind = "cpu" if device == "cpu" else "gpu"
    own = came8bit.MAX_STACK[kind]
    came8bit.MAX_STACK[kind] = stack
    try:
        opt.step()
    finally:
        came8bit.MAX_STACK[kind] = own


def timing():
    if threads:
        torch.set_num_threads(threads)
    cfg = PRESETS[timing_preset]
    opts, params = make_optimizers(cfg)
    n = sum(p.numel() for p in params)
    print(f"\n{timing_preset} model, real tensors: {n / 1e6:.2f}M params in {len(params)} tensors")
    predicted = {"AdamW": "adamw", "CAME-8bit": "came8bit", "CAME-32": "came"}
    for name, (opt, _) in opts.items():
        if name in predicted:
            measured, expect = optimizer_state_bytes(opt), predicted_state_bytes(params, predicted[name])
            held = optimizer_held_bytes(opt)
            print(f"  {name:10s} state {measured / n:6.3f} B/param ({measured} bytes, predicted {expect}), "
                  f"held {held / n:6.3f} B/param ({held} bytes)")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = {name: [] for name in opts}
    names = list(opts)
    for r in range(repeats):  # interleaved rounds: machine load drifts hit every optimizer alike
        # each round starts one optimizer later: a step finds the caches as the previous optimizer left them, so a
        # fixed order would favour some optimizers
        for name in names[r % len(names):] + names[:r % len(names)]:
            opt, stack = opts[name]
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                step(opt, stack)
            sync()
            times[name].append((time.perf_counter() - t0) / steps)
    where = torch.cuda.get_device_name() if device == "cuda" else f"cpu, torch threads {torch.get_num_threads()}"
    print(f"optimizer step time, median of {repeats} rounds x {steps} steps, {where}; the ratio to AdamW is the "
          f"median of each round's")
    for name, ts in times.items():
        ratio = statistics.median(t / a for t, a in zip(ts, times["AdamW"]))
        print(f"  {name:18s} {statistics.median(ts) * 1e3:8.2f} ms/step  {ratio:5.2f}x AdamW")


if __name__ == "__main__":
    parse_args(sys.argv[1:])
    memory_table()
    held_table()
    timing()
