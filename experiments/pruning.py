"""
The depth-pruning experiment on the shapes world: SANA-1.5's Table 3 and Fig. 5 in miniature (Sec. 2.4, 3.3).

    python train.py config/shapes.py                                          # the default --ckpt: 6 blocks
    python experiments/pruning.py --out out/exp_prune --finetune_lr 5e-4      # the README table
    python experiments/pruning.py --train_steps 2000 --out out/exp_prune      # first train a 12-block model
    python experiments/pruning.py --quick --out /tmp/exp_prune                # the test's smoke run (~30 s)

What it measures. A deep trained model (depth D) gets its block importance (Eq. 3, prune.block_importance over
100 calibration prompts with their images and 10 timesteps), drawn as a bar chart (importance.png, like Fig. 5).
It is pruned to 2/3 and 1/3 of its depth (the most important blocks stay, in order) and every model is scored by
the shapes checker the GenEval way: 4 images per prompt of the fixed eval set, the same noise seeds for every
model (sample.py's sampler and seeding), overall = mean over the six categories. Scored: the full model; each
pruned model as cut and after a 100-step fine-tune (train.py from the pruned file, the source run's loss, lr and
batch, 10 warm-up steps); and a model of the 1/3 depth trained from scratch with the same total compute.

Compute is counted in block-steps: a training step of a d-block model at the source run's batch costs d (the
blocks dominate; the patch, caption and timestep embedders and the final layer are not counted, nor is the
forward-only calibration pass). Pruned + fine-tuned: S*D (the big model's S steps) + F*d (F fine-tune steps).
The scratch model gets the same: S*D/d + F steps of d blocks. If the big model was itself grown from a smaller
one, that earlier training is not counted (the step count is the checkpoint's own).

The paper (Table 3; 4.8B = 60 blocks pruned to 40 and 20): 0.693 | 0.673 | +FT 0.684 | 0.571 | +FT 0.672, and
SANA-1.0 1.6B trained from scratch 0.664: pruning alone loses little at 2/3 and much at 1/3, 100 fine-tune steps
recover nearly all of it, and the pruned + fine-tuned small model beats the one trained from scratch.
Goal here: the 2/3 model after fine-tuning keeps >= 95% of the full model's checker score.
Deviation: the paper's small reference (SANA-1.0 1.6B) was trained on its own long schedule, not matched compute.

Outputs in --out: results.json, results.md (the Table-3 row, the paper's row, per-category scores, the command),
importance.png (matplotlib if installed, else prune.py's PIL chart), and the runs (source/ with --train_steps,
finetune_<d>/ with pruned.safetensors, scratch_<d>/). A second run with the same settings reuses the finished
source/ and scratch_<d>/ runs (experiments/common.run_once) and redoes the rest.

Time on a 2-core CPU shared with other jobs, one thread (OMP_NUM_THREADS=1): `python train.py config/shapes.py`
took 13.7 min, and the README table's command on its checkpoint 19.0 min (results.json "minutes": importance
0.1, scoring the full model 0.4, each pruned depth's two scores and fine-tune 0.7-1.0, the 6100-step 2-block
scratch model and its score 16.7). --quick takes 20-45 s. A deeper source costs more in proportion: its scratch
model trains as many block-steps as the source did, and a score or a fine-tune step scales with the depth.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as `python experiments/pruning.py`: the library files live at the repo root

import torch

import shapes
from experiments.common import final_checkpoint, pyplot, run_once, save_figure, write_json, write_text
from model import LinearDiT, load_text_encoder, n_params, save_model
from prune import (PruneConfig, bar_chart, block_importance, calibration_sigmas, finetune, kept_blocks, prune,
                   save_bar_png, shapes_calibration, source_train_config)
from sample import load_decoder, sample_images
from train import load_or_exit, make_data, parse_config, validation_loss

PAPER = {"full": 0.693, "prune_2/3": 0.673, "prune_2/3_ft": 0.684, "prune_1/3": 0.571, "prune_1/3_ft": 0.672,
         "scratch_1/3": 0.664}  # Table 3: 4.8B | 3.2B | +FT | 1.6B | +FT | SANA-1.0 1.6B (GenEval overall)
GOAL = 0.95  # the 2/3 model after fine-tuning keeps >= 95% of the full model's score

# defaults; --quick swaps in the second set (tiny model, few steps) for the test. Explicit flags win over both.
FULL = dict(train_steps=0, depth=12, preset="shapes-c4", train_batch_size=0, finetune_steps=100, calib_prompts=100,
            timesteps=10, eval_prompts=0, steps=20)
QUICK = dict(train_steps=4, depth=6, preset="shapes-tiny", train_batch_size=8, finetune_steps=2, calib_prompts=4,
             timesteps=2, eval_prompts=1, steps=2)


# -----------------------------------------------------------------------------
# small pieces


def parse_args(argv):
    ap = argparse.ArgumentParser(description="Block-importance pruning vs fine-tuning vs training from scratch "
                                             "(SANA-1.5 Table 3 / Fig. 5) on the shapes world.")
    ap.add_argument("--ckpt", default="out/shapes/ckpt/model.safetensors", help="the deep trained model")
    ap.add_argument("--out", default="out/exp_prune", help="folder for results.json/.md, importance.png, runs")
    ap.add_argument("--train_steps", type=int, help="> 0: first train a model from scratch (config/shapes.py, "
                                                    "--preset, --depth) for this many steps instead of --ckpt")
    ap.add_argument("--depth", type=int, help="depth of the model --train_steps trains (default 12)")
    ap.add_argument("--preset", help="architecture --train_steps trains (default shapes-c4)")
    ap.add_argument("--train_batch_size", type=int, help="batch of the --train_steps run (0: config/shapes.py's)")
    ap.add_argument("--finetune_steps", type=int, help="recovery fine-tune after pruning (default 100, the paper's)")
    ap.add_argument("--finetune_lr", type=float, default=0.0, help="lr of the recovery fine-tune (0: the source's)")
    ap.add_argument("--calib_prompts", type=int, help="calibration prompts for the importance (default 100)")
    ap.add_argument("--timesteps", type=int, help="timesteps the importance averages over (default 10)")
    ap.add_argument("--eval_prompts", type=int, help="0: the whole eval set; n: its first n prompts per category")
    ap.add_argument("--steps", type=int, help="sampler steps when scoring (default 20)")
    ap.add_argument("--cfg", type=float, default=4.5, help="guidance scale when scoring")
    ap.add_argument("--sampler", choices=["euler", "dpm++"], default="dpm++")
    ap.add_argument("--seed", type=int, default=0, help="noise seeds of the scored images (the same for every model)")
    ap.add_argument("--batch_size", type=int, default=64, help="images per sampling batch")
    ap.add_argument("--quick", action="store_true", help="tiny budgets; trains its own 6-block shapes-tiny model "
                                                          "unless --train_steps 0: a smoke test in seconds")
    ap.add_argument("--no_progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("finetune_steps", "calib_prompts", "timesteps", "steps", "batch_size", "depth"):
        if getattr(args, k) < 1:
            raise SystemExit(f"error: --{k} must be >= 1, got {getattr(args, k)}")
    if args.train_steps < 0 or args.eval_prompts < 0 or args.train_batch_size < 0 or args.finetune_lr < 0:
        raise SystemExit("error: --train_steps, --eval_prompts, --train_batch_size and --finetune_lr must be >= 0")
    return args


def eval_prompts(per_category):
    """The fixed eval set, or its first `per_category` prompts of each category (train.py's --eval_prompts)."""
    prompts, seen = shapes.load_eval_prompts(), {}
    if not per_category:
        return prompts
    return [p for p in prompts if seen.setdefault(p.category, []).append(p) or len(seen[p.category]) <= per_category]


def score(model, encoder, prompts, args, tc, device):
    """The checker's GenEval-style score: 4 images per prompt, image k of the list always from seed (seed, k)."""
    model.to(device).eval()
    groups = [p for p in prompts for _ in range(shapes.IMAGES_PER_PROMPT)]
    sampling = argparse.Namespace(size=(tc.image_size, tc.image_size), shift=tc.flow_shift, steps=args.steps, cfg=args.cfg,
                                  sampler=args.sampler, seed=args.seed, batch_size=args.batch_size,
                                  progress=args.progress)
    images, _ = sample_images(model, encoder, load_decoder(model.config.vae, device), [p.text for p in groups], 1,
                           sampling, device, torch.float32)  # (4P, 3, H, W) in [-1, 1]
    return shapes.evaluate(images, groups)


def validation(model, tc, device, batches=8):
    """train.py's loss on its fixed validation batches (the same images, noise and sigma for every model): a
    second, less noisy measure next to the checker's score."""
    cfg = dataclasses.replace(tc, val_batches=batches)
    data = make_data(cfg, model.config)
    y_null, mask_null = (t.to(device) for t in data.null())
    return validation_loss(model.to(device), data, y_null, mask_null, cfg, device, contextlib.nullcontext())


def trained(tc):
    """train.train(tc) unless tc.out_dir already holds that finished run (common.run_once); stop on a NaN run."""
    run = run_once(tc)
    if run["status"] != "ok":
        raise SystemExit(f"error: the run in {tc.out_dir} went NaN at step {run['nan_step']}; nothing to score")
    return final_checkpoint(tc)


def train_source(args):
    """--train_steps: a deep model from scratch with the laptop recipe (config/shapes.py) -> its checkpoint."""
    overrides = [f"--out_dir={os.path.join(args.out, 'source')}", f"--preset={args.preset}", f"--depth={args.depth}",
                 f"--max_steps={args.train_steps}", "--eval_every=0",
                 f"--save_every={args.train_steps}", f"--progress={args.progress}"]
    if args.train_batch_size:
        overrides.append(f"--batch_size={args.train_batch_size}")
    if args.quick:
        overrides.append("--warmup_steps=1")
    tc = parse_config([os.path.join(ROOT, "config", "shapes.py")] + overrides)
    return trained(tc)


def importance_png(importance, kept, path, title):
    """Fig. 5-style bars, coloured by which pruned models keep the block; PIL fallback without matplotlib."""
    plt = pyplot()
    if plt is None:
        save_bar_png(importance, kept["2/3"], path, title)
        return "PIL (matplotlib not installed): red = pruned at 2/3"
    colors = ["tab:blue" if i in kept["1/3"] else "tab:orange" if i in kept["2/3"] else "tab:red"
              for i in range(len(importance))]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(importance)), 3.2))
    ax.bar(range(len(importance)), importance.tolist(), color=colors)
    from matplotlib.patches import Patch
    ax.legend(handles=[Patch(color="tab:blue", label="kept at 1/3 and 2/3"),
                       Patch(color="tab:orange", label="kept at 2/3 only"),
                       Patch(color="tab:red", label="pruned at 2/3 and 1/3")], fontsize=7)
    ax.set_xlabel("block")
    ax.set_ylabel("block importance (Eq. 3)")
    ax.set_title(title, fontsize=9)
    save_figure(plt, fig, path)
    return "matplotlib"


def markdown(res):
    """results.md: the Table-3 row with the paper's row under it, per-category scores, compute, the command."""
    D, d2, d3 = res["source"]["depth"], res["depths"]["2/3"], res["depths"]["1/3"]
    cols = [("full", f"full ({D})"), ("prune_2/3", f"2/3 ({d2})"), ("prune_2/3_ft", "+FT"),
            ("prune_1/3", f"1/3 ({d3})"), ("prune_1/3_ft", "+FT"), ("scratch_1/3", f"scratch ({d3})")]
    cell = lambda v: f"{v:.3f}"
    names = {k: f"{k} ({res['params'][k] / 1e6:.2f}M)" for k, _ in cols}
    width = max(len(n) for n in names.values())
    goal = res["goal"]
    verdict = ("undefined: the full model scores 0" if goal["kept_fraction"] is None else
               f"{goal['kept_fraction']:.1%} -> {'met' if goal['met'] else 'NOT met'}")
    lines = ["# Depth pruning on the shapes world (SANA-1.5 Table 3 / Fig. 5)", "",
             "| | " + " | ".join(name for _, name in cols) + " |", "|---" * (len(cols) + 1) + "|",
             "| nanoSANA, checker overall | " + " | ".join(cell(res["scores"][k]["overall"]) for k, _ in cols) + " |",
             "| nanoSANA, validation loss (fixed batches; lower is better) | "
             + " | ".join(f"{res['val_loss'][k]:.4f}" for k, _ in cols) + " |",
             "| SANA-1.5 paper, GenEval (4.8B / 3.2B / 1.6B) | " + " | ".join(cell(PAPER[k]) for k, _ in cols) + " |",
             "", f"Goal: the 2/3 model after fine-tuning keeps >= {GOAL:.0%} of the full model's score: {verdict}.", "",
             "Per category (4 images per eval prompt, the same seeds for every model):", "", "```"]
    for i, (k, _) in enumerate(cols):
        lines.append(shapes.format_table(res["scores"][k], name=names[k].ljust(width), header=i == 0))
    c = res["compute"]
    lines += ["```", "", f"Block importance (importance.png): {', '.join(f'{v:.4f}' for v in res['importance'])}.",
              f"Kept at 2/3: {res['kept']['2/3']}; at 1/3: {res['kept']['1/3']}.", "",
              f"Compute in block-steps (steps x depth at the source batch {c['batch_size']}): source "
              f"{c['source_steps']} x {D} = {c['source_steps'] * D}; + the 1/3 model's fine-tune "
              f"{c['finetune_steps']} x {d3}; scratch {c['scratch_steps']} x {d3} = {c['scratch_steps'] * d3} "
              f"(= {c['source_steps']} x {D}/{d3} + {c['finetune_steps']}).",
              f"Scoring: {res['eval']['prompts']} eval prompts x {shapes.IMAGES_PER_PROMPT} images, "
              f"{res['eval']['sampler']} {res['eval']['steps']} steps, cfg {res['eval']['cfg']}, "
              f"seed {res['eval']['seed']}.",
              f"Wall time: {res['minutes']['total']:.1f} min ("
              + ", ".join(f"{k} {v:.1f}" for k, v in res["minutes"].items() if k != "total") + ").",
              "", "Command:", "", f"    {res['command']}", ""]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# the experiment


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t_start, minutes = time.time(), {}
    clock = [time.time()]

    def lap(name):
        minutes[name] = (time.time() - clock[0]) / 60
        clock[0] = time.time()

    ckpt = train_source(args) if args.train_steps else args.ckpt
    if args.train_steps:
        lap("train_source")
    if not os.path.exists(ckpt):
        raise SystemExit(f"error: checkpoint not found: {ckpt}; pass --ckpt, or --train_steps N to train one first")
    model = load_or_exit(ckpt)
    tc, saved = source_train_config(model)
    D = model.config.depth
    if not saved or "step" not in model.meta:
        raise SystemExit(f"error: {ckpt} has no training record (train_config, step) in its metadata; pass a "
                         "checkpoint written by train.py")
    if tc.data != "shapes":
        raise SystemExit(f"error: {ckpt} was not trained on the shapes world (data={tc.data!r}); "
                         "this experiment scores with the shapes checker")
    if D < 3:
        raise SystemExit(f"error: the model has {D} blocks; pruning to 2/3 and 1/3 needs at least 3")
    source_steps = int(json.loads(model.meta["step"]))
    depths = {"2/3": max(1, round(2 * D / 3)), "1/3": max(1, round(D / 3))}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = load_text_encoder(model.config.text_encoder, model.config.text_max_length, device)  # cached captions
    prompts = eval_prompts(args.eval_prompts)
    print(f"source {ckpt}: depth {D}, {source_steps} steps, lr {tc.lr}, batch {tc.batch_size}; scoring "
          f"{len(prompts)} prompts x {shapes.IMAGES_PER_PROMPT} images", flush=True)

    # Fig. 5: block importance over calibration prompts (with their images) and the sampler's timesteps
    model.to(device).eval()
    batches = shapes_calibration(args.calib_prompts, tc.image_size, encoder, model.config, seed=0)
    importance = block_importance(model, batches, calibration_sigmas(args.timesteps, tc.flow_shift))
    kept = {k: kept_blocks(d, D, importance) for k, d in depths.items()}
    print(bar_chart(importance, kept["2/3"]))
    print(f"kept at 2/3 ({depths['2/3']} blocks): {kept['2/3']}; at 1/3 ({depths['1/3']}): {kept['1/3']}", flush=True)
    renderer = importance_png(importance, kept, os.path.join(args.out, "importance.png"),
                              f"block importance, {D}-block model ({os.path.basename(ckpt)}, step {source_steps})")
    lap("importance")

    scores = {"full": score(model, encoder, prompts, args, tc, device)}
    val = {"full": validation(model, tc, device)}
    params = {"full": n_params(model)}
    print(f"full ({D} blocks): {scores['full']['overall']:.3f}", flush=True)
    lap("score_full")

    # Table 3: pruned, then the 100-step recovery fine-tune with the source run's loss and recipe (Sec. 2.4)
    ft_cfg = PruneConfig(finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr, progress=args.progress,
                         overwrite=True)  # finetune_<d>/ is this experiment's own folder: a rerun redoes it
    for frac, d in depths.items():
        pruned = prune(model, kept[frac])
        run_dir = os.path.join(args.out, f"finetune_{d}")
        os.makedirs(run_dir, exist_ok=True)
        init_path = os.path.join(run_dir, "pruned.safetensors")
        save_model(pruned, init_path, pruned_from=ckpt, kept_blocks=kept[frac], block_importance=importance.tolist(),
                   train_config=saved)
        scores[f"prune_{frac}"] = score(pruned, encoder, prompts, args, tc, device)
        val[f"prune_{frac}"] = validation(pruned, tc, device)
        params[f"prune_{frac}"] = params[f"prune_{frac}_ft"] = n_params(pruned)
        tuned, _ = finetune(ft_cfg, tc, init_path, run_dir)
        scores[f"prune_{frac}_ft"] = score(tuned, encoder, prompts, args, tc, device)
        val[f"prune_{frac}_ft"] = validation(tuned, tc, device)
        print(f"pruned to {d} blocks: {scores[f'prune_{frac}']['overall']:.3f}, after {args.finetune_steps} "
              f"fine-tune steps {scores[f'prune_{frac}_ft']['overall']:.3f}", flush=True)
        del pruned, tuned
        lap(f"prune_{frac}")

    # the same small depth from scratch, same total compute in block-steps: S*D + F*d = S' * d
    d = depths["1/3"]
    scratch_steps = round(source_steps * D / d) + args.finetune_steps
    scratch_cfg = dataclasses.replace(tc, out_dir=os.path.join(args.out, f"scratch_{d}"), depth=d, init_from="",
                                      grow_from="", resume=False, max_steps=scratch_steps,
                                      save_every=scratch_steps, eval_every=0, progress=args.progress)
    scratch = LinearDiT.from_pretrained(trained(scratch_cfg))
    scores["scratch_1/3"] = score(scratch, encoder, prompts, args, tc, device)
    val["scratch_1/3"] = validation(scratch, tc, device)
    params["scratch_1/3"] = n_params(scratch)
    print(f"scratch {d} blocks, {scratch_steps} steps: {scores['scratch_1/3']['overall']:.3f}", flush=True)
    lap("scratch")

    full, ft = scores["full"]["overall"], scores["prune_2/3_ft"]["overall"]
    fraction = ft / full if full > 0 else None  # undefined when the full model scores 0 (an untrained one)
    minutes["total"] = (time.time() - t_start) / 60
    res = {"command": "python experiments/pruning.py " + " ".join(shlex.quote(a) for a in argv),
           "source": {"ckpt": ckpt, "depth": D, "steps": source_steps, "lr": tc.lr, "batch_size": tc.batch_size},
           "depths": depths, "importance": importance.tolist(), "kept": kept, "importance_png": renderer,
           "scores": scores, "val_loss": val, "params": params, "paper": PAPER,
           "goal": {"kept_fraction": fraction, "target": GOAL, "met": fraction is not None and fraction >= GOAL},
           "compute": {"unit": "block-steps = steps x depth", "batch_size": tc.batch_size,
                       "source_steps": source_steps, "finetune_steps": args.finetune_steps,
                       "finetune_lr": args.finetune_lr or tc.lr, "scratch_steps": scratch_steps},
           "calibration": {"prompts": args.calib_prompts, "timesteps": args.timesteps},
           "eval": {"prompts": len(prompts), "images_per_prompt": shapes.IMAGES_PER_PROMPT, "steps": args.steps,
                    "cfg": args.cfg, "sampler": args.sampler, "seed": args.seed},
           "minutes": minutes}
    write_json(os.path.join(args.out, "results.json"), res)
    write_text(os.path.join(args.out, "results.md"), markdown(res))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
