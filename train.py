"""
Train SANA with rectified flow, the same script from one laptop CPU to torchrun on GPU nodes.

    python train.py config/shapes.py                         # the laptop model on the shapes world
    torchrun --nproc_per_node 8 train.py config/sana1.5_4.8b_grow.py --grow_from ckpt.pth
    python train.py config/sana1.5_4.8b_grow.py --dry_run      # memory per GPU, allocates nothing

The objective (SANA Sec. 2, SANA-1.5 Sec. 3.1, official train_scripts/train.py):
    sigma = shift(sigmoid(N(0, 1)))            logit-normal timesteps, then the flow shift
    x_t   = (1 - sigma) x0 + sigma noise       x0: DC-AE latents (pixels for a preset without a vae)
    loss  = || model(x_t, 1000 sigma, y) - (noise - x0) ||^2
with 10% of captions replaced by the empty caption so that classifier-free guidance works at sampling.
Deviations, on purpose: the timestep stays continuous (official: truncated to an integer) and a dropped
caption takes the empty caption's own mask (official: keeps the prompt's mask; diffusers' pipeline samples
with the empty caption's own mask, as we do).

Randomness is a pure function of (seed, step, sample index): the noise, sigma and caption dropout of sample i
at step s are the same whatever the number of processes or micro-batches, so gradient accumulation equals one
big batch, 2 processes equal 1, and --resume continues exactly.

Checkpoints: out_dir/ckpt-<step>/ {model.safetensors, ema.safetensors, state.pt}; when all files are written,
the symlink out_dir/ckpt is switched to it with os.replace, so a kill at any moment leaves out_dir/ckpt whole.
A checkpoint is written only if every weight is finite, and a non-finite loss stops the run (checked on device
every step, read on the host at log and save steps only), so out_dir/ckpt always holds a model that samples.
One run per out_dir: a folder holding another run is refused without --resume or --overwrite, and a lock on
out_dir/lock keeps a second run out while one is training.
"""

import dataclasses
import fcntl
import json
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from flow import add_noise, shift_sigma, timestep, velocity_target
from model import (FILE_KEYS, LAYOUTS, PRESETS, LinearDiT, check_finite, check_flags, load_text_encoder, n_params, read_file,
                   save_model, usage_error, use_bf16, vae_factor)

# -----------------------------------------------------------------------------
# defaults: override with a config/*.py file and --key=value (or --key value)


@dataclass
class TrainConfig:
    out_dir: str = "out/shapes"
    preset: str = "shapes-c4"  # a model.PRESETS name: the architecture when training from scratch (the laptop one)
    vae: str = ""  # from scratch: an autoencoder file instead of the preset's (its latent channels set in_channels)
    depth: int = 0  # 0: the preset's depth; growing: the target depth
    grad_checkpointing: bool = False  # recompute blocks in backward (official: on)
    init_from: str = ""  # fine-tune from a checkpoint (ours, official .pth or diffusers folder)
    grow_from: str = ""  # grow a smaller checkpoint to `depth` blocks with grow.py (Sec. 2.2)
    grow_init: str = "partial"  # partial | cyclic | block
    grow_drop_last: int = 2  # drop the last pretrained blocks before growing (Sec. 2.2)
    resume: bool = False  # continue from out_dir/ckpt exactly where it stopped
    overwrite: bool = False  # start afresh in an out_dir that holds another run (its checkpoints go at the first save)
    # data
    data: str = "shapes"  # "shapes" or a folder of name.jpg/png + name.txt pairs (see data.py)
    image_size: int = 32
    shapes_weights: str = ""  # shapes world: category mix, e.g. "position=2,color_attr=2" (unnamed: 1)
    curriculum_steps: int = 0  # shapes world: the first steps draw from curriculum_weights instead (a curriculum)
    curriculum_weights: str = ""  # e.g. colour attribution alone: binding learned first survives the full mix (README)
    text_encoder: str = ""  # "": what the model expects (config.text_encoder); or a transformers folder
    # optimisation
    batch_size: int = 64  # global batch size: micro_batch_size x world size x accumulation steps
    micro_batch_size: int = 0  # per process and forward pass; 0: batch_size // world size
    max_steps: int = 2000
    optimizer: str = "came8bit"  # came8bit | came | adamw
    came_bias_correction: bool = False  # divide CAME's instability by 1 - b3^t (not in the paper: came8bit.py)
    lr: float = 1e-4  # official: 1e-4 pre-training, 2e-5 fine-tuning
    weight_decay: float = 0.0
    warmup_steps: int = 100
    decay_steps: int = 0  # linear decay to 0 over the last decay_steps of max_steps; 0: constant lr (official)
    grad_clip: float = 0.1  # official SANA configs clip the global grad norm at 0.1
    ema_decay: float = 0.0  # 0: no EMA; e.g. 0.999
    flow_shift: float = 3.0  # official 3.0 at 1024px
    logit_mean: float = 0.0
    logit_std: float = 1.0
    cfg_dropout: float = 0.1  # probability of the empty caption (classifier-free guidance)
    dtype: str = "auto"  # auto (bf16 on GPUs that have it) | bfloat16 | float32
    fsdp: bool = False  # FSDP2: shard every block, then the root (for the 4.8B model)
    compile: bool = False  # torch.compile the model (for GPUs; STYLE: off on a CPU)
    seed: int = 0
    # output
    layout: str = "ours"  # also write the final model as official (out_dir/model.pth) or diffusers (out_dir/diffusers/)
    log_every: int = 10
    save_every: int = 500
    eval_every: int = 0  # shapes world: sample the eval prompts and score them with the checker
    eval_prompts: int = 0  # 0: the whole eval set, one image per prompt; else the first n per category
    eval_steps: int = 20
    eval_cfg: float = 4.5
    val_every: int = 0  # the loss on val_batches fixed batches (fixed images, noise, sigma): no batch-to-batch noise
    val_batches: int = 4
    dry_run: bool = False  # print parameters, optimizer bytes and memory per GPU, then exit
    gpus: int = 1  # --dry_run only: the number of GPUs to estimate for
    progress: bool = True  # tqdm bar on rank 0


def parse_config(argv, cls=TrainConfig):
    """config files (plain Python assignments) then --key=value / --key value, typed by the dataclass."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    values, i = {}, 0
    if "-h" in argv or "--help" in argv:
        lines = [f"  --{n}={f.default!r}" for n, f in known.items()]
        print(f"usage: {sys.argv[0]} [config/X.py ...] [--key=value ...]\noptions (defaults):\n" + "\n".join(lines))
        raise SystemExit(0)
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                usage_error(f"config file '{arg}' not found (configs live in config/*.py)")
            scope = {}
            exec(open(arg).read(), {}, scope)
            pairs = [(k, v) for k, v in scope.items() if not k.startswith("_")]
        else:
            key, eq, val = arg[2:].partition("=")
            if not eq:  # --key value, or a bare --flag for booleans
                is_flag = key in known and known[key].type in (bool, "bool") and (
                    i + 1 == len(argv) or argv[i + 1].startswith("--"))
                val = "True" if is_flag else (argv[i + 1] if i + 1 < len(argv) else "")
                i += 0 if is_flag else 1
            pairs = [(key, val)]
        for key, val in pairs:
            if key not in known:
                usage_error(f"unknown option '{key}'; known: {', '.join(known)}")
            values[key] = convert(key, val, known[key].default)
        i += 1
    return cls(**values)


def convert(key, val, default):
    if not isinstance(val, str) or isinstance(default, str):
        return val
    try:
        if isinstance(default, bool):
            if val.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return val.lower() in ("true", "1")
        return type(default)(val)
    except ValueError:
        usage_error(f"--{key}={val!r} is not a {type(default).__name__}")


# every number a run takes, checked before any work: (flag, allowed, what is allowed); NaN and inf never pass
AT_LEAST_1 = ("image_size", "batch_size", "max_steps", "log_every", "save_every", "eval_steps", "val_batches", "gpus")
AT_LEAST_0 = ("depth", "grow_drop_last", "micro_batch_size", "curriculum_steps", "warmup_steps", "decay_steps",
              "eval_every", "eval_prompts", "val_every", "seed")
FLAG_RULES = [(n, lambda v: v >= 1, "must be an integer >= 1") for n in AT_LEAST_1] + [
    (n, lambda v: v >= 0, "must be an integer >= 0 (0: off, or the default)") for n in AT_LEAST_0] + [
    ("lr", lambda v: v > 0, "the learning rate must be a finite number > 0"),
    ("weight_decay", lambda v: v >= 0, "must be a finite number >= 0"),
    ("grad_clip", lambda v: v >= 0, "the gradient-norm clip must be a finite number >= 0 (0: off)"),
    ("ema_decay", lambda v: 0 <= v < 1, "must be in [0, 1) (0: no EMA)"),
    ("flow_shift", lambda v: v > 0, "must be a finite number > 0"),
    ("logit_mean", lambda v: True, "must be a finite number"),
    ("logit_std", lambda v: v > 0, "must be a finite number > 0"),
    ("cfg_dropout", lambda v: 0 <= v <= 1, "a probability: between 0 and 1"),
    ("eval_cfg", lambda v: v >= 0, "the guidance scale must be a finite number >= 0")]


def check_config(cfg):
    check_flags(dataclasses.asdict(cfg), FLAG_RULES)
    if cfg.dtype not in ("auto", "bfloat16", "float32"):
        usage_error(f"--dtype={cfg.dtype}: use auto, bfloat16 or float32")
    if cfg.layout not in LAYOUTS:
        usage_error(f"--layout={cfg.layout}: use one of {', '.join(LAYOUTS)}")
    if cfg.resume and cfg.overwrite:
        usage_error("--resume continues the run in --out_dir and --overwrite starts afresh there: give one")


# -----------------------------------------------------------------------------
# pieces of the training step


def sample_randomness(seed, step, index, shape, cfg):
    """noise, sigma and the caption-dropout coin of global sample `index` at `step`: a pure function."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 65_537 + index)
    noise = torch.randn(shape, generator=g)
    u = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn((), generator=g))  # logit-normal
    drop = torch.rand((), generator=g) < cfg.cfg_dropout
    return noise, shift_sigma(u, cfg.flow_shift), drop


def flow_loss(model, batch, y_null, mask_null, step, first_index, cfg, autocast):
    """Rectified-flow MSE of one micro-batch; samples are numbered first_index, first_index + 1, ..."""
    x0, y, mask = batch["x"], batch["y"], batch["mask"]
    B = x0.shape[0]
    rnd = [sample_randomness(cfg.seed, step, first_index + i, x0.shape[1:], cfg) for i in range(B)]
    noise = torch.stack([r[0] for r in rnd]).to(x0.device)  # (B, C, H, W)
    sigma = torch.stack([r[1] for r in rnd]).to(x0.device)  # (B,)
    drop = torch.stack([r[2] for r in rnd]).to(x0.device)  # (B,) bool
    y = torch.where(drop[:, None, None], y_null.expand_as(y), y)  # empty caption, with its own mask
    mask = torch.where(drop[:, None], mask_null.expand_as(mask), mask)
    x_t = add_noise(x0, noise, sigma)
    with autocast:
        v = model(x_t, timestep(sigma), y, mask)
    return F.mse_loss(v.float(), velocity_target(x0, noise))


def lr_at(step, cfg):
    """Linear warmup, then constant (official); with decay_steps, a linear cool-down to 0 at max_steps."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    cool = min(1.0, (cfg.max_steps - step) / cfg.decay_steps) if cfg.decay_steps else 1.0
    return cfg.lr * warm * cool


def make_optimizer(params, cfg):
    if cfg.optimizer in ("came8bit", "came"):
        from came8bit import CAME8bit
        return CAME8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay, quantize=cfg.optimizer == "came8bit",
                        bias_correction=cfg.came_bias_correction)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-10, weight_decay=cfg.weight_decay)
    raise SystemExit(f"error: unknown optimizer '{cfg.optimizer}': use came8bit, came or adamw")


def build_model(cfg):
    """From scratch (preset), fine-tune (--init_from) or grow (--grow_from): the raw, unwrapped module."""
    if cfg.init_from and cfg.grow_from:
        raise SystemExit("error: give either --init_from or --grow_from, not both")
    if cfg.vae and (cfg.init_from or cfg.grow_from):
        raise SystemExit("error: --vae chooses a new model's latent space; a checkpoint (--init_from/--grow_from) "
                         "keeps its own: drop --vae")
    if cfg.grow_from:
        from grow import grow
        if cfg.depth <= 0:
            raise SystemExit("error: --grow_from needs --depth (the grown model's number of blocks)")
        return grow(load_or_exit(cfg.grow_from), cfg.depth, init=cfg.grow_init, drop_last=cfg.grow_drop_last)
    if cfg.init_from:
        return load_or_exit(cfg.init_from)
    if cfg.preset not in PRESETS:
        raise SystemExit(f"error: unknown preset '{cfg.preset}'; known: {', '.join(PRESETS)}")
    mcfg = dataclasses.replace(PRESETS[cfg.preset], depth=cfg.depth or PRESETS[cfg.preset].depth)
    if cfg.vae:
        from model import DCAEEncoder, local_path
        try:
            channels = DCAEEncoder.from_pretrained(local_path(cfg.vae)).config.latent_channels
        except (ValueError, FileNotFoundError, OSError) as e:
            raise SystemExit(f"error: --vae {cfg.vae}: {e}") from None
        mcfg = dataclasses.replace(mcfg, vae=cfg.vae, in_channels=channels)
    return LinearDiT(mcfg)


def load_or_exit(path):
    try:
        return LinearDiT.from_pretrained(path)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


def category_weights(text, flag="shapes_weights"):
    """--shapes_weights "position=2,color_attr=2" -> a weight for each of the six categories (unnamed ones 1)."""
    from shapes import CATEGORIES

    if not text:
        return None  # uniform
    weights = dict.fromkeys(CATEGORIES, 1.0)
    for item in text.split(","):
        name, _, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if name.strip() not in weights or not weight >= 0:
            raise SystemExit(f"error: --{flag} item {item!r}: use category=weight (weight >= 0) with a "
                             f"category among {', '.join(CATEGORIES)}")
        weights[name.strip()] = weight
    if sum(weights.values()) <= 0:
        raise SystemExit(f"error: --{flag} gives every category weight 0; at least one must be > 0")
    return weights


def make_data(cfg, model_cfg, device="cpu"):
    """The shapes world (its latents encoded on `device`), or a folder of captioned images cached to latents (data.py)."""
    encoder = cfg.text_encoder or model_cfg.text_encoder
    if cfg.data == "shapes":
        from shapes import ShapesData
        if cfg.curriculum_steps < 0 or bool(cfg.curriculum_steps) != bool(cfg.curriculum_weights):
            raise SystemExit("error: a curriculum needs both --curriculum_steps (> 0) and --curriculum_weights "
                             "(a category mix like --shapes_weights), or neither")
        data = ShapesData(cfg.image_size, cfg.seed, load_text_encoder(encoder, model_cfg.text_max_length),
                          weights=category_weights(cfg.shapes_weights), curriculum_steps=cfg.curriculum_steps,
                          curriculum_weights=category_weights(cfg.curriculum_weights, "curriculum_weights"))
        if not model_cfg.vae:
            return data  # pixel space
        from autoencoder import LatentData
        return LatentData(data, model_cfg.vae, device)  # x = DC-AE latents (the laptop preset: 8x8x4)
    if cfg.curriculum_steps or cfg.curriculum_weights or cfg.shapes_weights:
        raise SystemExit(f"error: --shapes_weights and the curriculum flags mix the shapes world's categories; "
                         f"--data {cfg.data} is a folder of images: drop them")
    from data import FolderData
    data = FolderData(cfg.data, encoder, model_cfg.text_max_length, seed=cfg.seed)
    (channels, h, w), dim, p = data.shapes[0], data.meta["text_dim"], model_cfg.patch_size
    if (channels, dim) != (model_cfg.in_channels, model_cfg.caption_channels):
        raise SystemExit(f"error: {cfg.data} is encoded to {channels}-channel latents and {dim}-d text states; the "
                         f"model takes {model_cfg.in_channels} and {model_cfg.caption_channels}: encode it with the "
                         f"model's own autoencoder and text encoder")
    odd = [f"{h}x{w}" for _, h, w in data.shapes if h % p or w % p]
    if odd:
        raise SystemExit(f"error: {cfg.data} holds {odd[0]} latents, not a multiple of the model's patch size {p}: "
                         f"encode it again with a --size that is")
    return data


# -----------------------------------------------------------------------------
# checkpoints


def full_state_dict(model, cfg):
    """Full, unsharded weights on CPU (all ranks must call this under FSDP)."""
    if not cfg.fsdp:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(cfg, raw_model, ema, opt, step, rank, world, last_good):
    """ckpt-<step>/ written in full, then the ckpt symlink swapped atomically, then older ones removed; nothing at
    all if a weight is not finite, so rotation never removes the last finite checkpoint. -> the new folder."""
    sd = full_state_dict(raw_model, cfg)
    folder = os.path.join(cfg.out_dir, f"ckpt-{step:07d}")
    if rank == 0:
        try:
            check_finite({**sd, **({f"ema {k}": v for k, v in zip(sd, ema)} if ema is not None else {})}, f"step {step}")
        except ValueError as e:
            raise SystemExit(f"error: not saved: {e}. {good_checkpoint_line(last_good)}") from None
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
    if world > 1:
        dist.barrier()
    meta = {"step": step, "train_config": dataclasses.asdict(cfg)}
    if rank == 0:
        with torch.device("meta"):
            shell = LinearDiT(raw_model.config)
        shell.load_state_dict(sd, assign=True)
        save_model(shell, os.path.join(folder, "model.safetensors"), **meta)
        if ema is not None:
            shell.load_state_dict(dict(zip(sd, ema)), assign=True)
            save_model(shell, os.path.join(folder, "ema.safetensors"), **meta)
    # optimizer states are identical on all ranks under DDP; per rank under FSDP (shards)
    if rank == 0 or cfg.fsdp:
        state = {"step": step, "optimizer": opt.state_dict(), "rng_cpu": torch.get_rng_state(),
                 "world_size": world, "train_config": dataclasses.asdict(cfg)}
        name = f"state_rank{rank}.pt" if cfg.fsdp else "state.pt"
        tmp = os.path.join(folder, name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, os.path.join(folder, name))
    if world > 1:
        dist.barrier()
    if rank == 0:
        link, tmp_link = os.path.join(cfg.out_dir, "ckpt"), os.path.join(cfg.out_dir, f"ckpt.tmp{os.getpid()}")
        os.symlink(os.path.basename(folder), tmp_link)
        os.replace(tmp_link, link)  # the atomic switch
        for old in os.listdir(cfg.out_dir):
            if old.startswith("ckpt-") and old != os.path.basename(folder):
                shutil.rmtree(os.path.join(cfg.out_dir, old), ignore_errors=True)
    return folder


def good_checkpoint_line(folder):
    return f"The last good checkpoint is {folder}." if folder else "No checkpoint was saved by this run."


def claim_out_dir(cfg):
    """One run per out_dir. A folder that holds another run is refused unless --resume continues it or
    --overwrite starts afresh; a run holds an flock on out_dir/lock while it trains. The kernel drops an flock
    when its process ends, however it ends, so a killed run never leaves the folder locked. -> the lock file."""
    previous = [n for n in ("ckpt", "log.jsonl") if os.path.lexists(os.path.join(cfg.out_dir, n))]
    if previous and not (cfg.resume or cfg.overwrite):
        raise SystemExit(f"error: --out_dir {cfg.out_dir} holds another run ({', '.join(previous)}): pass --resume "
                         f"to continue it, --overwrite to start afresh in it, or choose another --out_dir")
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        lock = open(os.path.join(cfg.out_dir, "lock"), "a+")
    except OSError as e:
        raise SystemExit(f"error: --out_dir {cfg.out_dir} is not a writable folder ({e.strerror})") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        raise SystemExit(f"error: another run (process {lock.read().strip() or '?'}) is training in {cfg.out_dir}; "
                         f"wait for it to end or choose another --out_dir") from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def load_training_state(cfg, rank):
    folder = os.path.join(cfg.out_dir, "ckpt")
    name = f"state_rank{rank}.pt" if cfg.fsdp else "state.pt"
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        raise SystemExit(f"error: --resume but no training state at {path}; train without --resume first")
    try:
        return read_file(path)[0], folder
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


# -----------------------------------------------------------------------------
# evaluation on the shapes world


@torch.no_grad()
def evaluate_shapes(raw_model, data, cfg, device, step):
    """Checker score of one sample per eval prompt (Table-2 layout), and a grid PNG."""
    import shapes
    from flow import make_noise
    from sample import generate, load_decoder
    prompts = shapes.load_eval_prompts()
    if cfg.eval_prompts:
        per = {}
        prompts = [p for p in prompts if per.setdefault(p.category, []).append(p) or len(per[p.category]) <= cfg.eval_prompts]
    raw_model.eval()
    images = []
    y_null, mask_null = data.null()
    decode, factor = load_decoder(raw_model.config.vae, device)  # identity in pixel space
    side = cfg.image_size // factor
    for i in range(0, len(prompts), 128):
        chunk = prompts[i:i + 128]
        y, mask = data.encoder([p.text for p in chunk])
        noise = make_noise((len(chunk), raw_model.config.in_channels, side, side), 10_000 + i)
        x = generate(raw_model, y.to(device), mask.to(device), y_null.to(device), mask_null.to(device),
                     noise.to(device), steps=cfg.eval_steps, cfg=cfg.eval_cfg, shift=cfg.flow_shift, sampler="euler")
        images.append(decode(x).float().clamp(-1, 1).cpu())
    raw_model.train()
    images = torch.cat(images)
    result = shapes.evaluate(images, prompts)
    shapes.save_grid(images[:64], [p.text for p in prompts[:64]], os.path.join(cfg.out_dir, f"samples-{step:07d}.png"))
    return result


VAL_STEP = 10**9  # the validation batches are the data stream's batches at steps VAL_STEP, VAL_STEP + 1, ...


@torch.no_grad()
def validation_loss(raw_model, data, y_null, mask_null, cfg, device, autocast, chunks=1):
    """train.py's loss on val_batches fixed batches: the data stream's batches at steps no run reaches, with
    their fixed noise, sigma and caption dropout. The same number for the same weights, so two runs compare at
    any step, unlike the training loss, whose batches differ from step to step (and are easier or harder).
    Each global batch goes through in `chunks` micro-batches (train.py passes world x accumulation), so memory
    is a training micro-batch's and the number does not depend on how many processes compute it."""
    raw_model.eval()
    total = 0.0
    micro = cfg.batch_size // chunks
    for i in range(cfg.val_batches):
        for m in range(chunks):
            batch = {k: v.to(device) if torch.is_tensor(v) else v
                     for k, v in data.get_batch(VAL_STEP + i, cfg.batch_size, m, chunks).items()}
            total += flow_loss(raw_model, batch, y_null, mask_null, VAL_STEP + i, m * micro, cfg, autocast).item()
    raw_model.train()
    return total / (cfg.val_batches * chunks)


# -----------------------------------------------------------------------------
# the script


def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE; gloo on CPU, nccl on GPU. Returns (rank, local_rank, world, device)."""
    if "RANK" not in os.environ:
        return 0, 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, local, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return rank, local, world, torch.device("cuda", local)
    dist.init_process_group("gloo")
    return rank, local, world, torch.device("cpu")


def train(cfg):
    """Run training; returns {"step", "losses": [(step, loss)], "eval": last eval result or None}."""
    check_config(cfg)
    rank, _, world, device = setup_distributed()
    with claim_out_dir(cfg) if rank == 0 else nullcontext():  # the lock is released when the run ends, however
        return train_loop(cfg, rank, world, device)


def train_loop(cfg, rank, world, device):
    print0 = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    if cfg.batch_size % world:
        raise SystemExit(f"error: batch_size {cfg.batch_size} is not divisible by the world size {world}")
    micro = cfg.micro_batch_size or cfg.batch_size // world
    if (cfg.batch_size // world) % micro:
        raise SystemExit(f"error: batch_size/world = {cfg.batch_size // world} is not a multiple of micro_batch_size {micro}")
    accum = cfg.batch_size // world // micro  # gradient accumulation steps, derived
    bf16 = use_bf16(device, cfg.dtype)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    if cfg.fsdp and cfg.ema_decay:
        raise SystemExit("error: EMA with FSDP is not supported (as in the official code); set --ema_decay=0")

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    step, last_good = 0, None  # last_good: the newest checkpoint known to be finite
    if cfg.resume:
        state, folder = load_training_state(cfg, rank)
        raw_model = load_or_exit(os.path.join(folder, "model.safetensors"))  # refused if not finite
        step, last_good = state["step"], os.path.realpath(folder)
    else:
        raw_model = build_model(cfg)
    raw_model.config.grad_checkpointing = cfg.grad_checkpointing
    raw_model.to(device)
    ema = [p.detach().clone().float() for p in raw_model.state_dict().values()] if cfg.ema_decay else None
    if cfg.resume and ema is not None:
        ema_path = os.path.join(folder, "ema.safetensors")
        if os.path.exists(ema_path):
            ema = [t.to(device).float() for t in load_or_exit(ema_path).state_dict().values()]

    model = raw_model
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in raw_model.blocks:
            fully_shard(block)
        fully_shard(raw_model)
    elif world > 1:
        model = torch.nn.parallel.DistributedDataParallel(raw_model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    opt = make_optimizer(raw_model.parameters(), cfg)
    if cfg.resume:
        if state["world_size"] != world and cfg.fsdp:
            raise SystemExit(f"error: FSDP optimizer state was saved with {state['world_size']} processes; resume with the same number")
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"])

    data = make_data(cfg, raw_model.config, device)
    y_null, mask_null = (t.to(device) for t in data.null())  # the empty caption, for CFG dropout
    print0(f"model: {n_params(raw_model) / 1e6:.2f}M parameters, depth {raw_model.config.depth}; world {world}, "
           f"micro-batch {micro} x accumulation {accum} = global batch {cfg.batch_size}; bf16 {bf16}")
    log = open(os.path.join(cfg.out_dir, "log.jsonl"), "a" if cfg.resume else "w") if rank == 0 else None
    from tqdm import tqdm
    bar = tqdm(total=cfg.max_steps, initial=step, disable=rank != 0 or not cfg.progress, dynamic_ncols=True)
    losses, result, t0, t_log, step_log = [], None, time.time(), time.time(), step
    first_bad = torch.full((), -1, device=device)  # the first step with a non-finite loss, kept on device: no sync

    while step < cfg.max_steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss_sum = torch.zeros((), device=device)
        for m in range(accum):
            shard = rank * accum + m  # this micro-batch's slice of the global batch
            batch = {k: v.to(device) if torch.is_tensor(v) else v
                     for k, v in data.get_batch(step, cfg.batch_size, shard, world * accum).items()}
            sync = m == accum - 1
            ctx = model.no_sync() if (world > 1 and not cfg.fsdp and not sync) else nullcontext()
            if cfg.fsdp:
                model.set_requires_gradient_sync(sync)
            with ctx:
                loss = flow_loss(model, batch, y_null, mask_null, step, shard * micro, cfg, autocast) / accum
                loss.backward()
            loss_sum += loss.detach()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss_sum), step + 1, first_bad)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            torch._foreach_lerp_(ema, [p.detach().float() for p in raw_model.state_dict().values()], 1 - cfg.ema_decay)
        step += 1
        bar.update(1)

        last = step == cfg.max_steps
        saving = step % cfg.save_every == 0 or last
        if step % cfg.log_every == 0 or saving:  # the one host sync of the non-finite check: before log and save
            if world > 1:
                dist.all_reduce(first_bad, op=dist.ReduceOp.MAX)
            if first_bad.item() >= 0:
                raise SystemExit(f"error: loss is not finite at step {first_bad.item()}; stopped. "
                                 f"{good_checkpoint_line(last_good)} Lower --lr or use --dtype=float32.")
        if step % cfg.log_every == 0 or last:
            if world > 1:
                dist.all_reduce(loss_sum)
                loss_sum /= world
            loss_val = loss_sum.item()
            now = time.time()
            rate = (step - step_log) / (now - t_log)
            t_log, step_log = now, step
            losses.append((step, loss_val))
            bar.set_postfix(loss=f"{loss_val:.4f}", img_s=f"{rate * cfg.batch_size:.0f}")
            if log:
                log.write(json.dumps({"step": step, "loss": loss_val, "lr": lr_at(step - 1, cfg), "steps_per_s": rate,
                                      "img_per_s": rate * cfg.batch_size, "minutes": (now - t0) / 60}) + "\n")
                log.flush()
        if cfg.val_every and (step % cfg.val_every == 0 or last):
            t_val = time.time()  # not training time either
            val = validation_loss(raw_model, data, y_null, mask_null, cfg, device, autocast, world * accum)  # all ranks: FSDP
            if rank == 0:
                log.write(json.dumps({"step": step, "val_loss": val, "val_seconds": time.time() - t_val}) + "\n")
                log.flush()
            if world > 1:
                dist.barrier()
            t0 += time.time() - t_val
            t_log += time.time() - t_val
        if cfg.eval_every and (step % cfg.eval_every == 0 or last) and cfg.data == "shapes":
            t_eval = time.time()  # the clocks (throughput, the log's minutes) count training, not evaluation
            if rank == 0:
                result = evaluate_shapes(raw_model, data, cfg, device, step)
                print0(f"\nstep {step}: checker overall {result['overall']:.3f} " +
                       " ".join(f"{k} {v:.2f}" for k, v in result.items() if k != "overall"))
                log.write(json.dumps({"step": step, "eval": result, "minutes": (t_eval - t0) / 60,
                                      "eval_seconds": time.time() - t_eval}) + "\n")
                log.flush()
            if world > 1:
                dist.barrier()
            t0 += time.time() - t_eval
            t_log += time.time() - t_eval
        if saving:
            last_good = save_checkpoint(cfg, raw_model, ema, opt, step, rank, world, last_good)
        if last:
            break
    bar.close()
    if rank == 0 and cfg.layout != "ours":  # the final checkpoint (whole even under FSDP), for another code base
        export = os.path.join(cfg.out_dir, "model.pth" if cfg.layout == "official" else "diffusers")
        final = LinearDiT.from_pretrained(os.path.join(cfg.out_dir, "ckpt", "model.safetensors"), dtype=None)
        final.save_pretrained(export, cfg.layout, **{k: v for k, v in final.meta.items() if k not in FILE_KEYS})
        print0(f"wrote {export} ({cfg.layout} layout)")
    if world > 1:
        dist.destroy_process_group()
    return {"step": step, "losses": losses, "eval": result, "minutes": (time.time() - t0) / 60}


# -----------------------------------------------------------------------------
# --dry_run: memory per GPU without allocating the model


def saved_activation_bytes(mcfg, depth, batch, tokens_hw):
    """Bytes autograd saves for backward in one forward (fp32), counted on the meta device."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    with torch.device("meta"):
        model = LinearDiT(dataclasses.replace(mcfg, depth=depth, grad_checkpointing=False))
        x = torch.randn(batch, mcfg.in_channels, tokens_hw * mcfg.patch_size, tokens_hw * mcfg.patch_size)
        y = torch.randn(batch, mcfg.text_max_length, mcfg.caption_channels)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, torch.rand(batch), y, torch.ones(batch, mcfg.text_max_length))
    return total[0]


def dry_run(cfg):
    """Parameters, optimizer-state bytes and an estimate of memory per GPU for this preset and parallelism."""
    from came8bit import predicted_state_bytes
    check_config(cfg)
    if cfg.preset not in PRESETS:
        raise SystemExit(f"error: unknown preset '{cfg.preset}'; known: {', '.join(PRESETS)}")
    mcfg = dataclasses.replace(PRESETS[cfg.preset], depth=cfg.depth or PRESETS[cfg.preset].depth)  # the architecture
    with torch.device("meta"):
        model = LinearDiT(mcfg)
    params = list(model.parameters())
    P = n_params(model)
    gpus = cfg.gpus
    micro = cfg.micro_batch_size or cfg.batch_size // gpus
    hw = cfg.image_size // vae_factor(mcfg.vae) // mcfg.patch_size  # tokens per side
    # activations per sample and block: differences of meta-device counts cancel weights and non-block parts
    s = {(d, b): saved_activation_bytes(mcfg, d, b, hw) for d in (1, 2) for b in (1, 2)}
    per_block = (s[2, 2] - s[2, 1]) - (s[1, 2] - s[1, 1])
    rest = (s[1, 2] - s[1, 1]) - per_block
    bf16 = cfg.dtype in ("auto", "bfloat16")
    scale = 0.5 if bf16 else 1.0  # bf16 autocast halves most saved activations (fp32 islands excepted)
    block_in = hw * hw * mcfg.hidden_size * 4 * scale  # per sample: what checkpointing keeps per block
    acts = micro * scale * ((per_block + rest) if cfg.grad_checkpointing else (per_block * mcfg.depth + rest))
    acts += micro * block_in * mcfg.depth if cfg.grad_checkpointing else 0
    shard = gpus if cfg.fsdp else 1
    rows = []
    for name in ("came8bit", "came", "adamw"):
        opt = predicted_state_bytes(params, optimizer=name)
        total = (4 * P + 4 * P + opt) / shard + acts  # fp32 weights + fp32 grads + optimizer state, + activations
        rows.append((name, opt, total))
    print(f"preset {cfg.preset}: depth {mcfg.depth}, width {mcfg.hidden_size}, "
          f"{P / 1e9:.3f}B parameters; {gpus} GPU(s), {'FSDP' if cfg.fsdp else 'DDP'}, micro-batch {micro}, "
          f"{hw}x{hw} tokens, {'bf16' if bf16 else 'fp32'}, grad checkpointing {cfg.grad_checkpointing}")
    print(f"activations per GPU (estimate from meta-device saved tensors): {acts / 2**30:.2f} GiB")
    print(f"{'optimizer':10s} {'state GiB':>10s} {'B/param':>8s} {'memory per GPU GiB':>20s}")
    for name, opt, total in rows:
        print(f"{name:10s} {opt / 2**30:10.2f} {opt / P:8.2f} {total / 2**30:20.2f}")
    return rows


if __name__ == "__main__":
    cfg = parse_config(sys.argv[1:])
    if cfg.dry_run:
        dry_run(cfg)
    else:
        train(cfg)
