"""
Best-of-N at a fraction of its cost on the shapes world: judge every candidate's x0 preview after a few of the
sampler's 20 steps and finish only the ones the judge keeps (sample.py --schedule). Beyond the paper: SANA-1.5
Sec. 2.5 samples all N images in full and leaves the efficiency for future work.

    python experiments/early_verdicts.py --previews --out out/exp_previews   # how well judges rank previews
    python experiments/early_verdicts.py --out out/exp_early                 # the README figure and JSON

A rectified-flow model predicts the clean image at every step, x0 = x - sigma v (flow.predicted_x0, the
sampler's own data prediction), so the preview after step k costs no extra DiT pass, only a decode.

--previews: on judge-training prompts only (shapes.judge_train_prompts, never an evaluation prompt), --groups
groups of --n candidates each; every candidate's previews after the steps of --steps_at, and the checker's
verdict on its finished image. For each judge (--judges: name=judge as sample.py's --judge takes it, ":1" = on
the image as is, one view; ";" between judges) and step: the mean within-prompt ranking AUC (savila.ranking_auc)
of the judge's logits on the previews against the checker on the finished images. -> previews.json.
--write_previews DIR: the same for other judge-training prompts, written as a preview judge's training set (each
preview labelled by its finished image, for `savila.py --train --images DIR`).

Default: on the evaluation set (89 prompts x 4 groups), side by side on the same threads and seeds:
- plain best-of-N for N = 1, 2, 4, ..., --n: one pass over candidate j = 0 .. n-1 of every group, each sampled
  and judged in its turn, so the cost of the first N candidates is what the pass measured for them (seconds of
  sampling and of judging, DiT rows, decodes, judge views), and the pick is the tournament over their answers;
- each schedule of --schedules (sample.py's step:keep syntax, ";" between schedules), run through
  sample.sample_images with its own costs (sample.Cost), the previews judged by --preview_judge and the
  survivors by the final judge (sample.py's default, the shipped pair).
-> early_verdicts.json (one entry per point: N, schedule, score, categories, seconds, dit_forwards,
judge_calls, decoder_calls, sampling_seconds, judging_seconds), early_verdicts.png (score against seconds).
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as `python experiments/early_verdicts.py`: the library files live at the repo root

import torch

import savila
import shapes
from experiments.common import pyplot, save_figure, write_json
from model import LinearDiT, check_flags, load_text_encoder
from sample import (DEFAULT_CKPT, DEFAULT_JUDGE, DEFAULT_PREVIEW_JUDGE, Cost, best_of, candidate_noise, counted,
                    format_schedule, generate, load_decoder, load_judge, sample_images, schedule)

STEPS = 20  # the sampler's steps (sample.py's default)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/exp_early", help="folder for the JSON and the plot")
    ap.add_argument("--previews", action="store_true", help="measure how well judges rank previews (see above)")
    ap.add_argument("--write_previews", metavar="DIR", help="write previews of judge-training prompts to train a "
                    "preview judge on (see above)")
    ap.add_argument("--n", type=int, default=32, help="candidates per group")
    ap.add_argument("--groups", type=int, default=100, help="--previews: groups of judge-training prompts")
    ap.add_argument("--steps_at", default="0,1,2,3,5,8", help="--previews: the preview steps")
    ap.add_argument("--judges", default=f"pair={DEFAULT_JUDGE};first={DEFAULT_PREVIEW_JUDGE}",
                    help="--previews: name=judge (sample.py's --judge; :1 = on one view), ';' between judges")
    ap.add_argument("--schedules", default="3:8;2:8;3:12,8:4;3:4;16/3:4;8/3:2", help="early-verdict schedules, "
                    "';' between them; N/ in front: of best-of-N (default --n)")
    ap.add_argument("--preview_judge", default=DEFAULT_PREVIEW_JUDGE, help="the judge of the previews (sample.py's "
                    "default: the first shipped judge on one view)")
    ap.add_argument("--eval_prompts", type=int, default=0, help="0: the whole eval set; else its first k per category")
    ap.add_argument("--seed", type=int, default=0, help="candidate noise seeds (sample.py's)")
    ap.add_argument("--batch_size", type=int, default=64, help="rows per sampling batch (sample.py's default)")
    ap.add_argument("--schedule_batch", type=int, default=256, help="rows per batch of a schedule's run before its "
                    "first verdict (whole prompts), so that the survivors still fill a batch of ~batch_size")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    check_flags(vars(args), [(k, lambda v: v >= 1, "must be an integer >= 1") for k in ("n", "groups", "batch_size", "schedule_batch")]
                + [(k, lambda v: v >= 0, "must be an integer >= 0") for k in ("eval_prompts", "seed", "threads")])
    args.steps_at = [int(k) for k in args.steps_at.split(",")]
    args.schedules = [(int(s.split("/")[0]) if "/" in s else args.n, schedule(s.split("/")[-1]))
                      for s in args.schedules.split(";") if s.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def pipeline(device="cpu"):
    model = LinearDiT.from_pretrained(DEFAULT_CKPT).to(device).eval()
    trained = model.meta.get("train_config", "{}")
    tc = json.loads(trained) if isinstance(trained, str) else trained
    encoder = load_text_encoder(model.config.text_encoder, model.config.text_max_length, device)
    run = argparse.Namespace(size=(tc["image_size"],) * 2, steps=STEPS, cfg=4.5, shift=tc["flow_shift"],
                             sampler="dpm++", progress=False)
    return model, encoder, load_decoder(model.config.vae, device), run


# -----------------------------------------------------------------------------
# --previews: ranking AUC of judges on the x0 previews, against the checker on the finished images


@torch.no_grad()
def preview_auc(args):
    texts, previews, finals = sample_previews(args, seed=101)  # fresh images of judge-training prompts
    labels = shapes.check_batch(finals, texts)
    table = {"labels_yes": sum(labels) / len(labels), "n": args.n, "groups": args.groups, "judges": {}}
    for spec in args.judges.split(";"):
        name, _, path = spec.partition("=")
        judge, rows = load_judge(path, "cpu"), {}
        for k, images in [("final", finals)] + [(k, previews[k]) for k in args.steps_at]:
            t0 = time.perf_counter()
            z = judge.logits(images, texts)
            auc = savila.ranking_auc(z, texts, labels)
            rows[str(k)] = {"auc": auc["mean"], "categories": {c: v for c, v in auc.items() if c != "mean"},
                            "seconds_per_image": (time.perf_counter() - t0) / len(texts)}
            write_json(os.path.join(args.out, "previews.json"), {**table, "judges": {**table["judges"], name: rows}})
            print(f"{name:8s} step {k!s:>5}: ranking AUC {auc['mean']:.3f}  "
                  + " ".join(f"{c} {v:.2f}" for c, v in auc.items() if c != "mean")
                  + f"  ({rows[str(k)]['seconds_per_image'] * 1e3:.1f} ms/image)", flush=True)
        table["judges"][name] = {"spec": path, "steps": rows}
    write_json(os.path.join(args.out, "previews.json"), table)
    return table


def write_previews(args):
    """A preview judge's training set (App. B, judge-training prompts only): each candidate's previews at
    --steps_at as PNGs, each labelled by the finished image it became (index.jsonl "labelled_by")."""
    from sample import write_outputs
    texts, previews, finals = sample_previews(args, seed=202)
    write_outputs(finals, texts, os.path.join(args.write_previews, "finished"))
    for k in args.steps_at:
        write_outputs(previews[k], texts, args.write_previews, tag=f"step{k}_")
    lines = [json.dumps({"file": f"step{k}_{i:05d}.png", "prompt": t, "labelled_by": f"finished/{i:05d}.png"})
             for k in args.steps_at for i, t in enumerate(texts)]
    with open(os.path.join(args.write_previews, "index.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} previews of {len(texts)} candidates to {args.write_previews}")


def sample_previews(args, seed):
    """--groups judge-training prompts x --n candidates: their previews after --steps_at {k: (N, 3, H, W)} and
    finished images (N, 3, H, W), in [-1, 1], and the prompt of each."""
    model, encoder, (decode, factor), run = pipeline()
    prompts = shapes.judge_train_prompts(args.groups, seed=seed)
    texts = [p.text for p in prompts for _ in range(args.n)]
    y_null, mask_null = encoder.null()
    side = run.size[0] // factor
    previews, finals = {k: [] for k in args.steps_at}, []
    t0 = time.perf_counter()
    for b in range(0, len(texts), args.batch_size):
        rows = range(b, min(b + args.batch_size, len(texts)))
        y, mask = encoder([texts[r] for r in rows])
        noise = torch.stack([candidate_noise(args.seed + 7, r // args.n, r % args.n, (model.config.in_channels, side, side))
                             for r in rows])

        def record(k, x0):
            if k in previews:
                previews[k].append(decode(x0).float().clamp(-1, 1))
        x = generate(model, y, mask, y_null, mask_null, noise, steps=run.steps, cfg=run.cfg, shift=run.shift,
                     verdict=record)
        finals.append(decode(x).float().clamp(-1, 1))
    print(f"sampled {len(texts)} candidates with previews in {time.perf_counter() - t0:.0f}s", flush=True)
    return texts, {k: torch.cat(v) for k, v in previews.items()}, torch.cat(finals)


# -----------------------------------------------------------------------------
# the experiment: score against cost, plain best-of-N and early verdicts


@torch.no_grad()
def plain_points(args, model, encoder, decoder, run, judge, groups):
    """Plain best-of-N for N = 1, 2, 4, ... n from one pass over the candidates: candidate j of every group is
    sampled and judged in turn, so the cost of best-of-N is the measured cost of candidates 0 .. N-1."""
    texts, steps, per = [p.text for p in groups], [], []
    images, answers = [], []
    for j in range(args.n):
        cost = Cost()
        t0 = time.perf_counter()
        one, _ = sample_images(model, encoder, decoder, texts, 1, argparse.Namespace(**{**vars(run), "seed": args.seed,
                               "batch_size": args.batch_size}), torch.device("cpu"), torch.float32, cost=cost,
                               first=j)
        said = counted(judge, cost)(one, texts)  # every group's candidate j, each with its own prompt
        images.append(one)
        answers.append(said)
        per.append(cost)
        print(f"candidate {j}: {time.perf_counter() - t0:.1f}s", flush=True)
    points, N = [], 1
    while N <= args.n:
        total = Cost(**{k: sum(getattr(c, k) for c in per[:N]) for k in vars(Cost())})
        if N == 1:
            total.judge_calls, total.judging_seconds = 0, 0.0  # nothing to choose among: no judge
        picks = [savila.tournament([answers[j][g] for j in range(N)])[0] for g in range(len(groups))]
        chosen = torch.stack([images[j][g] for g, j in enumerate(picks)])
        points.append(point(N, (), chosen, groups, total))
        N *= 2
    return points


def warm_up(args, model, encoder, decoder, run, judges, groups):
    """One-time work out of every measurement: the caption caches (prompts, and each judge's views of them) and
    the first calls, on a candidate (index --n) that no point uses."""
    texts = [p.text for p in groups]
    images, _ = sample_images(model, encoder, decoder, texts, 1, argparse.Namespace(**{**vars(run), "seed": args.seed,
                              "batch_size": args.batch_size, "steps": 2}), torch.device("cpu"), torch.float32, first=args.n)
    for judge in judges:
        judge(images, texts)


def point(N, rounds, images, groups, cost):
    result = shapes.evaluate(images, groups)
    entry = {"N": N, "schedule": [list(r) for r in rounds], "score": result["overall"],
             "categories": {k: v for k, v in result.items() if k != "overall"},
             "seconds": cost.sampling_seconds + cost.judging_seconds, **vars(cost)}
    print(f"N={N:3d} schedule {format_schedule(rounds) or '-':12s} score {entry['score']:.3f}  "
          f"{entry['seconds']:7.1f}s  DiT rows {cost.dit_forwards}  judge calls {cost.judge_calls}", flush=True)
    return entry


def schedule_point(args, N, rounds, model, encoder, decoder, run, preview, judge, groups):
    cost, texts = Cost(), [p.text for p in groups]
    sampling = argparse.Namespace(**{**vars(run), "seed": args.seed, "batch_size": args.schedule_batch})
    images, _ = sample_images(model, encoder, decoder, texts, N, sampling, torch.device("cpu"), torch.float32,
                              rounds, preview, cost)
    kept, _ = best_of(images, texts, rounds[-1][1], 1, counted(judge, cost))
    return point(N, rounds, kept, groups, cost)


def plot(points, path):
    plt = pyplot()
    if plt is None:
        return print("(matplotlib not installed: no plot; the numbers are in early_verdicts.json)")
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    plain = [p for p in points if not p["schedule"]]
    ax.plot([p["seconds"] for p in plain], [p["score"] for p in plain], "o-", label="plain best-of-N")
    for p in plain:
        ax.annotate(f"{p['N']}", (p["seconds"], p["score"]), textcoords="offset points", xytext=(3, -10), fontsize=7)
    for p in points:
        if p["schedule"]:
            ax.plot(p["seconds"], p["score"], "s", label=f"N={p['N']}, schedule {format_schedule(p['schedule'])}")
    ax.set_xscale("log")
    ax.set_xlabel("seconds (sampling + judging, one CPU thread)")
    ax.set_ylabel("checker overall")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(plt, fig, path)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.previews:
        return preview_auc(args)
    if args.write_previews:
        return write_previews(args)
    model, encoder, decoder, run = pipeline()
    judge, preview = load_judge(DEFAULT_JUDGE, "cpu"), load_judge(args.preview_judge, "cpu")
    prompts, seen = shapes.load_eval_prompts(), {}
    if args.eval_prompts:
        prompts = [p for p in prompts if seen.setdefault(p.category, []).append(p) or len(seen[p.category]) <= args.eval_prompts]
    groups = [p for p in prompts for _ in range(shapes.IMAGES_PER_PROMPT)]
    warm_up(args, model, encoder, decoder, run, [judge, preview], groups)
    points = plain_points(args, model, encoder, decoder, run, judge, groups)
    write_json(os.path.join(args.out, "early_verdicts.json"), points)
    for N, rounds in args.schedules:
        points.append(schedule_point(args, N, rounds, model, encoder, decoder, run, preview, judge, groups))
        write_json(os.path.join(args.out, "early_verdicts.json"), points)  # each point as soon as it is measured
    write_json(os.path.join(args.out, "early_verdicts.json"), points)
    plot(points, os.path.join(args.out, "early_verdicts.png"))
    return points


if __name__ == "__main__":
    main(sys.argv[1:])
