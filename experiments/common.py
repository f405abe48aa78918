"""
Shared plumbing of the experiment scripts (growth.py, came_convergence.py): run train.train() once per run folder,
reuse a finished run, record a NaN run instead of crashing, read log.jsonl back, write JSON/markdown atomically,
and import matplotlib only if it is there.

A run folder is finished when it holds run.json (written last, atomically) with the same TrainConfig, the same
source checkpoint file (a grown run's small model: retrained, it invalidates the runs grown from it) and, for a
run that did not go NaN, its final checkpoint ckpt-<max_steps>/model.safetensors. Anything else in the folder is
an interrupted run: it is deleted and trained again from step 0 (no --resume: log.jsonl is appended to, so a
restart in place would mix two runs' lines).
"""

import dataclasses
import json
import os
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repo root: train.py, model.py, config/
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train import TrainConfig, parse_config, train  # noqa: E402

# -----------------------------------------------------------------------------
# configs and runs


def base_config(config_path, **overrides):
    """TrainConfig from a config/*.py file (path relative to the repo root or absolute), then overrides."""
    path = Path(config_path)
    path = path if path.is_absolute() or path.exists() else ROOT / path
    if not path.is_file():
        raise SystemExit(f"error: config file '{config_path}' not found (the laptop settings are config/shapes.py)")
    cfg = parse_config([str(path)])
    return dataclasses.replace(cfg, **overrides)


def comparable(cfg_dict):
    return {k: v for k, v in cfg_dict.items() if k != "progress"}  # the progress bar does not change a run


def final_checkpoint(cfg):
    return os.path.join(cfg.out_dir, f"ckpt-{cfg.max_steps:07d}", "model.safetensors")


def source_stamp(cfg):
    """(mtime, size) of the checkpoint a run starts from: a retrained source means the run must be retrained."""
    src = cfg.grow_from or cfg.init_from
    return [os.stat(src).st_mtime_ns, os.stat(src).st_size] if src and os.path.exists(src) else None


def is_finished(cfg):
    marker = os.path.join(cfg.out_dir, "run.json")
    if not os.path.exists(marker):
        return False
    with open(marker) as f:
        done = json.load(f)
    now, then = comparable(dataclasses.asdict(cfg)), comparable(done["train_config"])
    defaults = dataclasses.asdict(type(cfg)())
    then.update({k: v for k, v in now.items() if k not in then and v == defaults[k]})  # fields added since, at default
    same = then == now
    same = same and done.get("source") == source_stamp(cfg)
    return same and (done["status"] == "nan" or os.path.exists(final_checkpoint(cfg)))


def run_once(cfg):
    """Train `cfg` unless its folder already holds the finished run; -> read_run(cfg.out_dir).

    train() raises SystemExit on a non-finite loss: that is a result (Fig. 7's unstable growth), recorded as
    status "nan" with the step, not a crash. Every other SystemExit (bad settings) goes through."""
    if is_finished(cfg):
        print(f"reusing the finished run in {cfg.out_dir}", flush=True)
        return read_run(cfg.out_dir)
    shutil.rmtree(cfg.out_dir, ignore_errors=True)  # an interrupted run: start it again cleanly
    os.makedirs(cfg.out_dir)
    status, message = "ok", ""
    try:
        train(cfg)
    except SystemExit as e:
        if "loss is" not in str(e.code):
            raise
        status, message = "nan", str(e.code)
        print(f"{cfg.out_dir}: {message}", flush=True)
    done = {"status": status, "message": message, "train_config": dataclasses.asdict(cfg), "source": source_stamp(cfg)}
    write_json(os.path.join(cfg.out_dir, "run.json"), done)
    return read_run(cfg.out_dir)


def read_run(out_dir):
    """One run's record from its run.json and log.jsonl.

    losses: [[step, loss]]; evals: [[step, checker overall]]; val: [[step, loss on train.py's fixed validation
    batches]] (--val_every); minutes: [[step, training minutes]] (train.py's clock leaves out checker
    evaluations and validation: they are not training compute); eval_minutes: their total.
    nan_step: the step whose loss was not finite, or None."""
    with open(os.path.join(out_dir, "run.json")) as f:
        done = json.load(f)
    losses, evals, val, minutes, eval_seconds = [], [], [], [], 0.0
    log_path = os.path.join(out_dir, "log.jsonl")
    lines = open(log_path).read().splitlines() if os.path.exists(log_path) else []
    for line in lines:
        entry = json.loads(line)
        if "eval" in entry:
            evals.append([entry["step"], entry["eval"]["overall"]])
            eval_seconds += entry["eval_seconds"]
        elif "val_loss" in entry:
            val.append([entry["step"], entry["val_loss"]])
            eval_seconds += entry["val_seconds"]
        else:
            losses.append([entry["step"], entry["loss"]])
            minutes.append([entry["step"], entry["minutes"]])
    found = re.search(r"at step (\d+)", done["message"])
    return {"status": done["status"], "nan_step": int(found.group(1)) if found else None,
            "losses": losses, "evals": evals, "val": val, "minutes": minutes, "eval_minutes": eval_seconds / 60,
            "train_minutes": minutes[-1][1] if minutes else 0.0, "out_dir": out_dir}


# -----------------------------------------------------------------------------
# small numeric helpers


def smooth(values, window):
    """Trailing mean over the last `window` values (fewer at the start): the loss of one batch is noisy."""
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i + 1 - window):i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def minutes_at(run, step):
    """Training minutes of `run` when it logged `step` (its first logged step at or after `step`)."""
    for s, m in run["minutes"]:
        if s >= step:
            return m
    return run["train_minutes"]


# -----------------------------------------------------------------------------
# output files


def write_text(path, text):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=1) + "\n")


def pyplot():
    """matplotlib.pyplot with the file-only backend, or None when matplotlib (an optional extra) is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plain_log_labels(ax):
    """A log-scale y axis labelled 0.05, 0.1, 0.2 instead of 5 x 10^-2 (matplotlib still picks which ticks)."""
    from matplotlib.ticker import LogFormatter

    class Plain(LogFormatter):
        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""
    ax.yaxis.set_major_formatter(Plain())
    ax.yaxis.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def save_figure(plt, fig, path):
    tmp = f"{path}.tmp.png"  # savefig picks the format from the suffix
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
