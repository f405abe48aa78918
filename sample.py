"""
Text-to-image sampling with SANA's flow samplers, and best-of-N inference scaling (SANA-1.5 Sec. 2.5).

The model predicts the velocity v = noise - x0 of the straight path x_sigma = (1 - sigma) x0 + sigma noise.
- Flow-Euler: x <- x + (sigma_next - sigma) v.
- Flow-DPM-Solver++ (2nd-order multistep, data prediction): with alpha = 1 - sigma, lambda = log(alpha / sigma)
  and x0 = x - sigma v, one step is x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^{-h}) (D0 + D1 / 2),
  D1 a finite difference of x0 over the previous step; the first and the last steps are first order
  (the official "lower_order_final").
- Classifier-free guidance on all latent channels: v = v_null + cfg (v_text - v_null), one batched forward.
- The schedule: sigma uniform in [0.999, 0] then shifted by the flow shift (SANA: 3.0 at 1024px), as the
  official "time_uniform_flow" grid.
- Best-of-N (Sec. 2.5): N candidates per prompt, a judge answers yes/no for each, savila.tournament keeps K.
  SaVILA-tiny judges each candidate over test-time views: mirror x one-pixel shifts (10), each also asked with a
  relation caption put the other way round ("A left of B" -> "B right of A"; 20 for those); --tta none: once.
  Candidate j of prompt i starts from noise seeded by (seed, i, j), so the first N of 32 candidates are the
  N-candidate run: the inference-scaling curve reuses one set of samples.

    python sample.py                                     # the shipped laptop model on demo prompts -> out/samples
    python sample.py --prompt "a photo of a red circle" --best_of 32 --keep 1
    python sample.py --eval --best_of 32 --curve         # shapes world: score vs N (Fig. 8 / Table 2 analogue)
    python sample.py --ckpt <SANA1.5_1.6B_1024px_diffusers folder> --vae <dc-ae folder> --text_encoder <gemma-2-2b-it> \
        --size 1024 --prompt "a cyberpunk cat" --best_of 8 --judge <NVILA or any HF VLM folder>
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import savila
import shapes
from model import GEMMA_CHI, DCAEDecoder, LinearDiT, TextEncoder, local_path, shift_sigma

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CKPT = os.path.join(ROOT, "weights", "shapes.safetensors")  # the shipped laptop model
DEFAULT_JUDGE = ",".join(os.path.join(ROOT, "weights", f) for f in  # its shipped SaVILA-tiny judges, an ensemble
                         ("savila_tiny.safetensors", "savila_tiny_zoom.safetensors"))
DEMO_PROMPTS = ["a photo of a red circle", "a photo of three squares", "a photo of a triangle left of a circle",
                "a photo of a blue square and a yellow circle", "a photo of a green triangle",
                "a photo of a white circle and a black square"]


def flow_sigmas(steps, shift, sigma_max=0.999):
    return shift_sigma(torch.linspace(sigma_max, 0.0, steps + 1, dtype=torch.float64), shift)  # (steps+1,)


def guided_velocity(model, x, sigma, y, mask, y_null, mask_null, cfg):
    """One batched forward over [null, text]; guidance on every channel."""
    B = x.shape[0]
    t = torch.full((2 * B,), float(sigma) * 1000.0, device=x.device)
    v = model(torch.cat([x, x]), t, torch.cat([y_null, y]), torch.cat([mask_null, mask]))
    v_null, v_text = v.float().chunk(2)
    return v_null + cfg * (v_text - v_null)


@torch.no_grad()
def generate(model, y, mask, y_null, mask_null, noise, steps=20, cfg=4.5, shift=3.0, sampler="dpm++"):
    """Integrate from x = noise at sigma_max to sigma = 0. y (B, L, Dt), y_null (1 or B, L, Dt). -> x0 (B, C, H, W)."""
    if sampler not in ("euler", "dpm++"):
        raise ValueError(f"unknown sampler '{sampler}': use 'euler' or 'dpm++'")
    B = noise.shape[0]
    y_null, mask_null = y_null.expand(B, -1, -1), mask_null.expand(B, -1)
    sigmas = flow_sigmas(steps, shift).tolist()
    x, prev_x0, prev_h = noise.float(), None, None
    for i in range(steps):
        s, t = sigmas[i], sigmas[i + 1]
        v = guided_velocity(model, x.to(noise.dtype), s, y, mask, y_null, mask_null, cfg)
        if sampler == "euler":
            x = x + (t - s) * v
            continue
        x0 = x - s * v  # data prediction
        if t == 0.0:  # final step: alpha_t = 1, sigma_t = 0 -> the prediction itself
            x = x0
            continue
        h = math.log((1 - t) / t) - math.log((1 - s) / s)  # lambda_t - lambda_s
        D = x0 if prev_x0 is None else x0 + (x0 - prev_x0) * (h / prev_h) / 2  # 2nd order after step 1
        x = (t / s) * x + (1 - t) * (1 - math.exp(-h)) * D
        prev_x0, prev_h = x0, h
    return x


# -----------------------------------------------------------------------------
# loading: checkpoints, text encoders, decoders (local paths, or hub ids for users with network)


def resolve(path):
    """A local path as is; otherwise a Hugging Face hub id, downloaded once (real-scale users only)."""
    if os.path.exists(local_path(path)):
        return local_path(path)  # as given, or inside the repo (weights/...)
    if path.count("/") != 1 or path.startswith((".", "/")):
        raise SystemExit(f"error: {path} not found (a local file/folder, or a hub id like Efficient-Large-Model/...)")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(path)
    except Exception as e:
        raise SystemExit(f"error: {path} is neither a local path nor downloadable ({type(e).__name__}); "
                         f"download it first and pass the folder") from None


def load_text_encoder(name, max_length, device, dtype=torch.float32):
    """The laptop encoders by kind ("minilm", "gemma-tiny"), else a transformers folder; Gemma gets SANA's CHI."""
    if name in ("minilm", "gemma-tiny"):
        return shapes.CaptionCache(shapes.laptop_text_encoder(name, max_length, device))
    chi = GEMMA_CHI if "gemma" in name.lower() else None
    return TextEncoder(resolve(name), max_length=max_length, chi_prompt=chi, device=device, dtype=dtype)


def null_states(encoder):
    """The empty caption: without the instruction prefix, as the official null embedding is computed."""
    return encoder.null() if isinstance(encoder, TextEncoder) else encoder([""])


def load_decoder(vae, device):
    """-> (decode, factor): latents -> images in [-1, 1] with the DC-AE (divide by its scaling factor first) and
    its spatial factor (32 for SANA's f32c32), or the identity and 1 in pixel space."""
    if not vae:
        return (lambda x: x), 1
    dec = DCAEDecoder.from_pretrained(resolve(vae)).to(device).eval()
    return (lambda z: dec(z / dec.scaling_factor)), 2 ** (len(dec.config.widths) - 1)


# -----------------------------------------------------------------------------
# generating candidates


def make_noise(seed, prompt_index, j, shape):
    g = torch.Generator().manual_seed(seed * 1_000_003 + prompt_index * 4_099 + j)
    return torch.randn(shape, generator=g)


@torch.no_grad()
def sample_images(model, encoder, decoder, prompts, n, args, device, dtype):
    """n images per prompt, in prompt order: (len(prompts) * n, 3, H, W) in [-1, 1] on the CPU.
    decoder: (decode, factor) from load_decoder."""
    c = model.config
    decode, factor = decoder
    side = args.size // factor  # latent side
    jobs = [(i, j) for i in range(len(prompts)) for j in range(n)]
    y_null, mask_null = (t.to(device) for t in null_states(encoder))
    out = []
    for b in tqdm(range(0, len(jobs), args.batch_size), desc="sampling", disable=not args.progress, leave=False):
        chunk = jobs[b:b + args.batch_size]
        y, mask = encoder([prompts[i] for i, _ in chunk])
        noise = torch.stack([make_noise(args.seed, i, j, (c.in_channels, side, side)) for i, j in chunk])
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            x = generate(model, y.to(device), mask.to(device), y_null, mask_null, noise.to(device),
                         steps=args.steps, cfg=args.cfg, shift=args.shift, sampler=args.sampler)
            out.append(decode(x).float().clamp(-1, 1).cpu())
    return torch.cat(out)


# -----------------------------------------------------------------------------
# judges: SaVILA-tiny (laptop), any transformers VLM (real scale), or the checker itself (the ceiling)


def load_judge(name, device, tta="converse"):
    """judge(images (N,3,H,W) in [-1,1], prompt) -> [(said_yes, confidence)]. tta: SaVILA-tiny's test-time views
    (savila.TTA; the mean logit over each image, its mirror and one-pixel shifts of both, each with the caption
    and its converse)."""
    if name == "checker":  # an oracle: what a perfect judge would pick (never the default)
        return lambda images, prompt: [(ok, 0.0) for ok in shapes.check_batch(images, [prompt] * len(images))]
    if all(p.endswith(".safetensors") for p in name.split(",")):
        try:
            return savila.load(name, device=device, tta=tta)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
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


def main(argv=None):
    ap = argparse.ArgumentParser(description="Sample images from a SANA checkpoint, optionally best-of-N with a judge.")
    ap.add_argument("--ckpt", default=DEFAULT_CKPT, help="ours (.safetensors), official .pth, or a diffusers folder/hub id")
    ap.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    ap.add_argument("--prompts", help="a text file, one prompt per line")
    ap.add_argument("--num_samples", type=int, default=1, help="images kept per prompt")
    ap.add_argument("--best_of", type=int, default=1, help="candidates per kept image (N); the judge picks")
    ap.add_argument("--keep", type=int, default=1, help="images kept per N candidates (the tournament's K)")
    ap.add_argument("--judge", default=DEFAULT_JUDGE,
                    help="SaVILA-tiny .safetensors (several joined by commas: their ensemble), a VLM folder, or 'checker'")
    ap.add_argument("--tta", choices=list(savila.TTA), default="converse",
                    help="SaVILA-tiny's test-time views: none, the mirror, mirror x one-pixel shifts (10 views), "
                         "or those with each relation caption also put the other way round (converse)")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default 20)")
    ap.add_argument("--cfg", type=float, default=None, help="guidance scale (default 4.5)")
    ap.add_argument("--shift", type=float, default=None, help="flow shift (default: the checkpoint's training value, else 3.0)")
    ap.add_argument("--sampler", choices=["euler", "dpm++"], default="dpm++")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (default 32 laptop, 1024 real)")
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--text_encoder", default="", help="override the checkpoint's text encoder (a folder or hub id)")
    ap.add_argument("--vae", default=None, help="override the checkpoint's DC-AE (a folder or hub id)")
    ap.add_argument("--out", default="out/samples")
    ap.add_argument("--eval", action="store_true", help="shapes world: score the evaluation prompts (4 images each)")
    ap.add_argument("--curve", action="store_true", help="with --eval: the score at N = 1, 2, 4, ... best_of")
    ap.add_argument("--candidates", default="", help="with --curve: a .pt file of the sampled candidates: written "
                    "if absent, read if present (another --judge then re-judges the same images in seconds)")
    ap.add_argument("--safety_check", default="", help="a guard model folder (e.g. ShieldGemma-2B); refuse unsafe prompts")
    ap.add_argument("--safety_threshold", type=float, default=0.5)
    ap.add_argument("--rewrite", default="", help="a chat model folder that enriches prompts before encoding")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no_progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    for name in ("num_samples", "best_of", "keep", "batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name} must be >= 1")
    if args.keep > args.best_of:
        raise SystemExit(f"error: --keep {args.keep} > --best_of {args.best_of}: the tournament keeps K of N")
    if args.curve and not args.eval:
        raise SystemExit("error: --curve needs --eval")
    if args.candidates and not args.curve:
        raise SystemExit("error: --candidates needs --eval --curve")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32

    prompts = [p.text for p in shapes.load_eval_prompts()] if args.eval else read_prompts(args)
    if args.safety_check:
        p_unsafe = unsafe_probability(prompts, resolve(args.safety_check), device)
        bad = [p for p, q in zip(prompts, p_unsafe) if q > args.safety_threshold]
        if bad:
            raise SystemExit(f"refused: the safety check flags {len(bad)} prompt(s), e.g. {bad[0]!r}; no image was made")
    if args.rewrite:
        prompts = rewrite_prompts(prompts, resolve(args.rewrite), device)

    if args.ckpt == DEFAULT_CKPT and not os.path.exists(DEFAULT_CKPT):
        raise SystemExit(f"error: no shipped model at {DEFAULT_CKPT}; train one: python train.py config/shapes.py")
    try:
        model = LinearDiT.from_pretrained(resolve(args.ckpt), dtype=None).to(device).eval()
        model = model.float() if dtype == torch.float32 else model  # bf16 weights on a CPU: compute in fp32
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    c = model.config
    trained = json.loads(getattr(model, "meta", {}).get("train_config", "{}"))
    args.size = args.size or trained.get("image_size") or (1024 if c.vae else 32)
    args.shift = args.shift or trained.get("flow_shift") or 3.0
    args.steps, args.cfg = args.steps or 20, args.cfg if args.cfg is not None else 4.5
    encoder = load_text_encoder(args.text_encoder or c.text_encoder, c.text_max_length, device)
    decoder = load_decoder(c.vae if args.vae is None else args.vae, device)
    if args.size % (decoder[1] * c.patch_size):
        raise SystemExit(f"error: --size {args.size} must be a multiple of {decoder[1] * c.patch_size} "
                         f"(autoencoder factor {decoder[1]} x patch {c.patch_size})")
    judge = load_judge(args.judge, device, args.tta) if args.best_of > 1 else None
    n_per = (shapes.IMAGES_PER_PROMPT if args.eval else args.num_samples)
    groups = [p for p in prompts for _ in range(n_per)]  # one group of N candidates per kept image
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
    else:
        t0 = time.perf_counter()
        images = sample_images(model, encoder, decoder, groups, args.best_of, args, device, dtype)
        seconds = time.perf_counter() - t0
        print(f"sampled {len(images)} images in {seconds:.1f}s: {len(images) / seconds:.1f} images/s "
              f"({args.steps} steps, {torch.get_num_threads()} threads on {device.type})")
        if args.candidates:
            Path(args.candidates).parent.mkdir(parents=True, exist_ok=True)
            torch.save(images.cpu(), args.candidates + ".tmp")
            os.replace(args.candidates + ".tmp", args.candidates)
    os.makedirs(args.out, exist_ok=True)
    if args.eval and args.curve:
        evaluate_curve(images, shapes.load_eval_prompts(), args.best_of, judge, args.out)
        return
    if args.best_of > 1:
        t0 = time.perf_counter()
        images, _ = best_of(images, groups, args.best_of, args.keep, judge)
        print(f"judged {len(groups) * args.best_of} candidates in {time.perf_counter() - t0:.1f}s")
        groups = [p for p in groups for _ in range(args.keep)]
    if args.eval:
        result = shapes.evaluate(images, [shapes.as_prompt(p) for p in groups])
        print(shapes.format_table(result, name=f"best of {args.best_of}" if args.best_of > 1 else "N=1"))
        json.dump(result, open(os.path.join(args.out, "eval.json"), "w"), indent=1)
    write_outputs(images, groups, args.out)
    print(f"wrote {len(images)} images and {os.path.join(args.out, 'grid.png')}")


if __name__ == "__main__":
    main()
