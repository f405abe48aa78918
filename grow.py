"""
Model growth: start a deep LinearDiT from a trained shallow one (SANA-1.5 Sec. 2.2, Fig. 7, Fig. 11, App. C).

    python grow.py --src ckpt.safetensors --depth 60 --init partial --drop_last 2 --out grown.safetensors

Instead of training the 60-block 4.8B model from scratch, SANA-1.5 copies a trained 20-block 1.6B model into it
and trains on; the paper reaches the scratch run's quality with 60% fewer steps (Fig. 2). Every parameter outside
`blocks` (patch, timestep and caption embedders, the shared adaLN-single t_block, the caption norm, the final
layer) is carried over unchanged. The blocks follow a plan, one source block (or none) per target block, from one
of the paper's three strategies, applied to the first N' = N - drop_last source blocks:

- partial (Partial Preservation Init, the paper's choice): theta_i = theta_i^pre for i < N', new blocks after.
  A new block is random except for its three output projections (self-attention proj, cross-attention proj,
  weights and biases, and the FFN's point_conv, which has no bias), which start at zero ("Identity Mapping
  Initialization", Sec. 2.2). Every residual branch then adds exactly 0, so each new block is the identity and
  the grown model computes what the kept source blocks compute, bit for bit.
- cyclic (Cyclic Replication Init): theta_i = theta^pre_{i mod N'}.
- block (Block Replication Init): theta_{r i + j} = theta^pre_i, j < r, with r = depth / N'. The paper writes
  r = M/N but its example (20 -> 60 blocks, r = 3) is r = (N + M)/N, which is what we use. depth must be a
  multiple of N': a remainder would leave blocks with no source and no rule for them, so it is an error.

The paper reports that only partial preservation trains stably (Fig. 7: cyclic and block replication hit NaN
losses at 4.8B). It also drops the last two pretrained blocks before growing: they are the most task-specific
(Fig. 5a) and, kept, they dominate the residual stream so that the new blocks learn little (Sec. 3.3).

Where this follows the official code (diffusion/model/model_growth_utils.py):
- The official names are init_strategy "constant" (= partial), "cyclic" and "block_expand" (= block).
- drop_last is the official source_num_layers = N - drop_last, shared by every strategy, so it applies to
  cyclic and block too (pass drop_last=0 to replicate all N blocks, e.g. 20 -> 60 with r = 3).
- The grown model always has qk-norm (RMSNorm on q and k, App. C): SANA-1.5 grows with it for stability. A source
  without it (SANA-1.0) gains norms with weight 1, as in the official code. RMSNorm at weight 1 is not the
  identity, so this changes the function; the paper fine-tunes briefly (~1K steps, App. C) for the model to
  adapt, and the identity claim above holds only for a source that already has qk-norm.
Deviations, on purpose:
- New partial blocks take the model's own initialisation (LinearDiT.initialize_weights: xavier-uniform linears,
  PyTorch's default convs), not the official init_constant's N(0, 0.02^2) everywhere with N(0, 0.2^2) for the
  depthwise conv. At the official width 2240 the two agree within a factor 1.7 in every tensor (qkv 0.015 vs
  0.02, depthwise conv 0.19 vs 0.2, scale_shift_table 0.021 vs 0.02), and xavier also scales with the width, so
  the 128-wide laptop model is not initialised at a 2240-wide model's scale. The identity property is the same.
- No "zero_gate" option for replicated copies (official cyclic/block_expand): it is not in the paper.
"""

import dataclasses
import os

import torch

from model import LAYOUTS, ArgumentParser, LinearDiT, check_flags, check_layout_path, n_params, usage_error

STRATEGIES = ("partial", "cyclic", "block")
# the three output projections of a block (Sec. 2.2, "Identity Mapping Initialization"): zero -> block = identity
IDENTITY_ZEROED = ("attn.proj.weight", "attn.proj.bias", "cross_attn.proj.weight", "cross_attn.proj.bias",
                   "mlp.point_conv.conv.weight")

# -----------------------------------------------------------------------------
# the plan: which source block each target block starts from


def growth_plan(n_src, depth, init="partial", drop_last=2):
    """-> [(target index, source index or None)] for target blocks 0..depth-1; None = new (identity) block."""
    if init not in STRATEGIES:
        raise ValueError(f"unknown growth strategy '{init}': use one of {', '.join(STRATEGIES)}")
    if not 0 <= drop_last < n_src:
        raise ValueError(f"drop_last={drop_last} must be >= 0 and less than the source depth {n_src}")
    kept = n_src - drop_last  # N' in the docstring
    if depth <= kept:
        raise ValueError(f"depth={depth} does not grow the model: it must exceed the {kept} kept source blocks "
                         f"({n_src} - drop_last {drop_last})")
    if init == "block" and depth % kept:
        raise ValueError(f"block replication needs depth to be a multiple of the {kept} kept source blocks, "
                         f"got depth={depth}; use depth={kept * (depth // kept + 1)} or another strategy")
    if init == "partial":
        return [(i, i if i < kept else None) for i in range(depth)]
    if init == "cyclic":
        return [(i, i % kept) for i in range(depth)]
    r = depth // kept  # block replication: source block i fills targets r*i .. r*i + r-1
    return [(i, i // r) for i in range(depth)]


def describe_plan(plan):
    """Compress a plan into runs for printing: 'blocks 0-17 <- source 0-17', 'blocks 18-59 new (identity)'."""
    runs = []  # [first target, last target, first source, last source, step]; step 1: 0,1,2.. 0: 0,0,0..
    for i, j in plan:
        run = runs[-1] if runs else None
        if run and j is None and run[2] is None:  # a new block after new blocks
            run[1] = i
            continue
        if run and j is not None and run[3] is not None:
            step = j - run[3]
            if step in (0, 1) and run[4] in (None, step):  # the same source again, or the next one
                run[1], run[3], run[4] = i, j, step
                continue
        runs.append([i, i, j, j, None])
    lines = []
    for t0, t1, s0, s1, step in runs:
        tgt = f"blocks {t0}-{t1}" if t1 > t0 else f"block {t0}"
        if s0 is None:
            lines.append(f"{tgt:16s} new (identity: zeroed output projections)")
        elif step == 1:
            lines.append(f"{tgt:16s} <- source {s0}-{s1}")
        else:
            lines.append(f"{tgt:16s} <- source {s0}" + (f" (x{t1 - t0 + 1})" if t1 > t0 else ""))
    return lines


# -----------------------------------------------------------------------------
# growth


@torch.no_grad()
def grow(model, depth, init="partial", drop_last=2):
    """A new LinearDiT with `depth` blocks and qk-norm, initialised from `model` by one of the Sec. 2.2 strategies.

    The source is left untouched; the result is on the source's device and in its dtype, in training mode.
    """
    plan = growth_plan(len(model.blocks), depth, init, drop_last)
    p0 = next(model.parameters())
    with torch.device(p0.device):
        grown = LinearDiT(dataclasses.replace(model.config, depth=depth, qk_norm=True))  # the model's own init
    src, sd = model.state_dict(), grown.state_dict()
    for k in sd:
        if not k.startswith("blocks."):
            sd[k] = src[k]  # embedders, t_block, caption norm, final layer: carried over as they are
    block_keys = list(grown.blocks[0].state_dict())
    for i, j in plan:
        for name in block_keys:
            key = f"blocks.{i}.{name}"
            if j is None and name in IDENTITY_ZEROED:
                sd[key] = torch.zeros_like(sd[key])  # new block: output projections zero -> identity
            elif j is not None and f"blocks.{j}.{name}" in src:
                sd[key] = src[f"blocks.{j}.{name}"]
            # else: a new block's random tensor, or q/k norm weights (= 1) that a source without qk-norm lacks
    grown.load_state_dict(sd, strict=True)  # copies, so replicated blocks do not share storage
    return grown.to(p0.dtype)


# -----------------------------------------------------------------------------
# CLI

if __name__ == "__main__":
    ap = ArgumentParser(description="Grow a LinearDiT checkpoint to more blocks (SANA-1.5 Sec. 2.2).")
    ap.add_argument("--src", required=True, help="source checkpoint: ours (.safetensors), official .pth, "
                                                 "or a diffusers folder")
    ap.add_argument("--depth", type=int, required=True, help="number of blocks of the grown model")
    ap.add_argument("--init", default="partial", choices=STRATEGIES, help="growth strategy (default: partial)")
    ap.add_argument("--drop_last", type=int, default=2, help="drop the source's last blocks first (default: 2)")
    ap.add_argument("--out", required=True, help="where to write the grown model (see --layout)")
    ap.add_argument("--layout", default="ours", choices=LAYOUTS, help="ours (a .safetensors, default), official "
                                                                     "(.pth / .safetensors) or diffusers (a folder)")
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = ap.parse_args()
    check_flags(vars(args), [("depth", lambda v: v >= 1, "must be an integer >= 1"),
                             ("drop_last", lambda v: v >= 0, "must be an integer >= 0")])
    try:
        check_layout_path(args.out, args.layout)
    except ValueError as e:
        usage_error(f"--out {args.out}: {e}")
    if os.path.exists(args.out) and not args.overwrite:
        raise SystemExit(f"error: --out {args.out} exists; pass --overwrite to replace it or choose another --out")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise SystemExit(f"error: folder {out_dir} for --out does not exist; create it first")
    try:
        source = LinearDiT.from_pretrained(args.src)
        grown = grow(source, args.depth, init=args.init, drop_last=args.drop_last)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    plan = growth_plan(len(source.blocks), args.depth, args.init, args.drop_last)
    print(f"growing {args.src}: {len(source.blocks)} -> {args.depth} blocks, init={args.init}, "
          f"drop_last={args.drop_last}, qk_norm {source.config.qk_norm} -> True")
    for line in describe_plan(plan):
        print("  " + line)
    a, b = n_params(source), n_params(grown)
    print(f"params: {a / 1e6:.2f}M -> {b / 1e6:.2f}M (+{(b - a) / 1e6:.2f}M)")
    grown.save_pretrained(args.out, args.layout, grown_from=args.src, grow_init=args.init,
                          grow_drop_last=args.drop_last)
    print(f"wrote {args.out}")
