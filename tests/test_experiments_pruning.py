"""experiments/pruning.py: the --quick run end to end (tiny model, few steps) and the structure of its outputs."""
import argparse
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import shapes
from experiments.pruning import ROOT, eval_prompts, main, parse_args, score
from model import PRESETS, LinearDiT, save_model
from train import parse_config

SCORE_KEYS = ("full", "prune_2/3", "prune_2/3_ft", "prune_1/3", "prune_1/3_ft", "scratch_1/3")
CATEGORIES = ("overall", "single_object", "two_object", "counting", "colors", "position", "color_attr")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One quick run: train a 6-block shapes-tiny model 4 steps, prune to 4 and 2, fine-tune 2 steps, scratch."""
    out = tmp_path_factory.mktemp("exp_prune")
    res = main(["--quick", "--out", str(out), "--no_progress"])
    return out, res


def test_results_json_structure(run):
    out, res = run
    saved = json.load(open(out / "results.json"))
    assert saved == json.loads(json.dumps(res))  # what main returned is what it wrote
    assert saved["source"]["depth"] == 6 and saved["source"]["steps"] == 4
    assert saved["depths"] == {"2/3": 4, "1/3": 2}
    assert set(saved["scores"]) == set(SCORE_KEYS)
    for k in SCORE_KEYS:
        s = saved["scores"][k]
        assert set(s) == set(CATEGORIES)
        assert all(0.0 <= s[c] <= 1.0 for c in CATEGORIES), (k, s)
    # the checker's GenEval overall is the mean of the six categories (one prompt of each with --quick)
    full = saved["scores"]["full"]
    assert full["overall"] == pytest.approx(sum(full[c] for c in CATEGORIES[1:]) / 6)
    assert saved["eval"]["prompts"] == 6 and saved["eval"]["images_per_prompt"] == 4


def test_kept_blocks_are_the_most_important(run):
    _, res = run
    imp = torch.tensor(res["importance"])
    assert imp.shape == (6,)
    for frac, d in res["depths"].items():
        kept = res["kept"][frac]
        assert kept == sorted(kept) and len(kept) == d
        dropped = [i for i in range(6) if i not in kept]
        assert imp[kept].min() >= imp[dropped].max()
    assert set(res["kept"]["1/3"]) <= set(res["kept"]["2/3"])


def test_compute_accounting_and_params(run):
    _, res = run
    c = res["compute"]
    # same block-steps: 4 steps x 6 blocks + 2 fine-tune steps x 2 blocks = 14 steps x 2 blocks
    assert c["scratch_steps"] == 14 and c["scratch_steps"] * 2 == 4 * 6 + c["finetune_steps"] * 2
    p = res["params"]
    assert p["full"] > p["prune_2/3"] == p["prune_2/3_ft"] > p["prune_1/3"] == p["prune_1/3_ft"] == p["scratch_1/3"]


def test_pruned_file_holds_the_source_blocks_and_runs_trained(run):
    out, res = run
    source = LinearDiT.from_pretrained(str(out / "source" / "ckpt" / "model.safetensors")).state_dict()
    for frac, d in res["depths"].items():
        pruned = LinearDiT.from_pretrained(str(out / f"finetune_{d}" / "pruned.safetensors")).state_dict()
        for new, old in enumerate(res["kept"][frac]):
            w = f"blocks.{new}.attn.qkv.weight"
            assert torch.equal(pruned[w], source[f"blocks.{old}.attn.qkv.weight"])
        tuned = LinearDiT.from_pretrained(str(out / f"finetune_{d}" / "ckpt" / "model.safetensors"))
        assert tuned.config.depth == d
        assert not torch.equal(tuned.state_dict()["blocks.0.attn.qkv.weight"], pruned["blocks.0.attn.qkv.weight"])
    log = [json.loads(l) for l in open(out / "scratch_2" / "log.jsonl")]
    assert log[-1]["step"] == 14
    assert LinearDiT.from_pretrained(str(out / "scratch_2" / "ckpt" / "model.safetensors")).config.depth == 2


def test_markdown_and_png(run):
    out, res = run
    md = (out / "results.md").read_text()
    assert "| 0.693 | 0.673 | 0.684 | 0.571 | 0.672 | 0.664 |" in md  # the paper's Table 3 row
    row = next(l for l in md.splitlines() if l.startswith("| nanoSANA, checker"))
    assert row.count("|") == 8
    assert f"{res['scores']['prune_2/3_ft']['overall']:.3f}" in row
    val = next(l for l in md.splitlines() if l.startswith("| nanoSANA, validation loss"))
    assert val.count("|") == 8 and all(v > 0 for v in res["val_loss"].values())
    assert set(res["val_loss"]) == set(res["scores"]) and f"{res['val_loss']['full']:.4f}" in val
    # pruning without a fine-tune changes the function, so its validation loss is not the full model's
    assert res["val_loss"]["prune_1/3"] != res["val_loss"]["full"]
    assert "python experiments/pruning.py --quick" in md and res["command"] in md
    img = Image.open(out / "importance.png")
    assert img.format == "PNG" and img.size[0] > 100


def test_defaults_are_the_laptop_model():
    """The default source is config/shapes.py's checkpoint, and --train_steps trains that preset (4-channel latents)."""
    args = parse_args([])
    assert args.ckpt == "out/shapes/ckpt/model.safetensors" and args.preset == "shapes-c4"
    laptop = parse_config([f"{ROOT}/config/shapes.py"])
    assert os.path.join(laptop.out_dir, "ckpt", "model.safetensors") == args.ckpt and laptop.preset == args.preset


def test_bad_input_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match="checkpoint not found"):
        main(["--quick", "--train_steps", "0", "--ckpt", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path)])
    torch.manual_seed(0)
    bare = tmp_path / "bare.safetensors"
    save_model(LinearDiT(PRESETS["shapes-tiny"]), str(bare))  # no train_config / step in its metadata
    with pytest.raises(SystemExit, match="no training record"):
        main(["--quick", "--train_steps", "0", "--ckpt", str(bare), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--finetune_steps must be >= 1"):
        main(["--quick", "--finetune_steps", "0", "--out", str(tmp_path)])


class Oracle(torch.nn.Module):
    """A 'model' whose velocity leads every sampler straight to given images: v = (x - x0) / sigma, so the data
    prediction x - sigma v is x0 at every step. Row k of a batch gets images[k] (one batch holds them all)."""

    def __init__(self, images):
        super().__init__()
        self.images = images  # (n, 3, H, W) in [-1, 1]
        self.config = argparse.Namespace(in_channels=3, vae="")

    def forward(self, x, t, y, mask):  # CFG batches are [null, text] halves of the same x
        x0 = self.images.repeat(x.shape[0] // len(self.images), 1, 1, 1)
        return (x - x0) / (t / 1000.0)[:, None, None, None]


def fake_encoder(texts):
    return torch.zeros(len(texts), 4, 8), torch.ones(len(texts), 4, dtype=torch.long)


fake_encoder.null = lambda: fake_encoder([""])  # the empty caption, as model.load_text_encoder's encoders give it


@pytest.mark.parametrize("shuffled", [False, True])
def test_score_pairs_each_image_with_its_prompt(shuffled):
    """Ground-truth renders of the 4 x P scored prompts, in score()'s order, must score 1; the same images
    shifted by one prompt (each image under another prompt) must score far lower."""
    prompts = eval_prompts(1)
    groups = [p for p in prompts for _ in range(shapes.IMAGES_PER_PROMPT)]
    u8 = shapes.render_batch([p.spec for p in groups], 32, np.random.default_rng(0))  # (4P, H, W, 3)
    images = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1
    if shuffled:
        images = images.roll(shapes.IMAGES_PER_PROMPT, dims=0)
    args = argparse.Namespace(steps=3, cfg=4.5, sampler="dpm++", seed=0, batch_size=len(images), progress=False)
    tc = argparse.Namespace(image_size=32, flow_shift=1.0)
    result = score(Oracle(images), fake_encoder, prompts, args, tc, torch.device("cpu"))
    if shuffled:
        assert result["overall"] < 0.5, result
    else:
        assert result["overall"] == 1.0, result
