"""
Real-scale speed on one GPU, random weights and synthetic inputs (no downloads): the figures behind the README's
"On GPU nodes" numbers.

1. Training (train.py's own flow_loss, bf16 autocast over fp32 weights): steps/s, images/s, peak memory and
   model-FLOPs utilisation of a preset at 1024px (32x32 latents), with CAME-8bit and with AdamW, with and without
   gradient checkpointing; the peak memory sits next to train.py --dry_run's estimate for the same setting.
   Model FLOPs are 3 x the forward's as torch's FlopCounterMode counts them (recomputation not counted), and
   MFU divides them by the step time and by the bf16 peak of the card (datasheet, dense) and of a measured
   8192^3 bf16 matrix product.
2. Inference as the paper's Table 1 measures it (A100, bf16): latency at batch 1, 20 DPM-Solver++ steps with
   classifier-free guidance (a batch of 2 through the DiT), 1024px; throughput at batch 10. Each pass is the whole
   pipeline: a random Gemma-2-2B-sized text encoder (transformers) over 300 + 200 tokens (the prompt budget plus
   about the length of SANA's instruction prefix), the DiT, and the f32c32 DC-AE decoder.

    python bench/gpu_bench.py                       # on a GPU: the defaults below
    python bench/gpu_bench.py --tiny=True           # a seconds-long smoke run of every path, CPU or GPU
"""

import dataclasses
import io
import json
import os
import statistics
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root
from came8bit import CAME8bit  # noqa: E402
from model import DCAE_PRESETS, PRESETS, DCAEDecoder, LinearDiT  # noqa: E402
from sample import generate  # noqa: E402
from train import TrainConfig, dry_run, flow_loss  # noqa: E402

# defaults, overridden by --key=value
train_preset = "sana1.5-1.6b"
infer_presets = "sana1.5-1.6b,sana1.5-4.8b"  # "none": training rows only
size = 1024  # image side; latents are size / 32
train_batch = 8
train_steps = 10  # timed steps after 3 warm-up steps
text_tokens = 500  # text-encoder input length at inference (300 prompt tokens + ~200 of the instruction prefix)
latency_repeats = 3
throughput_batch = 10
tiny = False  # smoke test: tiny models, 64px, 2 steps
out = os.environ.get("OUT", "out")

PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, datasheets


def parse_args(argv):
    known = {k: type(v) for k, v in globals().items()
             if k in ("train_preset", "infer_presets", "size", "train_batch", "train_steps", "text_tokens",
                      "latency_repeats", "throughput_batch", "tiny", "out")}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__)
            print("options: " + ", ".join(f"--{k}={globals()[k]}" for k in known))
            sys.exit(0)
        key, _, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or key not in known or not value:
            raise SystemExit(f"bad argument {arg!r}; use --key=value with key in {sorted(known)}")
        if known[key] is bool and value.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise SystemExit(f"bad argument {arg!r}: --{key} takes True or False")
        try:
            globals()[key] = (value.lower() in ("1", "true", "yes")) if known[key] is bool else known[key](value)
        except ValueError:
            raise SystemExit(f"bad argument {arg!r}: --{key} takes a {known[key].__name__}") from None


device = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t0 = time.perf_counter()
    r = fn()
    sync()
    return time.perf_counter() - t0, r


def peak_of_card():
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name()
    sheet = next((v for k, v in PEAK_BF16.items() if k in name), None)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    ts = [timed(lambda: a @ b)[0] for _ in range(10)]
    return sheet, 2 * 8192 ** 3 / statistics.median(ts)


def model_config(name):
    cfg = PRESETS[name]
    if tiny:
        cfg = dataclasses.replace(cfg, hidden_size=128, depth=2, cross_heads=4, caption_channels=64)
    return cfg


def text_states(B, cfg):
    y = torch.randn(B, cfg.text_max_length, cfg.caption_channels, device=device)
    mask = torch.zeros(B, cfg.text_max_length, device=device)
    mask[:, :120] = 1  # a typical prompt after the instruction prefix is cut away
    return y, mask


# -----------------------------------------------------------------------------
# 1. training


def train_run(name, optimizer, checkpointing, B, peaks):
    cfg = dataclasses.replace(model_config(name), grad_checkpointing=checkpointing)
    tcfg = TrainConfig(flow_shift=3.0)
    torch.manual_seed(0)
    model = LinearDiT(cfg).to(device)
    opt = (CAME8bit(model.parameters(), lr=1e-5) if optimizer == "came8bit" else
           torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-10))
    side = size // 32
    batch = {"x": torch.randn(B, cfg.in_channels, side, side, device=device)}
    batch["y"], batch["mask"] = text_states(B, cfg)
    y_null, mask_null = text_states(1, cfg)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def fwd_bwd(step):
        loss = flow_loss(model, batch, y_null, mask_null, step, 0, tcfg, autocast)
        loss.backward()
        return loss

    def step(i):
        t_fb, loss = timed(lambda: fwd_bwd(i))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        t_opt, _ = timed(opt.step)
        opt.zero_grad(set_to_none=True)
        return t_fb, t_opt, loss

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(3):
        step(i)
    times = [step(3 + i) for i in range(train_steps)]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    # Model FLOPs = 3 x the forward's (backward = 2 x forward, recomputation not counted). The forward is counted
    # by torch; its backward count is not used: it prices the depthwise 3x3 conv's backward as a dense conv.
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        flow_loss(model, batch, y_null, mask_null, 99, 0, tcfg, autocast)
    flops = 3 * fc.get_total_flops()
    t_fb = statistics.median(t[0] for t in times)
    t_opt = statistics.median(t[1] for t in times)
    t_step = t_fb + t_opt
    with redirect_stdout(io.StringIO()):  # train.py --dry_run's estimate for the same setting
        rows = dry_run(TrainConfig(preset=name, image_size=size, batch_size=B, grad_checkpointing=checkpointing,
                                   dtype="bfloat16")) if not tiny else []
    estimate = next((total / 2**30 for o, _, total in rows if o == optimizer), float("nan"))
    params = sum(p.numel() for p in model.parameters())
    row = {"preset": name, "optimizer": optimizer, "grad_checkpointing": checkpointing, "batch": B,
           "params": params, "fwd_bwd_s": t_fb, "opt_step_s": t_opt, "step_s": t_step, "steps_per_s": 1 / t_step,
           "images_per_s": B / t_step, "model_tflop_per_step": flops / 1e12,
           "mfu_datasheet": flops / t_step / peaks[0] if peaks[0] else None,
           "mfu_measured_matmul": flops / t_step / peaks[1] if peaks[1] else None,
           "peak_mem_gib": peak, "dry_run_estimate_gib": estimate, "final_loss": times[-1][2].item()}
    del model, opt, batch
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


# -----------------------------------------------------------------------------
# 2. inference (Table 1)


def text_encoder():
    from transformers import Gemma2Config, Gemma2Model
    c = (Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=32, vocab_size=1000) if tiny else
         Gemma2Config(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                      num_key_value_heads=4, head_dim=256, vocab_size=256000))  # Gemma-2-2B's shapes
    with torch.device(device):
        return Gemma2Model(c).to(torch.bfloat16).eval()


def infer_run(name, enc, dec):
    cfg = model_config(name)
    torch.manual_seed(0)
    with torch.device(device):
        model = LinearDiT(cfg).to(torch.bfloat16).eval()
    params = sum(p.numel() for p in model.parameters())
    side = size // 32
    vocab = enc.config.vocab_size
    tokens = 16 if tiny else text_tokens

    @torch.no_grad()
    def pipeline(B):
        ids = torch.randint(0, vocab, (B, tokens), device=device)
        h = enc(input_ids=ids).last_hidden_state[:, -cfg.text_max_length:]  # (B, <=300, 2304)
        y = torch.zeros(B, cfg.text_max_length, cfg.caption_channels, device=device, dtype=torch.bfloat16)
        y[:, :h.shape[1], :h.shape[2]] = h[..., :cfg.caption_channels]
        mask = torch.ones(B, cfg.text_max_length, device=device)
        y_null, mask_null = y[:1], mask[:1]
        noise = torch.randn(B, cfg.in_channels, side, side, device=device, dtype=torch.bfloat16)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            x = generate(model, y, mask, y_null, mask_null, noise, steps=2 if tiny else 20, cfg=4.5, shift=3.0)
            return dec(x.to(torch.bfloat16))

    pipeline(1)  # warm-up
    lat = statistics.median(timed(lambda: pipeline(1))[0] for _ in range(latency_repeats))
    pipeline(throughput_batch)
    tput = throughput_batch / statistics.median(timed(lambda: pipeline(throughput_batch))[0] for _ in range(2))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        y, mask = text_states(2, cfg)
        model(torch.randn(2, cfg.in_channels, side, side, device=device, dtype=torch.bfloat16),
              torch.full((2,), 500.0, device=device), y.to(torch.bfloat16), mask)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"preset": name, "params": params, "latency_s": lat, "throughput_samples_per_s": tput,
            "dit_tflop_per_step_cfg": fc.get_total_flops() / 1e12}


def main():
    parse_args(sys.argv[1:])
    global size, train_steps, latency_repeats, throughput_batch
    if tiny:
        size, train_steps, latency_repeats, throughput_batch = 64, 2, 1, 2
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peaks = peak_of_card()
    print(f"device: {name}; torch {torch.__version__}; bf16 peak: datasheet "
          f"{peaks[0] / 1e12 if peaks[0] else float('nan'):.0f} TFLOP/s, "
          f"measured 8192^3 matmul {peaks[1] / 1e12 if peaks[1] else float('nan'):.0f} TFLOP/s", flush=True)
    report = {"device": name, "torch": torch.__version__, "peak_datasheet": peaks[0], "peak_matmul": peaks[1],
              "size": size, "train": [], "inference": []}
    for optimizer, ckpt in (("came8bit", False), ("adamw", False), ("came8bit", True)):
        r = train_run(train_preset, optimizer, ckpt, train_batch, peaks)
        report["train"].append(r)
        print(json.dumps(r), flush=True)
    presets = [] if infer_presets == "none" else infer_presets.split(",")
    if presets:
        dcfg = DCAE_PRESETS["shapes-tiny" if tiny else "dc-ae-f32c32"]
        with torch.device(device):
            dec = DCAEDecoder(dcfg).to(torch.bfloat16).eval()
        enc = text_encoder()
    for p in presets:
        r = infer_run(p, enc, dec)
        report["inference"].append(r)
        print(json.dumps(r), flush=True)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu_bench.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"\n{name}, {size}px, bf16 autocast, random weights")
    print(f"{'train':14s} {'optimizer':9s} {'ckpt':>5s} {'batch':>5s} {'img/s':>7s} {'opt ms':>7s} {'MFU':>6s} "
          f"{'MFU*':>6s} {'peak GiB':>9s} {'dry_run GiB':>11s}")
    for r in report["train"]:
        print(f"{r['preset']:14s} {r['optimizer']:9s} {str(r['grad_checkpointing']):>5s} {r['batch']:5d} "
              f"{r['images_per_s']:7.2f} {r['opt_step_s'] * 1e3:7.1f} {r['mfu_datasheet'] or float('nan'):6.1%} "
              f"{r['mfu_measured_matmul'] or float('nan'):6.1%} {r['peak_mem_gib']:9.1f} "
              f"{r['dry_run_estimate_gib']:11.1f}")
    print("MFU: model FLOPs / step time / datasheet dense bf16 peak; MFU*: / the measured matmul rate")
    print(f"{'inference':14s} {'params':>7s} {'latency s (b=1)':>16s} {'samples/s (b=10)':>17s}")
    for r in report["inference"]:
        print(f"{r['preset']:14s} {r['params'] / 1e9:6.2f}B {r['latency_s']:16.2f} "
              f"{r['throughput_samples_per_s']:17.2f}")
    print("paper Table 1 (A100, bf16): SANA-1.0 1.6B 1.2 s, 1.0 samples/s; SANA-1.5 4.8B 4.2 s, 0.26 samples/s")


if __name__ == "__main__":
    main()
