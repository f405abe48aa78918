"""
Does 8-bit CAME converge like 32-bit CAME? SANA-1.5 Sec. 2.3 and Fig. 6, on the shapes world.

The paper's claim (Fig. 6): CAME-8bit's loss curve follows 32-bit CAME's and converges faster than AdamW, at
about 1/8 of AdamW's optimizer memory. This script trains the laptop model (config/shapes.py; --preset
shapes-c4, the shipped model's 8x8x4 latents) for the same --steps with each optimizer: came8bit (CAME8bit,
block-wise 8-bit first moments, Eq. 1), came (the same class with quantize=False), adamw (torch.optim.AdamW),
and came8bit_bc: CAME-8bit with the optional bias correction of its instability statistic (came8bit.py; not in
the paper, which the first three follow: they run without it whatever the config says). Everything else is
shared: seed (so the same initial weights), data stream, noise and timesteps (train.py draws them from (seed,
step, sample)), batch, schedule and one lr for all four. The paper compares at equal settings, so AdamW gets
the CAMEs' lr too, not a tuned one of its own: its curve says how AdamW does at that lr, not at its best.

Measured, per optimizer: the loss curve (log.jsonl), the final loss (mean of the last 10% of logged losses),
the checker score at the last step, optimizer-state bytes (came8bit.optimizer_state_bytes of a fresh optimizer
on the laptop model after one step) and training wall time. Reported: final loss of CAME-8bit / CAME-32 (goal:
within 2%) and of AdamW / CAME-32. Since all runs see identical batches and noise, the ratio compares the
optimizers, not two draws of the data. Outputs in --out: results.json, results.md (README table with the
command), came.png (loss against step, like Fig. 6), and one folder per run.

    python experiments/came_convergence.py --out out/exp_came --steps 800 --threads 1 --lr 2e-3   # the README figure
    python experiments/came_convergence.py --out /tmp/c --quick        # seconds: tiny preset (tests)

Time: the README figure's command takes 48.5 min of wall time on a 2-core CPU shared with other jobs: 46.8
training minutes for the four runs (0.76-1.03 s per step on one thread; the report's "train min" column) and
under half a minute of checker scoring each; the default 2000 steps take ~2.5x that.
Interrupted? Run the same command again: each run has its own folder under --out, and a run whose final
checkpoint (and run.json) is there with the same settings is reused, not retrained; an unfinished one restarts.
"""

import argparse
import dataclasses
import os
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # experiments/: common.py (which adds the repo root)
from common import (base_config, plain_log_labels, pyplot, run_once, save_figure, smooth, write_json,  # noqa: E402
                    write_text)
from came8bit import optimizer_state_bytes  # noqa: E402
from model import PRESETS, LinearDiT  # noqa: E402
from train import make_optimizer  # noqa: E402

OPTIMIZERS = ("came8bit", "came", "adamw", "came8bit_bc")
NAMES = {"came8bit": "CAME-8bit", "came": "CAME-32", "adamw": "AdamW-32", "came8bit_bc": "CAME-8bit + bias corr."}
QUICK = dict(preset="shapes-tiny", batch_size=4, steps=4, eval_prompts=1, eval_steps=2, log_every=1, warmup_steps=1)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/exp_came", help="folder for results and one sub-folder per run")
    p.add_argument("--config", default="config/shapes.py", help="the laptop training settings")
    p.add_argument("--preset", default="shapes-c4", help="model.PRESETS architecture")
    p.add_argument("--steps", type=int, default=2000, help="training steps of every run")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated subset of " + ",".join(OPTIMIZERS))
    p.add_argument("--batch_size", type=int, default=None, help="default: the config's (64)")
    p.add_argument("--lr", type=float, default=None, help="one lr for every optimizer; default: the config's")
    p.add_argument("--warmup_steps", type=int, default=None, help="default: the config's (100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log_every", type=int, default=10)
    p.add_argument("--eval_prompts", type=int, default=0, help="checker at the last step; 0: the whole eval set")
    p.add_argument("--eval_steps", type=int, default=20, help="sampling steps of the checker evaluation")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    p.add_argument("--quick", action="store_true", help="tiny preset, batch 4, 4 steps: seconds, for tests")
    first, _ = p.parse_known_args(argv)
    if first.quick:
        p.set_defaults(**QUICK)  # flags given explicitly still win
    args = p.parse_args(argv)
    args.optimizers = [o for o in args.optimizers.split(",") if o]
    if not args.optimizers or set(args.optimizers) - set(OPTIMIZERS):
        raise SystemExit(f"error: --optimizers={','.join(args.optimizers)}: use a comma-separated subset of "
                         f"{','.join(OPTIMIZERS)}")
    if min(args.steps, args.log_every) < 1:
        raise SystemExit("error: --steps and --log_every must be >= 1")
    if args.preset not in PRESETS:
        raise SystemExit(f"error: unknown preset '{args.preset}'; known: {', '.join(PRESETS)}")
    return args


# -----------------------------------------------------------------------------
# measurements


def arm(base, name):
    """The TrainConfig of one arm: the paper's optimizers without the bias correction, came8bit_bc with it."""
    return dataclasses.replace(base, optimizer=name.removesuffix("_bc"), came_bias_correction=name.endswith("_bc"))


def state_bytes(cfg):
    """Optimizer-state bytes of a fresh optimizer on the model after one step (the state exists from step 1)."""
    torch.manual_seed(cfg.seed)
    model = LinearDiT(PRESETS[cfg.preset])
    opt = make_optimizer(model.parameters(), cfg)  # exactly what train.py builds
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    return optimizer_state_bytes(opt), sum(p.numel() for p in model.parameters())


def final_loss(run):
    """Mean of the last 10% of logged losses (at least one)."""
    losses = [l for _, l in run["losses"]]
    tail = losses[-max(1, len(losses) // 10):]
    return sum(tail) / len(tail) if tail else None


def ratio(a, b):
    return a / b if a is not None and b else None


# -----------------------------------------------------------------------------
# report


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def markdown(args, res, command):
    head = ("| optimizer | final loss | / CAME-32 | checker | state bytes | B/param | / AdamW-32 | train min "
            "| s/step |\n|" + "---|" * 9)
    rows = []
    for name in args.optimizers:
        r = res["runs"][name]
        label = NAMES[name] + (f", NaN at step {r['nan_step']}" if r["status"] == "nan" else "")
        rows.append(f"| {label} | {fmt(r['final_loss'], '.4f')} | {fmt(r['loss_vs_came'], '.4f')} | "
                    f"{fmt(r['final_checker'], '.3f')} | {r['state_bytes']:,} | {r['state_bytes_per_param']:.3f} | "
                    f"{fmt(r['bytes_vs_adamw'], '.3f')} | {r['train_minutes']:.1f} | "
                    f"{fmt(r['seconds_per_step'], '.2f')} |")
    goal = res["came8bit_over_came"]
    verdict = ("-" if goal is None else
               f"{goal:.4f} ({'within' if abs(goal - 1) <= 0.02 else 'NOT within'} the 2% goal)")
    notes = (f"\n{args.steps} steps each, one lr ({res['lr']:g}) for all, same seed, batches and noise. Final loss: "
             f"mean of the last 10% of logged losses. CAME-8bit / CAME-32 final loss: {verdict}. State bytes: "
             f"came8bit.optimizer_state_bytes after one step on the {args.preset} model ({res['params']:,} "
             f"parameters). Minutes: training only (checker evaluation left out).\n")
    return f"```\n{command}\n```\n\n{head}\n" + "\n".join(rows) + "\n" + notes


def plot(args, res, path):
    plt = pyplot()
    if plt is None:
        print("matplotlib is not installed: came.png skipped (results.json and results.md are written)")
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    window = max(1, len(next(iter(res["runs"].values()))["losses"]) // 50)  # ~50 points' worth of smoothing
    for name in args.optimizers:
        pts = res["runs"][name]["losses"]
        ax.plot([s for s, _ in pts], smooth([l for _, l in pts], window), label=NAMES[name],
                ls="--" if name == "came" else "-")  # dashed: CAME-8bit may lie right on top of it
    ax.set(xlabel="step", ylabel=f"loss (mean of {window} logged)", yscale="log",
           title=f"optimizers on the {args.preset} model, lr {res['lr']:g}")
    plain_log_labels(ax)
    ax.legend()
    save_figure(plt, fig, path)
    return True


# -----------------------------------------------------------------------------
# the experiment


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    given = {k: getattr(args, k) for k in ("batch_size", "lr", "warmup_steps") if getattr(args, k) is not None}
    base = base_config(args.config, preset=args.preset, seed=args.seed, max_steps=args.steps,
                       log_every=args.log_every, eval_every=args.steps, eval_prompts=args.eval_prompts,
                       eval_steps=args.eval_steps, save_every=args.steps, progress=not args.quick, **given)
    os.makedirs(args.out, exist_ok=True)
    nbytes = {name: state_bytes(arm(base, name)) for name in OPTIMIZERS}  # run or not
    params = nbytes["adamw"][1]
    res = {"lr": base.lr, "params": params, "state_bytes": {name: b for name, (b, _) in nbytes.items()}, "runs": {}}
    for name in args.optimizers:
        run = run_once(dataclasses.replace(arm(base, name), out_dir=os.path.join(args.out, name)))
        run.update(final_loss=final_loss(run), final_checker=run["evals"][-1][1] if run["evals"] else None,
                   state_bytes=nbytes[name][0], state_bytes_per_param=nbytes[name][0] / params,
                   bytes_vs_adamw=nbytes[name][0] / nbytes["adamw"][0],
                   seconds_per_step=60 * run["train_minutes"] / run["losses"][-1][0] if run["losses"] else None)
        res["runs"][name] = run
    came = res["runs"].get("came", {})
    for run in res["runs"].values():
        run["loss_vs_came"] = ratio(run["final_loss"], came.get("final_loss"))
    res["came8bit_over_came"] = res["runs"].get("came8bit", {}).get("loss_vs_came")
    res["goal_within_2pct"] = None if res["came8bit_over_came"] is None else abs(res["came8bit_over_came"] - 1) <= 0.02

    command = "python experiments/came_convergence.py " + " ".join(shlex.quote(a) for a in argv)
    settings = dict(vars(args), train_config=dataclasses.asdict(base))
    write_json(os.path.join(args.out, "results.json"), {"command": command, "settings": settings, **res})
    table = markdown(args, res, command)
    write_text(os.path.join(args.out, "results.md"), table)
    plot(args, res, os.path.join(args.out, "came.png"))
    print(table)
    return res


if __name__ == "__main__":
    main()
