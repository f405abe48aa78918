"""
Pixel space or a tiny DC-AE's latent space for the laptop model? Issue 3, "Also decide, by measurement".

SANA works in the latent space of DC-AE (SANA Sec. 2.1): f32, a 1024px image becomes 32x32x32. On the 32x32
shapes world an f32 autoencoder would leave one latent pixel, so the question is asked with a tiny f4 DC-AE
(3 stages of ResBlocks, model.DCAEEncoder / DCAEDecoder): 32x32x3 -> 8x8xC. A latent DiT with patch 1 on 8x8
sees 64 tokens, the same number as the pixel model's patch 4 on 32x32, at the same width, depth and text states
(model.PRESETS["shapes-pixel"]), so the two arms differ only in the space they denoise.

1. autoencoder: encoder + decoder trained with MSE on ground-truth renders (ShapesData images, Adam) for
   --ae_minutes. Reported: reconstruction MSE and the checker's score on reconstructions of the eval set's
   ground-truth renders (4 per prompt). Its scaling factor is set to 1 / std of its latents (measured on renders
   it was not trained on), as SANA's 0.41407 normalises dc-ae-f32c32's, and it is saved with save_pretrained.
2. latent:    the latent DiT (in_channels C, patch 1, vae = the saved decoder) trained on x -> encoder(x) * scale,
              with the encoder frozen, for --minutes minus the autoencoder's training time.
3. pixel:     the pixel-space laptop model (PRESETS["shapes-pixel"], config/shapes.py) trained for --minutes.
Equal total CPU time is the fair comparison: the autoencoder is part of the latent pipeline's cost, and the
latent arm pays for encoding every batch inside its own budget. Both arms see the same batches (prompts and
images), noise, timesteps and caption dropout (train.flow_loss draws them from (seed, step, sample)), the same
optimizer, lr schedule and clipping, and the same initial seed. Both are scored with the checker on 4 images per
eval prompt (GenEval's protocol), DPM-Solver++ 20 steps, cfg 4.5, the training flow shift; latents are decoded
with the autoencoder's decoder (sample.load_decoder, through the DiT's config.vae).

Deviations from train.py, on purpose: the DiTs are trained by this file's loop (train.flow_loss,
train.make_optimizer, train.lr_at: the same step as train.train) rather than by train.train(), because
train.train() builds its data from cfg.data and cannot take the latent wrapper without monkeypatching, and
because its --max_minutes counts wall time. The budget here is CPU time of this process (time.process_time(),
one thread): the machine is shared, and wall time would charge each arm for the other jobs running at its time.
Wall time is recorded next to it. Sampling and checker scoring are not training and are not counted.

Outputs in --out: results.json, results.md (table with the exact command), samples_pixel.png,
samples_latent.png, ae_reconstructions.png, ae_encoder.safetensors / ae_decoder.safetensors (our DC-AE format),
latent_dit.safetensors / pixel_dit.safetensors (our DiT format, with the training config in the metadata).

    python experiments/latent_vs_pixel.py --out out/exp_latent --minutes 10     # the measurement (~30 min)
    python experiments/latent_vs_pixel.py --out /tmp/l --quick                  # seconds: tiny sizes (tests)

Time: 2 x --minutes of CPU time for the training (AE + latent DiT, then the pixel DiT), plus about a minute per
arm for sampling 4 x 89 eval images; on a shared core the wall time is longer by the other jobs' share.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: the machine's other core runs someone else's job

import argparse
import dataclasses
import math
import shlex
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # experiments/: common.py (which adds the repo root)
from common import base_config, write_json, write_text  # noqa: E402
import shapes  # noqa: E402
from autoencoder import LatentData, evaluate_autoencoder, latent_scale, train_autoencoder  # noqa: E402
from model import PRESETS, DCAEConfig, DCAEDecoder, DCAEEncoder, LinearDiT, save_model  # noqa: E402
from sample import generate, load_decoder, make_noise  # noqa: E402
from train import flow_loss, lr_at, make_optimizer  # noqa: E402

QUICK = dict(preset="shapes-tiny", batch_size=4, ae_batch_size=4, ae_widths="8,16,16", latent_channels=8,
             minutes=0.05, ae_minutes=0.02, ae_max_steps=5, max_steps=4, calib_images=16, eval_prompts=1,
             eval_steps=2, log_every=1, warmup_steps=1)
GRID_PER_CATEGORY = 4  # prompts per category in the sample grids (image 0 of each)

# -----------------------------------------------------------------------------
# settings


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/exp_latent", help="folder for results, samples and checkpoints")
    p.add_argument("--config", default="config/shapes.py", help="the laptop training settings (both arms)")
    p.add_argument("--preset", default="shapes-pixel", help="model.PRESETS architecture of the pixel arm; the latent "
                                                       "arm copies its width, depth and text settings")
    p.add_argument("--minutes", type=float, default=10.0, help="CPU-minutes per arm (the latent arm's AE included)")
    p.add_argument("--ae_minutes", type=float, default=3.0, help="CPU-minutes of autoencoder training")
    p.add_argument("--ae_widths", default="16,32,64", help="channels of the 3 stages (f4); 4 widths would be f8")
    p.add_argument("--latent_channels", type=int, default=16, help="C of the 8x8xC latent")
    p.add_argument("--ae_batch_size", type=int, default=32)
    p.add_argument("--ae_lr", type=float, default=1e-3)
    p.add_argument("--calib_images", type=int, default=1024, help="renders that set the latent scaling factor")
    p.add_argument("--batch_size", type=int, default=None, help="DiT batch; default: the config's (64)")
    p.add_argument("--warmup_steps", type=int, default=None, help="default: the config's (100)")
    p.add_argument("--max_steps", type=int, default=0, help="cap on DiT steps per arm; 0: the time budget only")
    p.add_argument("--ae_max_steps", type=int, default=0, help="train the autoencoder exactly this many steps instead of --ae_minutes; 0: the time budget")
    p.add_argument("--eval_prompts", type=int, default=0, help="0: the whole eval set; n: the first n per category")
    p.add_argument("--images_per_prompt", type=int, default=shapes.IMAGES_PER_PROMPT)
    p.add_argument("--eval_steps", type=int, default=20)
    p.add_argument("--eval_cfg", type=float, default=4.5)
    p.add_argument("--sampler", choices=["dpm++", "euler"], default="dpm++")
    p.add_argument("--log_every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny models, a few steps: seconds, for tests")
    first, _ = p.parse_known_args(argv)
    if first.quick:
        p.set_defaults(**QUICK)  # flags given explicitly still win
    args = p.parse_args(argv)
    if not 0 < args.ae_minutes < args.minutes:
        raise SystemExit(f"error: need 0 < --ae_minutes ({args.ae_minutes}) < --minutes ({args.minutes}): the latent "
                         f"arm trains its DiT for the difference")
    try:
        args.ae_widths = tuple(int(w) for w in args.ae_widths.split(","))
    except ValueError:
        raise SystemExit(f"error: --ae_widths={args.ae_widths!r}: give comma-separated integers, "
                         f"e.g. 16,32,64") from None
    if args.preset not in PRESETS or PRESETS[args.preset].vae:
        raise SystemExit(f"error: --preset {args.preset!r} must be a pixel-space preset: "
                         f"{', '.join(k for k, c in PRESETS.items() if not c.vae)}")
    for name in ("latent_channels", "ae_batch_size", "calib_images", "images_per_prompt", "eval_steps", "log_every"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name} must be >= 1")
    return args


def ae_config(args):
    """The tiny DC-AE (3 widths: f4): ResBlock stages only, no EfficientViT attention.
    results.md says how well it reconstructs."""
    n = len(args.ae_widths)
    try:
        return DCAEConfig(latent_channels=args.latent_channels, widths=args.ae_widths, encoder_depths=(1,) * n,
                          decoder_depths=(1,) * n, block_types=("ResBlock",) * n, qkv_multiscales=((),) * n,
                          scaling_factor=1.0)
    except ValueError as e:
        raise SystemExit(f"error: --ae_widths/--latent_channels: {e}") from None


def latent_dit_config(pixel, latent_channels, vae):
    """The pixel preset with C input channels and patch 1: the same width, depth, heads and text states."""
    return dataclasses.replace(pixel, in_channels=latent_channels, patch_size=1, vae=vae)


# -----------------------------------------------------------------------------
# the autoencoder


# -----------------------------------------------------------------------------
# the DiTs: one loop for both arms, and scoring


def train_dit(model, data, cfg, seconds, max_steps=0):
    """train.train()'s step (warmup, flow loss, clip, optimizer) on one process until `seconds` of CPU time."""
    opt = make_optimizer(model.parameters(), cfg)
    y_null, mask_null = data.null()
    losses, step, cpu0, wall0 = [], 0, time.process_time(), time.time()
    model.train()
    while (step == 0 or time.process_time() - cpu0 < seconds) and (not max_steps or step < max_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        batch = data.get_batch(step, cfg.batch_size)  # the latent arm encodes inside its own budget
        loss = flow_loss(model, batch, y_null, mask_null, step, 0, cfg, nullcontext())
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % cfg.log_every == 0:
            losses.append((step, loss.item()))
            if not math.isfinite(losses[-1][1]):
                raise SystemExit(f"error: loss is {losses[-1][1]} at step {step}; lower the config's lr")
            if step % (5 * cfg.log_every) == 0:
                print(f"  step {step}: loss {losses[-1][1]:.4f} ({(time.process_time() - cpu0) / 60:.1f} CPU-min)",
                      flush=True)
    tail = [l for _, l in losses[-max(1, len(losses) // 10):]]  # one batch's loss is noisy: last 10% of the log
    return {"steps": step, "cpu_seconds": time.process_time() - cpu0, "wall_seconds": time.time() - wall0,
            "losses": losses, "final_loss": sum(tail) / len(tail) if tail else None}


def eval_prompts(n_per_category):
    prompts, per = shapes.load_eval_prompts(), {}
    return [p for p in prompts if not n_per_category
            or per.setdefault(p.category, []).append(p) or len(per[p.category]) <= n_per_category]


@torch.no_grad()
def sample_eval(model, text, decode, prompts, side, args, shift, batch_size=64):
    """args.images_per_prompt images per prompt, in prompt order: (P * n, 3, H, W) in [-1, 1]. Image j of
    prompt i starts from make_noise(seed, i, j) in the model's own space: (C, side, side), side = 8 for f4 latents."""
    c = model.config
    jobs = [(i, j) for i in range(len(prompts)) for j in range(args.images_per_prompt)]
    y_null, mask_null = text([""])
    model.eval()
    out = []
    for b in range(0, len(jobs), batch_size):
        chunk = jobs[b:b + batch_size]
        y, mask = text([prompts[i].text for i, _ in chunk])
        noise = torch.stack([make_noise(args.seed, i, j, (c.in_channels, side, side)) for i, j in chunk])
        x = generate(model, y, mask, y_null, mask_null, noise, steps=args.eval_steps, cfg=args.eval_cfg, shift=shift,
                     sampler=args.sampler)
        out.append(decode(x).float().clamp(-1, 1))
    return torch.cat(out)


def overall_stderr(result, counts):
    """Binomial standard error of the overall score (mean of the six category accuracies)."""
    var = sum(result[c] * (1 - result[c]) / n for c, n in counts.items())
    return math.sqrt(var) / len(counts)


def grid_indices(prompts, n_images):
    """Image 0 of the first GRID_PER_CATEGORY prompts of each category."""
    seen = {}
    return [i * n_images for i, p in enumerate(prompts)
            if seen.setdefault(p.category, []).append(i) or len(seen[p.category]) <= GRID_PER_CATEGORY]


# -----------------------------------------------------------------------------
# report


def verdict(res):
    m, se = res["margin"], res["margin_stderr"]
    z = f"{m / se:+.1f} standard errors" if se > 0 else "no spread measured"
    head = "A tie" if m == 0 else f"**{res['winner']} space wins** by {abs(m):.3f}"
    return f"{head} overall (latent minus pixel {m:+.3f}, {z})."


def markdown(res, command):
    cols = list(shapes.TABLE_COLUMNS.values())
    head = "| space | AE CPU-min | DiT steps | DiT CPU-min | final loss | " + " | ".join(cols) + " | +- |\n"
    head += "|" + "---|" * (6 + len(cols)) + "\n"
    rows = []
    for name in ("latent", "pixel"):
        a = res["arms"][name]
        ae = f"{res['autoencoder']['cpu_seconds'] / 60:.1f}" if name == "latent" else "0"
        cells = [f"{a['checker'][k]:.3f}" for k in shapes.TABLE_COLUMNS]
        rows.append(f"| {a['space']} | {ae} | {a['steps']} | {a['cpu_seconds'] / 60:.1f} | {a['final_loss']:.4f} | "
                    + " | ".join(cells) + f" | {a['stderr']:.3f} |")
    ae = res["autoencoder"]
    notes = (f"\nAutoencoder: f4 DC-AE, widths {ae['widths']}, {ae['params'] / 1e6:.2f}M parameters, "
             f"{ae['steps']} steps in {ae['cpu_seconds'] / 60:.1f} CPU-min; scaling factor {ae['scaling_factor']:.4f}; "
             f"reconstruction MSE {ae['mse']:.5f}; checker on reconstructions of the eval renders "
             f"{ae['checker']['overall']:.3f} (ground truth {ae['checker_ground_truth']['overall']:.3f}).\n"
             f"Budget: {res['minutes']:g} CPU-minutes per arm (one thread, time.process_time); the latent arm's DiT "
             f"trains for that minus the autoencoder's training time, so both pipelines cost the same CPU time. "
             f"Final loss: mean of the last 10% of logged losses; pixel and latent losses are in different units "
             f"and are not comparable across rows. +-: binomial standard error of Overall. "
             f"Scored on {res['n_images']} images per arm ({res['images_per_prompt']} per eval prompt), "
             f"{res['sampler']} {res['eval_steps']} steps, cfg {res['eval_cfg']}.\n\n"
             f"{verdict(res)}\n")
    return f"```\n{command}\n```\n\n{head}" + "\n".join(rows) + "\n" + notes


# -----------------------------------------------------------------------------
# the experiment


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(1)
    given = {k: getattr(args, k) for k in ("batch_size", "warmup_steps") if getattr(args, k) is not None}
    cfg = base_config(args.config, preset=args.preset, seed=args.seed, log_every=args.log_every, progress=False,
                      out_dir=args.out, **given)
    out = lambda name: os.path.join(args.out, name)
    os.makedirs(args.out, exist_ok=True)
    pixel_cfg = PRESETS[args.preset]
    text = shapes.CaptionCache(shapes.laptop_text_encoder(pixel_cfg.text_encoder, pixel_cfg.text_max_length))
    data = shapes.ShapesData(cfg.image_size, cfg.seed, text)  # the DiTs' stream, the same for both arms
    prompts = eval_prompts(args.eval_prompts)
    groups = [p for p in prompts for _ in range(args.images_per_prompt)]
    counts = {c: sum(p.category == c for p in groups) for c in shapes.CATEGORIES}
    counts = {c: n for c, n in counts.items() if n}

    # 1. the autoencoder: its own render stream (seed + 1), calibrated on another (seed + 2)
    print(f"autoencoder: training for {args.ae_minutes} CPU-min", flush=True)
    torch.manual_seed(args.seed)
    enc, dec = DCAEEncoder(ae_config(args)), DCAEDecoder(ae_config(args))
    ae = train_autoencoder(enc, dec, shapes.ShapesData(cfg.image_size, args.seed + 1), args.ae_max_steps,
                           args.ae_batch_size, args.ae_lr, 60 * args.ae_minutes, 10 * args.log_every)
    scale, mean = latent_scale(enc, shapes.ShapesData(cfg.image_size, args.seed + 2), args.calib_images)
    enc.config = dec.config = dataclasses.replace(enc.config, scaling_factor=scale)
    enc.save_pretrained(out("ae_encoder.safetensors"))
    dec.save_pretrained(out("ae_decoder.safetensors"))
    scores, gt, rec = evaluate_autoencoder(enc, dec, prompts, args.images_per_prompt, cfg.image_size, args.seed)
    ae.update(scores, scaling_factor=scale, latent_mean=mean, widths=list(args.ae_widths),
              latent_channels=args.latent_channels, params=sum(p.numel() for m in (enc, dec) for p in m.parameters()))
    print(f"autoencoder: {ae['steps']} steps, mse {ae['mse']:.5f}, checker on reconstructions "
          f"{ae['checker']['overall']:.3f}, scaling factor {scale:.4f}", flush=True)
    idx = grid_indices(prompts, args.images_per_prompt)
    pairs = torch.stack([gt[idx], rec[idx]], dim=1).flatten(0, 1)  # ground truth, reconstruction, ...
    shapes.save_grid(pairs, [t for i in idx for t in ("gt: " + groups[i].text, "ae: " + groups[i].text)],
                     out("ae_reconstructions.png"))

    # 2. and 3. the two DiTs for the same total CPU time
    arms = {}
    budgets = {"latent": 60 * args.minutes - ae["cpu_seconds"], "pixel": 60 * args.minutes}
    mcfgs = {"latent": latent_dit_config(pixel_cfg, args.latent_channels, out("ae_decoder.safetensors")),
             "pixel": pixel_cfg}
    streams = {"latent": LatentData(data, enc), "pixel": data}
    sides = {"latent": cfg.image_size // enc.factor, "pixel": cfg.image_size}
    spaces = {"latent": f"latent {sides['latent']}x{sides['latent']}x{args.latent_channels}, patch 1",
              "pixel": f"pixel {cfg.image_size}x{cfg.image_size}x3, patch {pixel_cfg.patch_size}"}
    for name in ("latent", "pixel"):
        print(f"{name} DiT: training for {budgets[name] / 60:.2f} CPU-min", flush=True)
        torch.manual_seed(cfg.seed)  # the same seed (the first layer's shapes differ, so not the same weights)
        model = LinearDiT(mcfgs[name])
        run = train_dit(model, streams[name], cfg, budgets[name], args.max_steps)
        save_model(model, out(f"{name}_dit.safetensors"), step=run["steps"], train_config=dataclasses.asdict(cfg))
        decode = load_decoder(model.config.vae, torch.device("cpu"))[0]  # the saved decoder, / scaling factor
        images = sample_eval(model, text, decode, prompts, sides[name], args, cfg.flow_shift)
        result = shapes.evaluate(images, groups)
        run.update(space=spaces[name], budget_seconds=budgets[name], checker=result,
                   stderr=overall_stderr(result, counts), params=sum(p.numel() for p in model.parameters()))
        arms[name] = run
        shapes.save_grid(images[idx], [groups[i].text for i in idx], out(f"samples_{name}.png"))
        print(shapes.format_table(result, name=name), flush=True)

    margin = arms["latent"]["checker"]["overall"] - arms["pixel"]["checker"]["overall"]
    res = {"command": "python experiments/latent_vs_pixel.py " + " ".join(shlex.quote(a) for a in argv),
           "settings": dict(vars(args), ae_widths=list(args.ae_widths), train_config=dataclasses.asdict(cfg)),
           "minutes": args.minutes, "images_per_prompt": args.images_per_prompt, "n_images": len(groups),
           "sampler": args.sampler, "eval_steps": args.eval_steps, "eval_cfg": args.eval_cfg,
           "autoencoder": ae, "arms": arms, "margin": margin,
           "margin_stderr": math.hypot(arms["latent"]["stderr"], arms["pixel"]["stderr"]),
           "winner": "tie" if margin == 0 else ("latent" if margin > 0 else "pixel")}
    write_json(out("results.json"), res)
    table = markdown(res, res["command"])
    write_text(out("results.md"), table)
    print(table)
    return res


if __name__ == "__main__":
    main()
