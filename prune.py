"""
Depth pruning by block importance (SANA-1.5 Sec. 2.4, Eq. 3; Sec. 3.3, Fig. 5, Table 3).

    python prune.py --keep 6                                   # the laptop model, out/shapes/ckpt -> 6 blocks
    python prune.py --ckpt big.safetensors --keep 0,1,2,9,10,11 --out small.safetensors
    python prune.py --keep 8 --finetune_steps 100              # + the short recovery fine-tune (Table 3, "+FT")

The official repository has no pruning code at all (NVlabs/Sana#344), so this is, as far as we know, the first
public implementation; everything below follows the paper's text and is not checked against NVIDIA's code.

Block importance (Eq. 3):   BI_i = 1 - E_{X,t} cos(X_i, X_{i+1})
X_i is the input of block i and X_{i+1} its output, captured with forward hooks on model.blocks in one
forward per (calibration batch, timestep). The cosine is taken per image token over the hidden dimension and
averaged over tokens, samples, timesteps and prompts. Eq. 3 is ShortGPT's "Block Influence" (Men et al. 2024,
used by Minitron, which the paper cites), where the index t runs over tokens; SANA-1.5 reuses t for diffusion
time and averages over both. Per token (rather than one cosine of the flattened (N, D) state) weighs every
image position equally instead of letting high-norm tokens dominate.

Calibration inputs. The paper averages over "diffusion time-steps" and "100 diverse prompts"; how it builds
the noisy inputs is not said. We use the sampler's own timestep grid (flow.sigma_grid: uniform in [0.999, 0),
then the flow shift) and one fixed noise per prompt, and two ways to get x_t:
- with clean data (the shapes world): x_t = (1 - sigma) x0 + sigma noise at every sigma of the grid;
- with text only (real checkpoints): the model's own Euler trajectory from that noise, without guidance:
  each measured forward also gives the velocity for the next step, so it costs the same one forward per
  (batch, timestep). These are exactly the states the model meets when it samples.

prune() keeps the `keep` most important blocks in their original order (or an explicit list) and renumbers
them into a new LinearDiT. The recovery fine-tune (Sec. 2.4: "the same training loss as the large model",
100 steps) is train.py's loop started from the pruned file, with the checkpoint's own training settings.
"""

import dataclasses
import json
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flow import add_noise, make_noise, sigma_grid, step, timestep
from model import (LinearDiT, check_flags, check_layout_path, load_text_encoder, local_path, n_params, save_model,
                   usage_error, use_bf16, vae_factor, writable_or_exit)
from train import TrainConfig, load_or_exit, parse_config

# -----------------------------------------------------------------------------
# defaults: override with --key=value (or --key value)


@dataclass
class PruneConfig:
    ckpt: str = "out/shapes/ckpt/model.safetensors"  # the model to prune (ours, official .pth, diffusers)
    keep: str = ""  # how many blocks to keep ("8"), or which ones ("0,1,2,9,10,11")
    out: str = "out/shapes_pruned/model.safetensors"  # the pruned (+ fine-tuned) model; PNG chart beside it
    layout: str = "ours"  # of --out: ours | official (.pth / .safetensors) | diffusers (a folder)
    calib_prompts: int = 100  # calibration prompts (the paper: 100)
    timesteps: int = 10  # timesteps of the sampler grid to average over
    batch_size: int = 25  # calibration prompts per forward
    prompts: str = ""  # a text file of calibration prompts, one a line (needed unless data is the shapes world)
    data: str = ""  # "": the checkpoint's training data ("shapes" if it has none)
    image_size: int = 0  # 0: the checkpoint's training image size (pixels; latents are 32x smaller with a VAE)
    flow_shift: float = 0.0  # 0: the checkpoint's training flow shift
    text_encoder: str = ""  # "": the model's own (config.text_encoder); or a transformers folder (Gemma-2)
    seed: int = 0  # calibration prompts and noise
    dtype: str = "auto"  # auto (bf16 on GPUs that have it) | bfloat16 | float32
    finetune_steps: int = 0  # recovery fine-tune through train.py (the paper: 100)
    finetune_lr: float = 0.0  # 0: the checkpoint's training lr
    finetune_warmup: int = 10
    overwrite: bool = False  # replace --out (and its fine-tune folder) if they hold an earlier result
    progress: bool = True


# every number, checked before the model loads: (flag, allowed, what is allowed); NaN and inf never pass
FLAG_RULES = [(n, lambda v: v >= 1, "must be an integer >= 1") for n in ("calib_prompts", "timesteps", "batch_size")] + [
    (n, lambda v: v >= 0, "must be an integer >= 0") for n in ("image_size", "seed", "finetune_steps", "finetune_warmup")] + [
    ("flow_shift", lambda v: v >= 0, "must be a finite number >= 0 (0: the checkpoint's)"),
    ("finetune_lr", lambda v: v >= 0, "must be a finite number >= 0 (0: the checkpoint's)")]


# -----------------------------------------------------------------------------
# block importance (Eq. 3)


def calibration_sigmas(n, shift):
    """The sampler's grid without its final 0: n sigmas from 0.999 down, flow-shifted."""
    return sigma_grid(n, shift)[:-1].tolist()


@torch.no_grad()
def block_importance(model, batches, sigmas, autocast=None):
    """BI_i = 1 - mean cos(X_i, X_{i+1}) over tokens, samples, sigmas and batches (Eq. 3) -> float64 (depth,).

    batches: iterable of dicts with "y" (B, L, Dt), "mask" (B, L), "noise" (B, C, H, W) and optionally "x"
    (B, C, H, W) clean data. With "x": x_t = (1 - sigma) x + sigma noise at every sigma. Without: the model's
    Euler trajectory from noise through the sigmas in decreasing order (so the largest should be ~1, as
    calibration_sigmas' 0.999 is). Every sample counts once per sigma, whatever batch it sits in, so the
    result does not depend on how the samples are grouped or ordered.
    """
    sigmas = sorted((float(s) for s in sigmas), reverse=True)
    if not sigmas or not all(0 < s <= 1 for s in sigmas):
        raise ValueError(f"sigmas must be a non-empty list of noise levels in (0, 1], got {sigmas}")
    device = next(model.parameters()).device
    depth = len(model.blocks)
    cos_sum = torch.zeros(depth, dtype=torch.float64, device=device)  # sum over samples of mean-over-tokens cos

    def hook(i):
        def fn(block, args, out):  # args[0]: the block input X_i (B, N, D); out: X_{i+1} (B, N, D)
            cos = F.cosine_similarity(args[0].float(), out.float(), dim=-1)  # (B, N): one cosine per token
            cos_sum[i] += cos.mean(dim=1).double().sum()
        return fn

    handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(model.blocks)]
    count = 0
    try:
        for batch in batches:
            y, mask, noise = (batch[k].to(device) for k in ("y", "mask", "noise"))
            x0 = batch["x"].to(device).float() if "x" in batch else None
            B = noise.shape[0]
            x = noise.float()  # the trajectory starts at noise (the sampler treats it as sigma 0.999)
            for k, s in enumerate(sigmas):
                sigma = torch.full((B,), s, device=device)
                if x0 is not None:
                    x = add_noise(x0, noise.float(), sigma)  # x_t on the straight path, as in training
                with autocast or nullcontext():
                    v = model(x, timestep(sigma), y, mask)  # (B, C, H, W); the hooks record every block
                if x0 is None and k + 1 < len(sigmas):
                    x, _ = step("euler", x, v.float(), s, sigmas[k + 1])  # along the model's own trajectory
                count += B
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise ValueError("no calibration samples: batches was empty")
    return (1 - cos_sum / count).cpu()


# -----------------------------------------------------------------------------
# pruning


def kept_blocks(keep, depth, importance=None):
    """keep (int count or list of block indices) -> sorted list of the blocks that stay. ValueError if bad."""
    if isinstance(keep, int) and not isinstance(keep, bool):
        if not 0 < keep < depth:
            raise ValueError(f"keep={keep} must be between 1 and depth - 1 = {depth - 1} (the model has {depth} blocks)")
        if importance is None:
            raise ValueError("keep as a number needs the block importance; pass importance=block_importance(...)")
        if len(importance) != depth:
            raise ValueError(f"importance has {len(importance)} entries but the model has {depth} blocks")
        order = torch.argsort(torch.as_tensor(importance), descending=True, stable=True)  # ties: earlier block first
        return sorted(order[:keep].tolist())
    if not isinstance(keep, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in keep):
        raise ValueError(f"keep must be a number of blocks or a list of block indices, got {keep}")
    bad = [i for i in keep if not 0 <= i < depth]
    if bad:
        raise ValueError(f"unknown block index {bad[0]}: the model has blocks 0..{depth - 1}")
    keep = list(keep)
    if len(set(keep)) != len(keep):
        raise ValueError(f"block index {next(i for i in keep if keep.count(i) > 1)} is listed twice in keep={keep}")
    if not 0 < len(keep) < depth:
        raise ValueError(f"keep lists {len(keep)} blocks; list between 1 and {depth - 1} of the {depth} blocks")
    return sorted(keep)


def prune(model, keep, importance=None):
    """A new LinearDiT with only the kept blocks, in their original order, renumbered 0..k-1; weights copied.

    keep: the number of most important blocks to keep (needs importance, shape (depth,)) or a list of indices.
    """
    kept = kept_blocks(keep, len(model.blocks), importance)
    new_index = {str(old): str(new) for new, old in enumerate(kept)}
    sd = {}
    for key, v in model.state_dict().items():
        if key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            if i not in new_index:
                continue  # a pruned block
            key = f"blocks.{new_index[i]}.{rest}"
        sd[key] = v.detach().clone()
    with torch.device("meta"):  # no random init of weights that are overwritten at once
        pruned = LinearDiT(dataclasses.replace(model.config, depth=len(kept)))
    pruned.load_state_dict(sd, strict=True, assign=True)
    return pruned.train(model.training)


# -----------------------------------------------------------------------------
# calibration sets


def shapes_calibration(n, image_size, encoder, model_cfg, batch_size=25, seed=0):
    """n prompts with their clean images from the shapes training stream (a seed unlike training's, not the
    eval file): list of {"x", "y", "mask", "noise", "prompts"} batches."""
    from shapes import ShapesData

    data = ShapesData(image_size, seed=1_000_000 + seed, encoder=encoder)
    if model_cfg.vae:  # the laptop's latent space: x = DC-AE latents
        from autoencoder import LatentData
        data = LatentData(data, model_cfg.vae)
    side = image_size // vae_factor(model_cfg.vae)
    noise = make_noise((n, model_cfg.in_channels, side, side), seed)  # one fixed noise per calibration sample
    sizes = [min(batch_size, n - i) for i in range(0, n, batch_size)]
    batches = [data.get_batch(k, b) for k, b in enumerate(sizes)]
    for b, chunk in zip(batches, noise.split(sizes)):
        b["noise"] = chunk
    return batches


def text_calibration(prompts, encoder, model_cfg, latent_size, batch_size=25, seed=0):
    """Text-only calibration (real checkpoints): {"y", "mask", "noise", "prompts"} batches; x_t from the
    model's own trajectory in block_importance."""
    noise = make_noise((len(prompts), model_cfg.in_channels, latent_size, latent_size), seed)
    batches = []
    for i in range(0, len(prompts), batch_size):
        y, mask = encoder(prompts[i:i + batch_size])
        batches.append({"y": y, "mask": mask, "noise": noise[i:i + batch_size], "prompts": prompts[i:i + batch_size]})
    return batches


# -----------------------------------------------------------------------------
# reporting


def bar_chart(importance, kept, width=50):
    """One text line per block: index, importance, a bar, and whether it goes."""
    top = max(float(importance.max()), 1e-12)
    lines = ["block  importance (Eq. 3)"]
    for i, v in enumerate(importance.tolist()):
        bar = "#" * round(width * max(v, 0.0) / top)
        lines.append(f"{i:5d}  {v:9.5f}  {bar:<{width}}{'' if i in kept else '  pruned'}")
    return "\n".join(lines)


def save_bar_png(importance, kept, path, title):
    """Fig. 5-style bar chart with PIL (no matplotlib): kept blocks blue, pruned ones red; written atomically."""
    from PIL import Image, ImageDraw

    depth, bar_w, h, pad = len(importance), 16, 200, 30
    img = Image.new("RGB", (max(2 * pad + depth * bar_w, 420), h + 2 * pad), "white")  # room for the title
    draw = ImageDraw.Draw(img)
    top = max(float(importance.max()), 1e-12)
    for i, v in enumerate(importance.tolist()):
        x, bh = pad + i * bar_w, round(h * max(v, 0.0) / top)
        draw.rectangle([x + 2, pad + h - bh, x + bar_w - 2, pad + h], fill=(60, 110, 200) if i in kept else (210, 60, 60))
        if i % 5 == 0:
            draw.text((x + 2, pad + h + 4), str(i), fill="black")
    draw.line([pad, pad + h, pad + depth * bar_w, pad + h], fill="black")
    draw.text((pad, 8), f"{title}  (max {top:.4f}; red = pruned)", fill="black")
    tmp = f"{path}.tmp{os.getpid()}"
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# the script


def parse_keep(text):
    """'8' -> 8, '0,1,5' -> [0, 1, 5]; one-line error otherwise."""
    try:
        parts = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise SystemExit(f"error: --keep={text!r} is neither a number of blocks nor a list like 0,1,5") from None
    if not parts:
        raise SystemExit("error: --keep is required: the number of blocks to keep (e.g. --keep 8) or a list (0,1,5)")
    return parts[0] if "," not in text else parts


def source_train_config(model):
    """(TrainConfig the checkpoint was trained with, from its metadata, else the defaults; the saved dict)."""
    saved = getattr(model, "meta", {}).get("train_config")
    saved = json.loads(saved) if isinstance(saved, str) else (saved or {})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in saved.items() if k in known}), saved


def finetune(cfg, tc, init_path, run_dir):
    """Sec. 2.4: the pruned model trained with the large model's loss for a few steps, through train.py."""
    from train import train

    ft = dataclasses.replace(tc, init_from=init_path, grow_from="", resume=False, depth=0, out_dir=run_dir,
                             max_steps=cfg.finetune_steps, save_every=cfg.finetune_steps,
                             eval_every=0, ema_decay=0.0, lr=cfg.finetune_lr or tc.lr,
                             decay_steps=cfg.finetune_steps if tc.decay_steps else 0,  # the source's cool-down, shortened
                             warmup_steps=cfg.finetune_warmup, data=cfg.data or tc.data,
                             image_size=cfg.image_size or tc.image_size, text_encoder=cfg.text_encoder or tc.text_encoder,
                             overwrite=cfg.overwrite, progress=cfg.progress)
    result = train(ft)
    return LinearDiT.from_pretrained(os.path.join(run_dir, "ckpt", "model.safetensors")), result


def main(argv):
    cfg = parse_config(argv, PruneConfig)
    check_flags(dataclasses.asdict(cfg), FLAG_RULES)
    if cfg.dtype not in ("auto", "bfloat16", "float32"):
        usage_error(f"--dtype={cfg.dtype}: use auto, bfloat16 or float32")
    keep = parse_keep(cfg.keep)
    if not os.path.exists(cfg.ckpt):
        raise SystemExit(f"error: checkpoint not found: {cfg.ckpt}; train one first (python train.py "
                         "config/shapes.py) or pass --ckpt")
    stem = os.path.splitext(cfg.out)[0]
    earlier = [p for p in (cfg.out, f"{stem}_finetune") if os.path.exists(p)] if cfg.finetune_steps else (
        [cfg.out] if os.path.exists(cfg.out) else [])
    if earlier and not cfg.overwrite:
        raise SystemExit(f"error: {earlier[0]} holds an earlier result; pass --overwrite to replace it or choose "
                         f"another --out")
    try:
        check_layout_path(cfg.out, cfg.layout)
    except ValueError as e:
        usage_error(f"--out {cfg.out} --layout {cfg.layout}: {e}")
    writable_or_exit(os.path.dirname(os.path.abspath(cfg.out)), "the folder of --out")
    if cfg.prompts and not os.path.isfile(cfg.prompts):
        raise SystemExit(f"error: calibration prompts file not found: {cfg.prompts}")
    model = load_or_exit(cfg.ckpt)
    depth = model.config.depth
    try:
        kept_blocks(keep, depth, torch.zeros(depth))  # check the request before the calibration pass
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    tc, saved_tc = source_train_config(model)
    data, image_size = cfg.data or tc.data, cfg.image_size or tc.image_size
    shift = cfg.flow_shift or tc.flow_shift
    laptop_space = not model.config.vae or os.path.isfile(local_path(model.config.vae))  # pixels or a tiny AE file
    with_images = data == "shapes" and laptop_space and not cfg.prompts  # calibration prompts with their images
    if not with_images and not cfg.prompts:
        raise SystemExit("error: this model needs calibration prompts: pass --prompts FILE (one prompt a line; "
                         "the paper uses 100 diverse prompts)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16(device, cfg.dtype) else None
    model.to(device).eval()

    encoder = load_text_encoder(cfg.text_encoder or model.config.text_encoder, model.config.text_max_length, device)
    if with_images:
        batches = shapes_calibration(cfg.calib_prompts, image_size, encoder, model.config, cfg.batch_size, cfg.seed)
        how = f"{cfg.calib_prompts} shapes prompts with their images, x_t on the straight path"
    else:
        prompts = [p.strip() for p in open(cfg.prompts) if p.strip()][:cfg.calib_prompts]
        latent = image_size // vae_factor(model.config.vae)
        batches = text_calibration(prompts, encoder, model.config, latent, cfg.batch_size, cfg.seed)
        how = f"{len(prompts)} prompts from {cfg.prompts}, x_t on the model's own Euler trajectory"
    sigmas = calibration_sigmas(cfg.timesteps, shift)
    print(f"block importance of {cfg.ckpt} ({depth} blocks): {how}, {len(sigmas)} timesteps "
          f"(sigma {sigmas[0]:.3f} .. {sigmas[-1]:.3f}, shift {shift})", flush=True)
    importance = block_importance(model, batches, sigmas, autocast)

    kept = kept_blocks(keep, depth, importance)
    pruned = prune(model, kept)
    print(bar_chart(importance, kept))
    print(f"pruned blocks: {[i for i in range(depth) if i not in kept]}; kept: {kept}")
    print(f"parameters: {n_params(model) / 1e6:.2f}M -> {n_params(pruned) / 1e6:.2f}M "
          f"({100 * n_params(pruned) / n_params(model):.1f}%), depth {depth} -> {len(kept)}")
    save_bar_png(importance, kept, f"{stem}_importance.png", f"block importance, {os.path.basename(cfg.ckpt)}")
    meta = {"pruned_from": cfg.ckpt, "kept_blocks": kept, "block_importance": importance.tolist(),
            "finetune_steps": cfg.finetune_steps}
    if saved_tc:  # the big model's recipe travels on, so a pruned model can be pruned or fine-tuned again
        meta["train_config"] = saved_tc
    if cfg.finetune_steps:
        run_dir = f"{stem}_finetune"
        os.makedirs(run_dir, exist_ok=True)
        init_path = os.path.join(run_dir, "pruned.safetensors")  # before fine-tuning, kept for comparison
        save_model(pruned, init_path, **meta)
        del model, pruned, encoder  # the fine-tune loads its own copies
        pruned, result = finetune(cfg, tc, init_path, run_dir)
        print(f"fine-tuned {result['step']} steps: loss {result['losses'][-1][1]:.4f} ({run_dir})")
    pruned.save_pretrained(cfg.out, cfg.layout, **meta)
    print(f"wrote {cfg.out} and {stem}_importance.png")
    return importance, kept


if __name__ == "__main__":
    main(sys.argv[1:])
