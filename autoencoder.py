"""
The laptop's latent space: a tiny DC-AE for the shapes world, trained in a few CPU-minutes.

SANA denoises in the latent space of DC-AE (f32c32: a 1024px image becomes 32x32x32; SANA Sec. 2.1). A 32x32
shapes image would leave one latent pixel at f32, so the laptop uses the same architecture (model.DCAEEncoder /
DCAEDecoder) at f4: three stages of ResBlocks, widths 16/32/64, 32x32x3 -> 8x8x4 (model.DCAE_PRESETS["shapes-c4"]).
Four latent channels, not 16: the DiT learns the smaller latent faster although its autoencoder reconstructs a
little worse (ABLATIONS.md, "Latent channels").

    python autoencoder.py                     # 8x8x4 latents -> out/shapes_ae_c4.safetensors (~6-8 min + 15 min stage 3)
    python autoencoder.py --preset shapes     # 8x8x16 latents -> out/shapes_ae.safetensors
    python autoencoder.py --out /tmp/ae.safetensors --steps 20 --decoder_steps 20  # seconds
    python autoencoder.py --from out/ae_stage2.safetensors    # stage 3 only, on a trained autoencoder

1. train:  MSE reconstruction of ground-truth renders (a stream of its own, seed + 1), Adam, cosine decay.
2. scale:  scaling_factor = 1 / std of the latents over renders it was not trained on (seed + 2), so the DiT
           sees latents of unit variance, as SANA's 0.41407 does for f32c32.
3. decoder: the encoder (and the scale) frozen, the decoder alone fine-tuned to draw the renders from *noisy* latents,
           with an L1 loss (finetune_decoder). Not in SANA, whose DC-AE is given: a DiT's latents are never exactly
           an encoder's, and a decoder that has only seen clean ones draws their small errors as rounded corners,
           which the checker calls circles (box fill < 0.92). With the shipped DiT it lifts N = 1 on the eval
           prompts from 0.62 to 0.70 (ABLATIONS.md, "The decoder stage"). The DiT only ever sees the encoder, so a
           trained DiT keeps working with the new decoder.
4. check:  reconstruction MSE and the shapes checker on reconstructions of the eval set's ground-truth renders
           (4 per prompt), with the decoder as shipped.
The file holds both halves under AutoencoderDC's key prefixes (encoder.*, decoder.*) with the config in the
metadata; DCAEEncoder/DCAEDecoder.from_pretrained read their half. A grid of renders and their reconstructions
is written next to it (<out>_reconstructions.png).

LatentData wraps a data stream (shapes.ShapesData, anything with get_batch/null) so that its batches carry
x = encoder(image) * scaling_factor: train.py and prune.py use it for every model whose config names a vae file.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

import shapes
from model import (DCAE_PRESETS, ArgumentParser, DCAEDecoder, DCAEEncoder, check_flags, local_path, n_params,
                   save_safetensors)

DEFAULT_OUT = {"shapes-c4": "out/shapes_ae_c4.safetensors", "shapes": "out/shapes_ae.safetensors"}  # never weights/

# -----------------------------------------------------------------------------
# latents for the DiT


class LatentData:
    """A data stream in latent space: get_batch(...)["x"] = encoder(x) * scaling_factor, (B, C, H/f, W/f).
    Captions (y, mask, prompts) and null() are the wrapped stream's own. The encoder is frozen and runs on
    `device` (train.py passes the training device: on a GPU the encoder would otherwise cost most of a step)."""

    def __init__(self, data, vae, device="cpu"):
        enc = vae if isinstance(vae, DCAEEncoder) else DCAEEncoder.from_pretrained(local_path(vae))
        self.data, self.enc, self.encoder = data, enc.to(device).eval().requires_grad_(False), data.encoder
        self.device = torch.device(device)

    @torch.no_grad()
    def get_batch(self, step, batch_size, rank=0, world_size=1):
        batch = self.data.get_batch(step, batch_size, rank, world_size)
        batch["x"] = self.enc(batch["x"].to(self.device)) * self.enc.scaling_factor
        return batch

    def null(self):
        return self.data.null()


# -----------------------------------------------------------------------------
# training, scaling, checking


def train_autoencoder(enc, dec, data, steps, batch_size=32, lr=1e-3, log_every=100):
    """MSE on renders with Adam, cosine decay to lr/10. -> {"steps", "wall_seconds", "losses"}."""
    if steps <= 0:
        raise ValueError(f"steps must be > 0, got {steps}")
    opt = torch.optim.Adam(list(enc.parameters()) + list(dec.parameters()), lr=lr)
    losses, step, wall0 = [], 0, time.time()
    enc.train()
    dec.train()
    while step < steps:
        opt.param_groups[0]["lr"] = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        x = data.get_batch(step, batch_size)["x"]  # (B, 3, H, W) in [-1, 1]
        loss = F.mse_loss(dec(enc(x)), x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % log_every == 0:
            losses.append((step, loss.item()))
            print(f"autoencoder step {step}: mse {losses[-1][1]:.5f} ({time.time() - wall0:.0f} s)", flush=True)
    enc.eval()
    dec.eval()
    return {"steps": step, "wall_seconds": time.time() - wall0, "losses": losses}


def finetune_decoder(enc, dec, data, steps, noise=0.8, batch_size=32, lr=5e-4, log_every=100):
    """Stage 3: each render's latent (in the DiT's units, times the scaling factor) gets Gaussian noise of a std
    drawn uniformly in [0, noise]; the decoder learns to draw the clean render from it (L1: the median, a sharp
    shape, where MSE would draw the mean of the shapes the latent could be). Adam, cosine decay to 0. The encoder
    is not touched. -> [(step, loss)] every log_every steps."""
    opt = torch.optim.Adam(dec.parameters(), lr=lr)
    s = enc.scaling_factor
    enc.eval()
    dec.train()
    losses = []
    for step in range(steps):
        opt.param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        x = data.get_batch(step, batch_size)["x"]  # (B, 3, H, W) in [-1, 1]
        with torch.no_grad():
            z = enc(x) * s
        sigma = noise * torch.rand(len(x), 1, 1, 1)
        loss = F.l1_loss(dec((z + sigma * torch.randn_like(z)) / s), x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % log_every == 0:
            losses.append((step + 1, loss.item()))
            print(f"decoder step {step + 1}: l1 {losses[-1][1]:.5f}", flush=True)
    dec.eval()
    return losses


@torch.no_grad()
def latent_scale(enc, data, n, batch_size=256):
    """(1 / std, mean) of the encoder's latents over n renders, all channels and positions pooled."""
    z = torch.cat([enc(data.get_batch(s, min(batch_size, n - s * batch_size))["x"])
                   for s in range(math.ceil(n / batch_size))])  # (n, C, h, w)
    return 1.0 / z.float().std().item(), z.float().mean().item()


@torch.no_grad()
def evaluate_autoencoder(enc, dec, prompts, images_per_prompt, size, seed, batch_size=256):
    """MSE and the checker on reconstructions of the prompts' ground-truth renders -> (scores, renders, recons)."""
    groups = [p for p in prompts for _ in range(images_per_prompt)]
    x = shapes.to_unit(shapes.render_batch([p.spec for p in groups], size, np.random.default_rng(seed)))  # (N, 3, H, W)
    rec = torch.cat([dec(enc(x[i:i + batch_size])) for i in range(0, len(x), batch_size)]).clamp(-1, 1)
    return {"mse": F.mse_loss(rec, x).item(), "checker": shapes.evaluate(rec, groups),
            "checker_ground_truth": shapes.evaluate(x, groups)}, x, rec


def save_autoencoder(enc, dec, path, **meta):
    """Both halves in one .safetensors (AutoencoderDC's encoder./decoder. prefixes), config in the metadata."""
    if dataclasses.asdict(enc.config) != dataclasses.asdict(dec.config):
        raise ValueError("encoder and decoder configs differ; save them with their own save_pretrained")
    tensors = {**{"encoder." + k: v for k, v in enc.state_dict().items()},
               **{"decoder." + k: v for k, v in dec.state_dict().items()}}
    save_safetensors(tensors, path, "nanosana-dcae", enc.config, **meta)


# -----------------------------------------------------------------------------
# the script


def main(argv=None):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="", help="the .safetensors to write (both halves); default: "
                    "out/<preset's name>.safetensors")
    ap.add_argument("--preset", default="shapes-c4", choices=[k for k in DCAE_PRESETS if k != "dc-ae-f32c32"],
                    help="model.DCAE_PRESETS architecture: shapes-c4 (8x8x4 latents, shipped) or shapes (8x8x16)")
    ap.add_argument("--latent_channels", type=int, default=0, help="0: the preset's (shapes 16, shapes-c4 4)")
    ap.add_argument("--steps", type=int, default=1500, help="stage 1 steps")
    ap.add_argument("--batch_size", type=int, default=32, help="renders per step")
    ap.add_argument("--lr", type=float, default=2e-3, help="stage 1 Adam lr (cosine decay)")
    ap.add_argument("--image_size", type=int, default=32, help="render side in pixels")
    ap.add_argument("--calib_images", type=int, default=1024, help="renders that set the scaling factor")
    ap.add_argument("--decoder_steps", type=int, default=15000, help="stage 3, the decoder on noisy latents (0: skip)")
    ap.add_argument("--decoder_noise", type=float, default=0.8, help="stage 3's largest latent noise std")
    ap.add_argument("--from", dest="init", default="", help="an autoencoder file: skip stages 1-2, fine-tune its "
                    "decoder (stage 3) and check it")
    ap.add_argument("--seed", type=int, default=0, help="renders, initial weights")
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    args = ap.parse_args(argv)
    check_flags(vars(args), [(f, lambda v: v >= 1, "must be an integer >= 1") for f in (
        "steps", "batch_size", "calib_images", "image_size")] + [(f, lambda v: v >= 0, "must be >= 0") for f in (
            "decoder_steps", "decoder_noise", "latent_channels", "seed", "threads")] + [
        ("lr", lambda v: v > 0, "the learning rate must be a finite number > 0")])
    if args.init and not args.decoder_steps:
        raise SystemExit("error: --from fine-tunes the decoder: it needs --decoder_steps >= 1")
    config = DCAE_PRESETS[args.preset]
    args.out = args.out or DEFAULT_OUT.get(args.preset, "")
    if not args.out:
        raise SystemExit(f"error: --preset {args.preset} has no shipped file; pass --out X.safetensors")
    if args.latent_channels:
        if args.latent_channels < 1 or config.widths[-1] % args.latent_channels:
            raise SystemExit(f"error: --latent_channels {args.latent_channels} must divide the last width "
                             f"{config.widths[-1]}, e.g. 4, 8 or 16")
        config = dataclasses.replace(config, latent_channels=args.latent_channels)
    factor = 2 ** (len(config.widths) - 1)
    if args.image_size % factor:
        raise SystemExit(f"error: --image_size {args.image_size} must be a multiple of the autoencoder's factor "
                         f"{factor}")
    if not args.out.endswith(".safetensors"):
        raise SystemExit(f"error: --out {args.out}: give a .safetensors path")
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    if args.init:  # a trained autoencoder: its encoder, scale and metadata stay
        try:
            enc, dec = DCAEEncoder.from_pretrained(local_path(args.init)), DCAEDecoder.from_pretrained(local_path(args.init))
        except (ValueError, FileNotFoundError, OSError) as e:
            raise SystemExit(f"error: --from {args.init}: {e}") from None
        meta = {}  # our files carry how they were made; a diffusers folder does not
        if os.path.isfile(local_path(args.init)):
            with safe_open(local_path(args.init), "pt") as f:
                meta = {k: json.loads(v) if v.startswith('"') else v  # strings written as JSON or as is
                        for k, v in (f.metadata() or {}).items() if k not in ("format", "config")}
        run = {"steps": 0, "wall_seconds": 0.0}  # stages 1-2 were run before
        mean = float(meta.get("latent_mean", 0.0))
        print(f"{args.init}: fine-tuning its decoder only", flush=True)
    else:
        enc, dec = DCAEEncoder(config), DCAEDecoder(config)
        params = n_params(enc) + n_params(dec)
        print(f"tiny DC-AE '{args.preset}': f{factor}, widths {config.widths}, {config.latent_channels} latent "
              f"channels, {params / 1e6:.2f}M parameters; {args.steps} steps of batch {args.batch_size}", flush=True)
        run = train_autoencoder(enc, dec, shapes.ShapesData(args.image_size, args.seed + 1), args.steps,
                                args.batch_size, args.lr)
        scale, mean = latent_scale(enc, shapes.ShapesData(args.image_size, args.seed + 2), args.calib_images)
        enc.config = dec.config = dataclasses.replace(config, scaling_factor=scale)
    t3 = time.time()
    if args.decoder_steps:
        finetune_decoder(enc, dec, shapes.ShapesData(args.image_size, args.seed + 3), args.decoder_steps,
                         args.decoder_noise, args.batch_size)
    decoder_seconds = time.time() - t3
    scale = enc.scaling_factor
    scores, x, rec = evaluate_autoencoder(enc, dec, shapes.load_eval_prompts(), shapes.IMAGES_PER_PROMPT,
                                          args.image_size, args.seed)
    command = "python autoencoder.py " + " ".join(argv if argv is not None else sys.argv[1:])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    first = {"first_command": meta.get("first_command", meta.get("command"))} if args.init else {}
    save_autoencoder(enc, dec, args.out, command=command, steps=run["steps"], mse=scores["mse"],
                     checker=scores["checker"]["overall"], latent_mean=mean, **first)
    idx = list(range(0, min(len(x), 24 * shapes.IMAGES_PER_PROMPT), 2 * shapes.IMAGES_PER_PROMPT))
    texts = [p.text for p in shapes.load_eval_prompts() for _ in range(shapes.IMAGES_PER_PROMPT)]
    grid = torch.stack([x[idx], rec[idx]], dim=1).flatten(0, 1)  # render, reconstruction, render, ...
    png = os.path.splitext(args.out)[0] + "_reconstructions.png"
    shapes.save_grid(grid, [t for i in idx for t in ("render: " + texts[i], "decoded: " + texts[i])], png)
    print(f"{run['steps']} steps in {run['wall_seconds']:.0f} s, decoder {args.decoder_steps} steps in "
          f"{decoder_seconds:.0f} s: reconstruction mse {scores['mse']:.5f}; checker on "
          f"reconstructions {scores['checker']['overall']:.3f} (renders {scores['checker_ground_truth']['overall']:.3f}); "
          f"scaling factor {scale:.4f}\nwrote {args.out} and {png}")
    return scores


if __name__ == "__main__":
    main()
