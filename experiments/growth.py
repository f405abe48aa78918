"""
Does model growth pay on the laptop? SANA-1.5 Sec. 2.2, Fig. 2 and Fig. 7, on the shapes world.

The paper's claim: a 4.8B model grown from a trained 1.6B one reaches the from-scratch model's quality with 60%
fewer training steps (Fig. 2), and of the three initialisations only partial preservation trains stably (Fig. 7:
cyclic and block replication go NaN at 4.8B). This script repeats the experiment at laptop scale:

1. small:   the laptop model (--preset shapes-c4: the shipped model's 8x8x4 latents) with --small_depth blocks
            (4), trained --small_steps steps (S1) from scratch.
2. grown:   grow.grow() it to --depth blocks (12) with each strategy, then train --grow_steps steps (S2):
            partial (keep the first 4 - drop_last blocks, new blocks identity; --drop_last 2 is the paper's
                     number, of 20 blocks there, so of 4 here it keeps only 2),
            cyclic  (theta_i = theta_{i mod N'}, the same --drop_last: the official code shares it),
            block   (theta_{3i+j} = theta_i) with drop_last 0, so that 4 -> 12 has r = 3 like the paper's 20 -> 60.
3. scratch: the 12-block model from scratch for S1 + S2 steps.
All runs share the seed, data stream, lr, batch, optimizer and schedule (config/shapes.py, then the flags here).
A grown run starts its step count, lr warmup and optimizer state afresh at 0 (train.py --grow_from), so its
step s sees the same batch as the scratch run's step s, and the small model's (train.py has no data offset).

Compute is counted in 12-block-equivalent steps: a small-model step costs small_depth/depth (4/12) of a
12-block step (per-step FLOPs scale with the number of blocks: torch's FlopCounterMode counts 0.336 for the
shapes-c4 preset at batch 64, forward + backward), so grown step s is at S1 * 4/12 + s. The measured training
CPU-minutes (log.jsonl, checker evaluations left out) are reported next to it, small model included. For each grown run
we report the compute at which it first reaches the scratch run's final loss (loss smoothed by a trailing mean
over --smooth logged losses; the target is the scratch's last smoothed value) and its final checker score
(evaluated every --eval_every steps), and the saving as a % of the scratch run's compute. "First reaches" is
the first crossing of a noisy curve, so it is early by about the noise of one smoothed value; the defaults
smooth over 100 steps. A run whose loss goes NaN is recorded as such. Outputs in --out: results.json,
results.md (README table with the command), growth.png (loss and checker score against 12-block-equivalent
steps, like Fig. 2/7), and one folder per run.

    python experiments/growth.py --out out/exp_growth12 --small_depth 4 --depth 12 --small_steps 500 \
        --grow_steps 500 --val_every 25 --jobs 2 --threads 1     # the README figure
    python experiments/growth.py --out /tmp/g --quick            # seconds: tiny preset, a few steps (tests)

Time: the README figure's command takes 61 min of wall time on a 2-core CPU shared with other jobs. Training
minutes (results.json, one thread per run): small 5.5, scratch 27.9 (1.7 s per 12-block step), grown 5.8-11.6
each, plus 8 min of checker scoring and validation; with --jobs 2 scratch trains beside the small model, then the
grown runs one after another. The defaults (1000 + 1000 steps) train twice as many steps: about twice that.
Interrupted? Run the same command again: each run has its own folder under --out, and a run whose final
checkpoint (and run.json) is there with the same settings is reused, not retrained; an unfinished one restarts.
"""

import argparse
import dataclasses
import json
import multiprocessing
import os
import shlex
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # experiments/: common.py (which adds the repo root)
from common import (base_config, final_checkpoint, minutes_at, plain_log_labels, pyplot, run_once,  # noqa: E402
                    save_figure, smooth, write_json, write_text)
from grow import growth_plan  # noqa: E402
from model import PRESETS  # noqa: E402

INITS = ("partial", "cyclic", "block")
QUICK = dict(preset="shapes-tiny", batch_size=4, small_steps=3, grow_steps=3, eval_every=3, eval_prompts=1,
             eval_steps=2, log_every=1, smooth=2, warmup_steps=1)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/exp_growth", help="folder for results and one sub-folder per run")
    p.add_argument("--config", default="config/shapes.py", help="the laptop training settings")
    p.add_argument("--preset", default="shapes-c4", help="model.PRESETS architecture (its depth is replaced)")
    p.add_argument("--small_depth", type=int, default=4)
    p.add_argument("--depth", type=int, default=12, help="the grown and scratch models' number of blocks")
    p.add_argument("--small_steps", type=int, default=1000, help="S1: the small model's training steps")
    p.add_argument("--grow_steps", type=int, default=1000, help="S2: steps after growing (scratch: S1 + S2)")
    p.add_argument("--inits", default=",".join(INITS), help="comma-separated growth strategies")
    p.add_argument("--drop_last", type=int, default=2, help="partial and cyclic; block always uses 0")
    p.add_argument("--batch_size", type=int, default=None, help="default: the config's (64)")
    p.add_argument("--lr", type=float, default=None, help="default: the config's")
    p.add_argument("--optimizer", default=None, help="default: the config's (came8bit)")
    p.add_argument("--warmup_steps", type=int, default=None, help="default: the config's (100)")
    p.add_argument("--came_bias_correction", type=int, choices=(0, 1), default=None,
                   help="CAME's optional bias correction (came8bit.py), 0 or 1; default: the config's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log_every", type=int, default=10)
    p.add_argument("--smooth", type=int, default=10, help="trailing mean over this many logged losses")
    p.add_argument("--eval_every", type=int, default=250, help="checker score every n steps")
    p.add_argument("--eval_prompts", type=int, default=0, help="0: the whole eval set; n: n per category")
    p.add_argument("--eval_steps", type=int, default=20, help="sampling steps of each checker evaluation")
    p.add_argument("--val_every", type=int, default=0,
                   help="n > 0: every n steps, the loss on train.py's fixed validation batches (the same batches and "
                        "noise for every run, so the runs compare without batch-to-batch noise); 0: off")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once, each in its own process (a GPU or a many-core node); 1: one by one")
    p.add_argument("--reanalyse", action="store_true",
                   help="rewrite the report of a finished experiment from its --out/results.json (no training)")
    p.add_argument("--quick", action="store_true", help="tiny preset, batch 4, 3 + 3 steps: seconds, for tests")
    first, _ = p.parse_known_args(argv)
    if first.quick:
        p.set_defaults(**QUICK)  # flags given explicitly still win
    args = p.parse_args(argv)
    args.inits = [s for s in args.inits.split(",") if s]
    if not args.inits or set(args.inits) - set(INITS):
        raise SystemExit(f"error: --inits={','.join(args.inits)}: use a comma-separated subset of {','.join(INITS)}")
    if min(args.small_steps, args.grow_steps, args.log_every, args.smooth, args.jobs) < 1 or min(args.eval_every,
                                                                                                 args.val_every) < 0:
        raise SystemExit("error: --small_steps, --grow_steps, --log_every, --smooth and --jobs must be >= 1, "
                         "--eval_every and --val_every >= 0")
    if args.preset not in PRESETS:
        raise SystemExit(f"error: unknown preset '{args.preset}'; known: {', '.join(PRESETS)}")
    for init in args.inits:  # the same check grow() makes, before any training
        try:
            growth_plan(args.small_depth, args.depth, init, drop_last_of(init, args))
        except ValueError as e:
            raise SystemExit(f"error: --inits {init}: {e}") from None
    return args


def drop_last_of(init, args):
    return 0 if init == "block" else args.drop_last  # block: 4 -> 12 with r = 3 (Sec. 2.2's 20 -> 60)


# -----------------------------------------------------------------------------
# analysis


def first_reaching(points, target, below):
    """First (step, value) with value <= target (below) or >= target (not below), or None."""
    for step, value in points:
        if (value <= target) if below else (value >= target):
            return step, value
    return None


def smoothed(run, window):
    return list(zip([s for s, _ in run["losses"]], smooth([l for _, l in run["losses"]], window)))


def reach(run, points, target, below, ref):
    """Where a grown run first reaches `target`: grown steps, 12-block-equivalent steps, CPU-minutes, savings."""
    hit = None if target is None else first_reaching(points, target, below)
    if hit is None:
        return None if target is None else {"reached": False, "steps": None, "equivalent_steps": None,
                                             "minutes": None, "saving_steps_pct": None, "saving_minutes_pct": None}
    equivalent = ref["small_offset_steps"] + hit[0]
    minutes = ref["small_minutes"] + minutes_at(run, hit[0])
    scratch_minutes = ref["scratch_minutes"]
    return {"reached": True, "steps": hit[0], "equivalent_steps": equivalent, "minutes": minutes,
            "saving_steps_pct": 100 * (1 - equivalent / ref["scratch_steps"]),
            "saving_minutes_pct": 100 * (1 - minutes / scratch_minutes) if scratch_minutes > 0 else None}


def matched(run, scratch, ref):
    """Fig. 2's question asked at the grown run's end: how many steps did scratch need for the same validation
    loss? Savings without the small model's compute (as the paper counts: its 1.6B model existed already) and
    with it (12-block-equivalent). None where scratch never got that low."""
    end_step, end_val = run["val"][-1]
    hit = first_reaching(scratch["val"], end_val, True)
    if hit is None:
        return None
    with_small = ref["small_offset_steps"] + end_step
    return {"value": end_val, "grown_steps": end_step, "scratch_steps": hit[0],
            "saving_grown_steps_pct": 100 * (1 - end_step / hit[0]),
            "saving_with_small_pct": 100 * (1 - with_small / hit[0])}


def seconds_per_step(run):
    return 60 * run["train_minutes"] / run["losses"][-1][0] if run["losses"] else None


def analyse(runs, args):
    scratch, small = runs["scratch"], runs["small"]
    ratio = args.small_depth / args.depth  # per-step FLOPs of the small model / of the 12-block one
    curve = smoothed(scratch, args.smooth)
    t_small, t_scratch = seconds_per_step(small), seconds_per_step(scratch)
    out = {"flop_ratio": ratio,
           "measured_time_ratio": t_small / t_scratch if t_small and t_scratch else None,
           "small_offset_steps": args.small_steps * ratio,  # the small model's training, 12-block-equivalent
           "small_minutes": small["train_minutes"],
           "scratch_steps": args.small_steps + args.grow_steps, "scratch_minutes": scratch["train_minutes"],
           "target_loss": curve[-1][1] if curve else None,
           "target_checker": scratch["evals"][-1][1] if scratch["evals"] else None,
           "target_val": scratch["val"][-1][1] if scratch.get("val") else None, "grown": {}}
    for init in args.inits:
        run = runs[init]
        curve = smoothed(run, args.smooth)
        out["grown"][init] = {
            "status": run["status"], "nan_step": run["nan_step"],
            "final_loss": curve[-1][1] if curve else None,
            "final_checker": run["evals"][-1][1] if run["evals"] else None,
            "loss": reach(run, curve, out["target_loss"], True, out),
            "checker": reach(run, run["evals"], out["target_checker"], False, out),
            "final_val": run["val"][-1][1] if run.get("val") else None,
            "val": reach(run, run.get("val", []), out["target_val"], True, out) if run.get("val") else None,
            "matched": matched(run, scratch, out) if run.get("val") and scratch.get("val") else None}
    return out


# -----------------------------------------------------------------------------
# report


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def reach_cells(r):
    if r is None:
        return ["-", "-", "-"]
    if not r["reached"]:
        return ["not reached", "-", "-"]
    return [f"{r['equivalent_steps']:.0f}", f"{r['minutes']:.1f}",
            f"{fmt(r['saving_steps_pct'], '.0f')}% / {fmt(r['saving_minutes_pct'], '.0f')}%"]


def markdown(args, res, command):
    a = res
    head = ("| run | final loss | final checker | to scratch loss: steps | CPU-min | saving (steps / min) "
            "| to scratch checker: steps | CPU-min | saving (steps / min) |\n|" + "---|" * 9)
    rows = [f"| scratch, {args.depth} blocks, {a['scratch_steps']} steps | {fmt(a['target_loss'], '.4f')} | "
            f"{fmt(a['target_checker'], '.3f')} | {a['scratch_steps']} | {a['scratch_minutes']:.1f} | (reference) | "
            f"{a['scratch_steps']} | {a['scratch_minutes']:.1f} | (reference) |"]
    for init in args.inits:
        g = a["grown"][init]
        name = f"{init} (drop_last {drop_last_of(init, args)})"
        if g["status"] == "nan":
            name += f", NaN at step {g['nan_step']}"
        rows.append(f"| {name} | {fmt(g['final_loss'], '.4f')} | {fmt(g['final_checker'], '.3f')} | " +
                    " | ".join(reach_cells(g["loss"]) + reach_cells(g["checker"])) + " |")
    notes = (f"\nGrown runs: a {args.small_depth}-block model trained {args.small_steps} steps "
             f"({a['small_minutes']:.1f} CPU-min), grown to {args.depth} blocks, trained {args.grow_steps} more. "
             f"Steps are {args.depth}-block-equivalent: a small-model step counts {args.small_depth}/{args.depth} "
             f"(measured time ratio {fmt(a['measured_time_ratio'], '.2f')}), so every grown run starts at "
             f"{a['small_offset_steps']:.0f}. Loss: trailing mean of {args.smooth} logged losses; the target is the "
             f"scratch run's final value. CPU-minutes: training only, small model included, checker evaluations "
             f"left out. Saving: % of the scratch run's compute.\n")
    if a["target_val"] is not None:
        notes += ("\n| run (validation loss, fixed batches) | final | to scratch's final: steps | CPU-min | saving "
                  "(steps / min) |\n|---|---|---|---|---|\n"
                  f"| scratch | {a['target_val']:.4f} | {a['scratch_steps']} | {a['scratch_minutes']:.1f} | (reference) |\n")
        notes += "".join(f"| {init} | {fmt(a['grown'][init]['final_val'], '.4f')} | " +
                         " | ".join(reach_cells(a["grown"][init]["val"])) + " |\n" for init in args.inits)
        notes += ("\n| run | final validation loss | scratch's steps to it | saving: grown steps only (the paper's "
                  "count) | with the small model |\n|---|---|---|---|---|\n")
        for init in args.inits:
            m = a["grown"][init]["matched"]
            notes += (f"| {init} | {fmt(a['grown'][init]['final_val'], '.4f')} | " + (
                f"{m['scratch_steps']} | {m['saving_grown_steps_pct']:.0f}% | {m['saving_with_small_pct']:.0f}% |\n"
                if m else "below scratch's final | - | - |\n"))
    if a["target_checker"] is not None and a["target_checker"] <= 0:
        notes += "\nThe scratch run's final checker score is 0: every run reaches it, so that column says nothing.\n"
    return f"```\n{command}\n```\n\n{head}\n" + "\n".join(rows) + "\n" + notes


def plot(args, runs, res, path):
    plt = pyplot()
    if plt is None:
        print("matplotlib is not installed: growth.png skipped (results.json and results.md are written)")
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ratio, offset = res["flop_ratio"], res["small_offset_steps"]
    curves = [("scratch", runs["scratch"], 0.0, 1.0, "k"),
              (f"small ({args.small_depth} blocks)", runs["small"], 0.0, ratio, "0.6")]
    curves += [(f"grown: {i}", runs[i], offset, 1.0, c) for i, c in zip(args.inits, ("C0", "C1", "C2"))]
    for name, run, x0, scale, color in curves:
        pts = smoothed(run, args.smooth)
        ax1.plot([x0 + s * scale for s, _ in pts], [l for _, l in pts], color=color, label=name)
        if run.get("val"):  # the fixed-batch validation loss, as markers on the same axes
            ax1.plot([x0 + s * scale for s, _ in run["val"]], [v for _, v in run["val"]], ".", color=color, ms=4)
        if run["evals"]:
            ax2.plot([x0 + s * scale for s, _ in run["evals"]], [v for _, v in run["evals"]], "o-", color=color)
    if res["target_loss"] is not None:
        ax1.axhline(res["target_loss"], color="k", ls=":", lw=0.8)
    ax1.set(xlabel=f"{args.depth}-block-equivalent steps", ylabel=f"loss (mean of {args.smooth} logged)",
            yscale="log", title=f"growth {args.small_depth} -> {args.depth} blocks vs scratch")
    plain_log_labels(ax1)
    if res["target_checker"] is not None:
        ax2.axhline(res["target_checker"], color="k", ls=":", lw=0.8)
    ax2.set(xlabel=f"{args.depth}-block-equivalent steps", ylabel="checker score (overall)", title="checker score")
    ax1.legend()
    save_figure(plt, fig, path)
    return True


# -----------------------------------------------------------------------------
# the experiment


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.reanalyse:  # e.g. the logs of a run made on another machine: results.json keeps every curve
        path = os.path.join(args.out, "results.json")
        if not os.path.isfile(path):
            raise SystemExit(f"error: --reanalyse needs {path}; run the experiment first")
        saved = json.load(open(path))
        settings = saved["settings"]  # the experiment's flags, except where to write and this one
        kept = {k: v for k, v in settings.items() if k not in ("train_config", "out", "reanalyse")}
        return report(argparse.Namespace(**{**vars(args), **kept}), saved["runs"], saved["command"], settings)
    if args.threads:
        torch.set_num_threads(args.threads)
    given = {k: getattr(args, k) for k in ("batch_size", "lr", "optimizer", "warmup_steps", "came_bias_correction")
             if getattr(args, k) is not None}  # the rest comes from --config
    if "came_bias_correction" in given:
        given["came_bias_correction"] = bool(given["came_bias_correction"])
    # constant lr (decay_steps=0, the official schedule): the small model, the grown ones and scratch stop mid-way
    # at comparable lrs, and "steps to reach scratch's final loss" is not skewed by one run's cool-down
    base = base_config(args.config, preset=args.preset, seed=args.seed, decay_steps=0,
                       log_every=args.log_every,
                       eval_every=args.eval_every, eval_prompts=args.eval_prompts, eval_steps=args.eval_steps,
                       val_every=args.val_every,
                       progress=not args.quick, **given)
    base = dataclasses.replace(base, save_every=max(base.save_every, args.small_steps + args.grow_steps))  # final only
    out = lambda name: os.path.join(args.out, name)
    os.makedirs(args.out, exist_ok=True)

    # --jobs > 1: scratch needs nothing from the small model, so it trains beside it; the grown runs then train
    # side by side. Each run is the same function of its settings either way (its own seed and data stream).
    pool = None
    if args.jobs > 1:
        pool = ProcessPoolExecutor(args.jobs - 1, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=torch.set_num_threads, initargs=(args.threads or 1,))
        base = dataclasses.replace(base, progress=False)  # one tqdm bar per process would interleave

    def start(cfg):
        """Begin training `cfg` (in the pool, or here, at once); -> a function that returns its record."""
        if pool:
            return pool.submit(run_once, cfg).result
        record = run_once(cfg)
        return lambda: record

    scratch = start(dataclasses.replace(base, out_dir=out("scratch"), depth=args.depth,
                                        max_steps=args.small_steps + args.grow_steps))
    runs = {"small": run_once(dataclasses.replace(base, out_dir=out("small"), depth=args.small_depth,
                                                  max_steps=args.small_steps))}
    if runs["small"]["status"] != "ok":
        raise SystemExit(f"error: the small model's loss went NaN ({out('small')}); lower --lr and run again")
    small_ckpt = final_checkpoint(dataclasses.replace(base, out_dir=out("small"), max_steps=args.small_steps))
    grown = {init: start(dataclasses.replace(base, out_dir=out(f"grown_{init}"), depth=args.depth,
                                             grow_from=small_ckpt, grow_init=init,
                                             grow_drop_last=drop_last_of(init, args), max_steps=args.grow_steps))
             for init in args.inits}
    runs.update({init: wait() for init, wait in grown.items()})
    runs["scratch"] = scratch()
    if pool:
        pool.shutdown()

    command = "python experiments/growth.py " + " ".join(shlex.quote(a) for a in argv)
    return report(args, runs, command, dict(vars(args), train_config=dataclasses.asdict(base)))


def report(args, runs, command, settings):
    """results.json (every curve), results.md (the README tables) and growth.png in --out."""
    out = lambda name: os.path.join(args.out, name)
    res = analyse(runs, args)
    write_json(out("results.json"), {"command": command, "settings": settings, **res, "runs": runs})
    table = markdown(args, res, command)
    write_text(out("results.md"), table)
    plot(args, runs, res, out("growth.png"))
    print(table)
    return res


if __name__ == "__main__":
    main()
