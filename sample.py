"""
Text-to-image sampling with SANA's flow samplers, and best-of-N inference scaling (SANA-1.5 Sec. 2.5).

- The samplers (Flow-Euler, Flow-DPM-Solver++ on the flow-shifted sigma grid) are flow.py's; this file adds
  classifier-free guidance on all latent channels, v = v_null + cfg (v_text - v_null), in one batched forward.
- Best-of-N (Sec. 2.5): N candidates per prompt, a judge answers yes/no for each, savila.tournament keeps K.
  The judge is SaVILA-tiny on the laptop (savila.py; it averages its logit over test-time views whose
  checker answer is the same), any transformers VLM at real scale, or the checker itself (the ceiling).
  Candidate j of prompt i starts from noise seeded by (seed, i, j), so the first N of 32 candidates are the
  N-candidate run: the inference-scaling curve (--curve) reuses one set of samples.
- Early verdicts (beyond the paper, which samples every candidate in full): --schedule step:keep,... judges
  each candidate's x0 preview (flow.predicted_x0, the sampler's own data prediction: no extra DiT pass) after
  `step` steps, keeps `keep` per prompt by the same tournament and samples only those on; --preview_judge may
  be a cheaper judge. Costs (DiT rows with CFG, decodes, judge views, seconds) go to out/cost.json.

    python sample.py                                     # the shipped laptop model on demo prompts -> out/samples
    python sample.py --prompt "a photo of a red circle" --best_of 32 --keep 1
    python sample.py --eval --best_of 32 --curve         # shapes world: score vs N (Fig. 8 / Table 2 analogue)
    python sample.py --eval --best_of 32 --schedule 3:8  # 8 of 32 finished, chosen on their previews after step 3
    python sample.py --ckpt <SANA1.5_1.6B_1024px_diffusers folder> --vae <dc-ae folder> --text_encoder <gemma-2-2b-it> \
        --size 1024 --prompt "a cyberpunk cat" --best_of 8 --judge <NVILA or any HF VLM folder>
"""

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import savila
import shapes
from flow import SAMPLERS, integrate, make_noise, timestep
from model import (ArgumentParser, DCAEDecoder, LinearDiT, check_flags, keep_freed_memory, load_text_encoder, resolve,
                   usage_error, use_bf16, writable_or_exit)

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CKPT = os.path.join(ROOT, "weights", "shapes.safetensors")  # the shipped laptop model
DEFAULT_JUDGE = ",".join(os.path.join(ROOT, "weights", f) for f in  # its shipped SaVILA-tiny judges, an ensemble
                         ("savila_tiny.safetensors", "savila_tiny_zoom.safetensors"))
DEFAULT_PREVIEW_JUDGE = os.path.join(ROOT, "weights", "savila_tiny.safetensors") + ":1"  # the first, on one view
DEMO_PROMPTS = ["a photo of a red circle", "a photo of three squares", "a photo of a triangle left of a circle",
                "a photo of a blue square and a yellow circle", "a photo of a green triangle",
                "a photo of a white circle and a black square"]


def guided_velocity(model, x, sigma, y, mask, y_null, mask_null, cfg):
    """One batched forward over [null, text]; guidance on every channel."""
    B = x.shape[0]
    t = torch.full((2 * B,), timestep(float(sigma)), device=x.device)
    v = model(torch.cat([x, x]), t, torch.cat([y_null, y]), torch.cat([mask_null, mask]))
    v_null, v_text = v.float().chunk(2)
    return v_null + cfg * (v_text - v_null)


@torch.no_grad()
def generate(model, y, mask, y_null, mask_null, noise, steps=20, cfg=4.5, shift=3.0, sampler="dpm++", verdict=None):
    """From x = noise at sigma_max to sigma = 0 with guidance. y (B, L, Dt), y_null (1 or B, L, Dt). -> x0 (B, C, H, W).
    verdict(k, x0) -> rows or None: flow.integrate's early verdicts; the captions follow the rows that go on."""
    B = noise.shape[0]
    y_null, mask_null = y_null.expand(B, -1, -1), mask_null.expand(B, -1)
    live = torch.arange(B)  # the rows of y still sampled

    def velocity(x, sigma):
        return guided_velocity(model, x, sigma, y[live], mask[live], y_null[live], mask_null[live], cfg)

    def judged(k, x0):
        nonlocal live
        rows = verdict(k, x0)
        live = live if rows is None else live[rows]
        return rows
    return integrate(velocity, noise, steps, shift, sampler, judged if verdict else None)


# -----------------------------------------------------------------------------
# loading the decoder (the model and its text encoder load through model.py)


def load_decoder(vae, device, channels=None):
    """-> (decode, factor): latents -> images in [-1, 1] with the DC-AE (divide by its scaling factor first) and
    its spatial factor (32 for SANA's f32c32), or the identity and 1 in pixel space. A decoder for other than
    `channels`-channel latents is refused here, before anything is sampled."""
    if not vae:
        return (lambda x: x), 1
    try:
        dec = DCAEDecoder.from_pretrained(resolve(vae)).to(device).eval()
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if channels is not None and dec.config.latent_channels != channels:
        raise SystemExit(f"error: the autoencoder {vae} decodes {dec.config.latent_channels}-channel latents and the "
                         f"model makes {channels}-channel ones: pass the model's own --vae")
    return (lambda z: dec(z / dec.scaling_factor)), 2 ** (len(dec.config.widths) - 1)


# -----------------------------------------------------------------------------
# generating candidates


def candidate_noise(seed, prompt_index, j, shape):
    """Candidate j of prompt i has its own noise: best of N is the first N of any larger run."""
    return make_noise(shape, seed * 1_000_003 + prompt_index * 4_099 + j)


@dataclass
class Cost:
    """What best-of-N spent, counted as it runs; the seconds measured on the threads it ran on."""
    dit_forwards: int = 0  # model rows: one per candidate per step, CFG's two (text and empty caption) counted
    decoder_calls: int = 0  # images decoded: early previews and finished candidates
    judge_calls: int = 0  # judge evaluations: every test-time view of every image (a VLM: one per image)
    sampling_seconds: float = 0.0  # the DiT and the decoder
    judging_seconds: float = 0.0  # the judge, on previews and on finished candidates


def counted(judge, cost):
    """The same judge, its calls and seconds added to cost (SaVILA-tiny counts the views it ran)."""
    def call(images, prompt):
        t0, views = time.perf_counter(), getattr(judge, "views_run", 0)
        answers = judge(images, prompt)
        cost.judge_calls += getattr(judge, "views_run", len(images)) - views
        cost.judging_seconds += time.perf_counter() - t0
        return answers
    return call


@torch.no_grad()
def sample_images(model, encoder, decoder, prompts, n, args, device, dtype, schedule=(), judge=None, cost=None,
                  first=0):
    """n candidates per prompt, in prompt order, decoded: (len(prompts) * m, 3, H, W) in [-1, 1] on the CPU, and
    the candidate index j of each (len(prompts) * m,). decoder: (decode, factor) from load_decoder.
    Early verdicts: schedule ((step, keep), ...): after `step` sampler steps, `judge` sees the x0 preview of each
    live candidate, the tournament keeps `keep` of each prompt's, and only those are sampled on; m is the last
    keep. No rounds (plain best-of-N): m = n, every candidate finished. first: candidates first .. first + n - 1."""
    cost, t0 = cost or Cost(), time.perf_counter()
    judged0, rounds = cost.judging_seconds, dict(schedule)
    c = model.config
    decode, factor = decoder
    h, w = (side // factor for side in args.size)  # latent height and width
    jobs = [(i, j) for i in range(len(prompts)) for j in range(first, first + n)]
    rows = max(1, args.batch_size // n) * n if rounds else args.batch_size  # early verdicts: whole prompts
    y_null, mask_null = (t.to(device) for t in encoder.null())  # the empty caption, without Gemma's prefix

    def net(x, *cond):  # the model, its rows counted: guided_velocity passes text and empty caption together
        cost.dit_forwards += len(x)
        return model(x, *cond)
    out, picked = [], []
    for b in tqdm(range(0, len(jobs), rows), desc="sampling", disable=not args.progress, leave=False):
        chunk = jobs[b:b + rows]
        live = torch.arange(len(chunk))  # the chunk's rows still sampled

        def verdict(k, x0):  # (rows, C, h, w) previews of the live candidates -> the rows that go on
            nonlocal live
            if k not in rounds:
                return None
            previews, per, kept = decode(x0).float().clamp(-1, 1).cpu(), len(live) * n // len(chunk), []
            cost.decoder_calls += len(x0)
            for g in range(0, len(live), per):  # one prompt's live candidates
                prompt = prompts[chunk[int(live[g])][0]]
                kept += [g + r for r in savila.tournament(counted(judge, cost)(previews[g:g + per], prompt), rounds[k])]
            live = live[kept]
            return torch.tensor(kept)

        y, mask = encoder([prompts[i] for i, _ in chunk])
        noise = torch.stack([candidate_noise(args.seed, i, j, (c.in_channels, h, w)) for i, j in chunk])
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            x = generate(net, y.to(device), mask.to(device), y_null, mask_null, noise.to(device), steps=args.steps,
                         cfg=args.cfg, shift=args.shift, sampler=args.sampler, verdict=verdict if rounds else None)
            out.append(decode(x).float().clamp(-1, 1).cpu())
        picked += [chunk[r][1] for r in live.tolist()]
        cost.decoder_calls += len(x)
    cost.sampling_seconds += time.perf_counter() - t0 - (cost.judging_seconds - judged0)
    return torch.cat(out), torch.tensor(picked)


# -----------------------------------------------------------------------------
# judges: SaVILA-tiny (laptop), any transformers VLM (real scale), or the checker itself (the ceiling)


def load_judge(name, device):
    """judge(images (N,3,H,W) in [-1,1], prompt) -> [(said_yes, confidence)]. SaVILA-tiny files may end in ":1":
    the judge on one view (the image as is) instead of its 20, ~20x cheaper (e.g. for early previews)."""
    if name == "checker":  # an oracle: what a perfect judge would pick (never the default)
        return lambda images, prompt: [(ok, 0.0) for ok in shapes.check_batch(images, [prompt] * len(images))]
    one = name.endswith(":1")
    paths = name[:-2] if one else name
    if all(p.endswith(".safetensors") for p in paths.split(",")):
        try:
            judge = savila.load(paths, device=device)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        for j in getattr(judge, "judges", [judge]):
            j.views = savila.VIEWS[:1] if one else savila.VIEWS
        return judge
    vlm = savila.VLMJudge(resolve(name), device=device)
    return lambda images, prompt: vlm(to_pil(images), prompt)


def to_pil(images):
    from PIL import Image
    return [Image.fromarray(a) for a in shapes.to_uint8(images)]


def best_of(images, prompts, n, keep, judge):
    """images (P*n, ...) grouped by prompt -> the kept (P*keep, ...) and the tournament picks per prompt."""
    kept, picks = [], []
    for i, p in enumerate(prompts):
        group = images[i * n:(i + 1) * n]
        winners = savila.tournament(judge(group, p), keep=keep)
        kept.append(group[winners])
        picks.append(winners)
    return torch.cat(kept), picks


# -----------------------------------------------------------------------------
# the paper's deployment extras (Impact Statement, App. D/E): safety screen and prompt rewriting

SAFETY_POLICY = ("No sexually explicit, violent, hateful or harassing content: the prompt must not ask for an "
                 "image depicting sexual acts or nudity, graphic violence or gore, hate symbols or slurs aimed at "
                 "protected groups, or content that demeans a real person.")


@torch.no_grad()
def unsafe_probability(prompts, path, device):
    """ShieldGemma-style screen: ask the guard whether the prompt violates the policy; P(Yes) of its first token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
    yes, no = (tok.encode(w, add_special_tokens=False)[0] for w in ("Yes", "No"))
    probs = []
    for p in prompts:
        text = ("You are a policy expert trying to help determine whether a user prompt is in violation of the "
                f"defined safety policies.\n\n<start_of_turn>\nHuman Question: {p.strip()}\n<end_of_turn>\n\n"
                f"Our safety principle is defined in the below:\n\n* {SAFETY_POLICY}\n\n===\n\nDoes the human "
                "question violate the above principle? Your answer must start with 'Yes' or 'No'.\n")
        logits = lm(**tok(text, return_tensors="pt").to(device)).logits[0, -1]
        probs.append(torch.softmax(logits[[yes, no]].float(), dim=0)[0].item())
    return probs


@torch.no_grad()
def rewrite_prompts(prompts, path, device, max_new_tokens=120):
    """Enrich short prompts with a chat model before encoding (App. D, "Prompt Rewrite Enhancement")."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
    out = []
    for p in prompts:
        msgs = [{"role": "user", "content": "Rewrite this image prompt with concrete visual details (colors, shapes, "
                 f"positions, lighting), in one sentence, and nothing else: {p}"}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True).to(device)
        gen = lm.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
        text = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        out.append(text or p)  # an empty rewrite keeps the original prompt
    return out


# -----------------------------------------------------------------------------
# the script


def read_prompts(args):
    if args.prompt and args.prompts:
        raise SystemExit("error: give --prompt or --prompts, not both")
    if args.prompts:
        if not os.path.isfile(args.prompts):
            raise SystemExit(f"error: prompts file {args.prompts} not found")
        lines = [l.strip() for l in open(args.prompts, encoding="utf-8", errors="strict")]
        prompts = [l for l in lines if l]
        if not prompts:
            raise SystemExit(f"error: {args.prompts} holds no prompts (one prompt per line)")
        return prompts
    return args.prompt or DEMO_PROMPTS


def write_outputs(images, prompts_per_image, out, tag=""):
    """One PNG per image + index.jsonl (savila.py reads it) + a grid with the prompts."""
    from PIL import Image
    os.makedirs(out, exist_ok=True)
    u8 = shapes.to_uint8(images)
    with open(os.path.join(out, "index.jsonl.tmp"), "w") as f:
        for k, (im, p) in enumerate(zip(u8, prompts_per_image)):
            name = f"{tag}{k:05d}.png"
            Image.fromarray(im).save(os.path.join(out, name))
            f.write(json.dumps({"file": name, "prompt": p}) + "\n")
    os.replace(os.path.join(out, "index.jsonl.tmp"), os.path.join(out, "index.jsonl"))
    grid = images[:48] if images.shape[-1] <= 64 else images[:8]
    shapes.save_grid(shapes.to_uint8(grid), prompts_per_image[:len(grid)], os.path.join(out, "grid.png"))


def evaluate_curve(images, prompts, n, judge, out):
    """Shapes world: score vs N = 1, 2, 4, ... n with the judge choosing, and with the checker (the ceiling).
    images hold 4 groups of n candidates per eval prompt (GenEval's 4 images per prompt)."""
    groups = [p for p in prompts for _ in range(shapes.IMAGES_PER_PROMPT)]
    texts = [p.text for p in groups]
    oracle = load_judge("checker", "cpu")
    rows, N = [], 1
    while N <= n:
        sub = torch.cat([images[g * n:g * n + N] for g in range(len(groups))])  # the first N of each group
        row, said = {"N": N}, {}
        for name, j in (("judge", judge), ("checker", oracle)):
            t0 = time.perf_counter()
            kept, _ = best_of(sub, texts, N, 1, recording(j, said.setdefault(name, [])))
            row[f"{name}_seconds"] = time.perf_counter() - t0  # judging N candidates per group, tournament included
            row[name] = shapes.evaluate(kept, groups)
        row["agreement"] = savila.agreement(said["judge"], said["checker"], [t for t in texts for _ in range(N)])
        rows.append(row)
        print(f"N={N:3d}  judge {row['judge']['overall']:.3f}  checker-picked (ceiling) {row['checker']['overall']:.3f}",
              flush=True)
        N *= 2
    last = rows[-1]
    print(f"judging {len(groups) * last['N']} candidates (best of {last['N']}): {last['judge_seconds']:.1f}s, "
          f"{len(groups) * last['N'] / last['judge_seconds']:.0f} images/s")
    a = last["agreement"]
    print(f"the judge's yes/no against the checker's on those candidates: accuracy {a['accuracy']:.3f}, balanced "
          f"{a['balanced']:.3f} (judge yes {a['judge_yes']:.2f}, checker yes {a['checker_yes']:.2f})")
    with open(os.path.join(out, "scaling.json"), "w") as f:
        json.dump(rows, f, indent=1)
    plot_curve(rows, os.path.join(out, "scaling.png"))
    print(shapes.format_table(rows[0]["judge"], name="N=1"))
    print(shapes.format_table(rows[-1]["judge"], name=f"best of {rows[-1]['N']} (judge)", header=False))
    print(shapes.format_table(rows[-1]["checker"], name=f"best of {rows[-1]['N']} (checker)", header=False))
    return rows


def recording(judge, said):
    """The same judge, its yes/no answers appended to said (the curve's judge / checker agreement)."""
    def call(images, prompt):
        answers = judge(images, prompt)
        said.extend(bool(yes) for yes, _ in answers)
        return answers
    return call


def plot_curve(rows, path):
    """Fig. 8's plot: overall score against N (log scale), judge and checker; skipped without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no scaling.png; the numbers are in scaling.json)")
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    Ns = [r["N"] for r in rows]
    for name, style in (("judge", "o-"), ("checker", "s--")):
        label = "SaVILA-tiny picks" if name == "judge" else "checker picks (ceiling)"
        ax.plot(Ns, [r[name]["overall"] for r in rows], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N (samples per image)")
    ax.set_ylabel("checker overall")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def schedule(text):
    """--schedule: "2:8,6:2" -> ((2, 8), (6, 2)): after sampler step 2 the preview judge keeps 8 candidates of each
    prompt, after step 6 two; "" -> () (plain best-of-N)."""
    try:
        return tuple((int(k), int(m)) for k, m in (r.split(":") for r in text.split(",") if r.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give step:keep pairs, e.g. 2:8,6:2") from None


def format_schedule(rounds):
    return ",".join(f"{k}:{m}" for k, m in rounds)


def check_schedule(rounds, n, steps, keep):
    """A schedule best-of-n can run: steps increasing within 0 .. steps - 1, each keep below the candidates alive
    before it and at least the final --keep."""
    last, alive = -1, n
    for k, m in rounds:
        if not last < k < steps:
            usage_error(f"--schedule {format_schedule(rounds)}: step {k} must be above the one before and below "
                        f"--steps {steps} (a preview is taken after steps 0 .. {steps - 1})")
        if not keep <= m < alive:
            usage_error(f"--schedule {format_schedule(rounds)}: keep {m} at step {k} must be below the {alive} "
                        f"candidates alive then and at least --keep {keep}")
        last, alive = k, m


def image_size(text):
    """--size: "1024" -> (1024, 1024); "WxH", e.g. "1344x768" (landscape) -> (height, width) = (768, 1344)."""
    try:
        w, h = (int(v) for v in (text.lower().split("x") if "x" in text.lower() else (text, text)))
    except ValueError:
        w = h = 0
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a side (1024) or width x height (1344x768), in pixels")
    return h, w


def parse_args(argv=None):
    ap = ArgumentParser(description="Sample images from a SANA checkpoint, optionally best-of-N with a judge.")
    ap.add_argument("--ckpt", default=DEFAULT_CKPT, help="ours (.safetensors), official .pth, or a diffusers folder/hub id")
    ap.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    ap.add_argument("--prompts", help="a text file, one prompt per line")
    ap.add_argument("--num_samples", type=int, default=1, help="images kept per prompt")
    ap.add_argument("--best_of", type=int, default=1, help="candidates per kept image (N); the judge picks")
    ap.add_argument("--keep", type=int, default=1, help="images kept per N candidates (the tournament's K)")
    ap.add_argument("--schedule", type=schedule, default=(), help="early verdicts, step:keep pairs (e.g. 2:8): after "
                    "that step only the candidates whose x0 previews the preview judge keeps are sampled on")
    ap.add_argument("--preview_judge", default="", help="the judge of the previews (default: --judge; for the shipped "
                    "pair, the first shipped judge on one view)")
    ap.add_argument("--judge", default=DEFAULT_JUDGE,
                    help="SaVILA-tiny .safetensors (several joined by commas: their ensemble), a VLM folder, or 'checker'")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default 20)")
    ap.add_argument("--cfg", type=float, default=None, help="guidance scale (default 4.5)")
    ap.add_argument("--shift", type=float, default=None, help="flow shift (default: the checkpoint's training value, else 3.0)")
    ap.add_argument("--sampler", choices=SAMPLERS, default="dpm++", help="flow.py's Flow-Euler or Flow-DPM-Solver++")
    ap.add_argument("--seed", type=int, default=0, help="candidate j of prompt i starts from noise seeded by (seed, i, j)")
    ap.add_argument("--size", type=image_size, default=None, help="S (square) or WxH in pixels, e.g. 1344x768 "
                    "(default: the training size; 32 laptop, 1024 real)")
    ap.add_argument("--batch_size", type=int, default=64, help="images per sampler batch")
    ap.add_argument("--text_encoder", default="", help="override the checkpoint's text encoder (a folder or hub id)")
    ap.add_argument("--vae", default=None, help="override the checkpoint's DC-AE (a folder or hub id)")
    ap.add_argument("--out", default="out/samples", help="folder for the PNGs, index.jsonl and grid.png")
    ap.add_argument("--eval", action="store_true", help="shapes world: score the evaluation prompts (4 images each)")
    ap.add_argument("--curve", action="store_true", help="with --eval: the score at N = 1, 2, 4, ... best_of")
    ap.add_argument("--candidates", default="", help="with --curve: a .pt file of the sampled candidates: written "
                    "if absent, read if present (another --judge then re-judges the same images in seconds)")
    ap.add_argument("--safety_check", default="", help="a guard model folder (e.g. ShieldGemma-2B); refuse unsafe prompts")
    ap.add_argument("--safety_threshold", type=float, default=0.5, help="refuse a prompt above this P(unsafe)")
    ap.add_argument("--rewrite", default="", help="a chat model folder that enriches prompts before encoding")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--no_progress", dest="progress", action="store_false", help="no progress bar")
    args = ap.parse_args(argv)
    check_flags(vars(args), [(name, lambda v: v >= 1, "must be an integer >= 1")
                             for name in ("num_samples", "best_of", "keep", "batch_size", "steps")] + [
        ("cfg", lambda v: v >= 0, "the guidance scale must be a finite number >= 0 (1: no guidance)"),
        ("shift", lambda v: v > 0, "the flow shift must be a finite number > 0"),
        ("seed", lambda v: v >= 0, "must be an integer >= 0"),
        ("safety_threshold", lambda v: 0 <= v <= 1, "a probability: between 0 and 1")])
    if args.keep > args.best_of:
        raise SystemExit(f"error: --keep {args.keep} > --best_of {args.best_of}: the tournament keeps K of N")
    check_schedule(args.schedule, args.best_of, args.steps or 20, args.keep)
    if args.schedule and (args.curve or args.candidates):
        usage_error("--schedule finishes only some candidates; --curve and --candidates need them all: drop one")
    if args.curve and not args.eval:
        raise SystemExit("error: --curve needs --eval")
    if args.candidates and not args.curve:
        raise SystemExit("error: --candidates needs --eval --curve")
    return args


def screen_prompts(prompts, args, device):
    """The deployment extras before any sampling: refuse unsafe prompts, then rewrite the rest."""
    if args.safety_check:
        p_unsafe = unsafe_probability(prompts, resolve(args.safety_check), device)
        bad = [p for p, q in zip(prompts, p_unsafe) if q > args.safety_threshold]
        if bad:
            raise SystemExit(f"refused: the safety check flags {len(bad)} prompt(s), e.g. {bad[0]!r}; no image was made")
    return rewrite_prompts(prompts, resolve(args.rewrite), device) if args.rewrite else prompts


def load_pipeline(args, device, dtype):
    """-> (model, text encoder, decoder); fills in the checkpoint's own size, flow shift, steps and guidance."""
    if args.ckpt == DEFAULT_CKPT and not os.path.exists(DEFAULT_CKPT):
        raise SystemExit(f"error: no shipped model at {DEFAULT_CKPT}; train one: python train.py config/shapes.py")
    try:
        model = LinearDiT.from_pretrained(resolve(args.ckpt), dtype=None).to(device).eval()
        model = model.float() if dtype == torch.float32 else model  # bf16 weights on a CPU: compute in fp32
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    c = model.config
    trained = json.loads(getattr(model, "meta", {}).get("train_config", "{}"))
    args.size = args.size or (trained.get("image_size") or (1024 if c.vae else 32),) * 2
    args.shift = args.shift or trained.get("flow_shift") or 3.0
    args.steps, args.cfg = args.steps or 20, args.cfg if args.cfg is not None else 4.5  # None: not given
    encoder = load_text_encoder(args.text_encoder or c.text_encoder, c.text_max_length, device)
    decoder = load_decoder(c.vae if args.vae is None else args.vae, device, c.in_channels)
    if args.size[0] % (decoder[1] * c.patch_size) or args.size[1] % (decoder[1] * c.patch_size):
        raise SystemExit(f"error: --size {args.size[1]}x{args.size[0]}: each side must be a multiple of "
                         f"{decoder[1] * c.patch_size} (autoencoder factor {decoder[1]} x patch {c.patch_size})")
    return model, encoder, decoder


def candidates(groups, args, device, dtype, preview_judge=None, cost=None):
    """best_of candidates per group (the survivors of --schedule's early verdicts), sampled now or read from
    --candidates (written there after sampling)."""
    if args.candidates and os.path.exists(args.candidates):
        try:
            images = torch.load(args.candidates)  # (G * N, 3, H, W): the candidates of an earlier run
        except Exception as e:
            raise SystemExit(f"error: {args.candidates} is not a candidates file written by --candidates "
                             f"({type(e).__name__}); delete it to sample afresh") from None
        if not torch.is_tensor(images) or len(images) != len(groups) * args.best_of:
            raise SystemExit(f"error: {args.candidates} holds {len(images)} candidates, not {len(groups)} groups x "
                             f"--best_of {args.best_of}; delete it or pass its --best_of")
        print(f"read {len(images)} candidates from {args.candidates} (sampled by an earlier run; --ckpt unused)")
        return images
    model, encoder, decoder = load_pipeline(args, device, dtype)
    t0 = time.perf_counter()
    images, _ = sample_images(model, encoder, decoder, groups, args.best_of, args, device, dtype, args.schedule,
                              preview_judge, cost)
    seconds = time.perf_counter() - t0
    print(f"sampled {len(images)} images in {seconds:.1f}s: {len(images) / seconds:.1f} images/s "
          f"({args.steps} steps, {torch.get_num_threads()} threads on {device.type})")
    if args.candidates:
        Path(args.candidates).parent.mkdir(parents=True, exist_ok=True)
        torch.save(images.cpu(), args.candidates + ".tmp")
        os.replace(args.candidates + ".tmp", args.candidates)
    return images


def main(argv=None):
    args = parse_args(argv)
    writable_or_exit(args.out, "--out")  # before the model loads and the images are sampled
    device = torch.device(args.device)
    if device.type == "cpu":
        keep_freed_memory()  # large latents: no fresh pages for every big activation (model.keep_freed_memory)
    dtype = torch.bfloat16 if use_bf16(device) else torch.float32
    prompts = [p.text for p in shapes.load_eval_prompts()] if args.eval else read_prompts(args)
    prompts = screen_prompts(prompts, args, device)
    judge = load_judge(args.judge, device) if args.best_of > 1 else None  # a bad judge fails before sampling
    preview_judge = args.preview_judge or (DEFAULT_PREVIEW_JUDGE if args.judge == DEFAULT_JUDGE else args.judge)
    preview = load_judge(preview_judge, device) if args.schedule else None
    groups = [p for p in prompts for _ in range(shapes.IMAGES_PER_PROMPT if args.eval else args.num_samples)]
    cost = Cost()
    images = candidates(groups, args, device, dtype, preview, cost)  # one group of candidates per kept image
    if args.curve:
        evaluate_curve(images, shapes.load_eval_prompts(), args.best_of, judge, args.out)
        return
    if args.best_of > 1:
        finished = args.schedule[-1][1] if args.schedule else args.best_of  # candidates per group sampled to the end
        images, _ = best_of(images, groups, finished, args.keep, counted(judge, cost))
        print(f"cost of best of {args.best_of}" + f" with --schedule {format_schedule(args.schedule)}" * bool(args.schedule)
              + ": " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in asdict(cost).items()))
        json.dump(asdict(cost), open(os.path.join(args.out, "cost.json"), "w"), indent=1)
        groups = [p for p in groups for _ in range(args.keep)]
    if args.eval:
        result = shapes.evaluate(images, [shapes.as_prompt(p) for p in groups])
        print(shapes.format_table(result, name=f"best of {args.best_of}" if args.best_of > 1 else "N=1"))
        json.dump(result, open(os.path.join(args.out, "eval.json"), "w"), indent=1)
    write_outputs(images, groups, args.out)
    print(f"wrote {len(images)} images and {os.path.join(args.out, 'grid.png')}")


if __name__ == "__main__":
    main()
