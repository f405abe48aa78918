"""experiments/latent_vs_pixel.py: --quick end to end (outputs, budgets, the saved AE and DiTs round trip), the
sampling/decoding path against oracle models, bad flags. (Its autoencoder pieces are tested in test_autoencoder.py.)"""
import argparse
import dataclasses
import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import latent_vs_pixel as lvp  # noqa: E402
import shapes  # noqa: E402
from model import PRESETS, DCAEDecoder, DCAEEncoder, LinearDiT  # noqa: E402
from sample import load_decoder  # noqa: E402


def tiny_ae(widths=(8, 16, 16), channels=8, seed=0):
    torch.manual_seed(seed)
    cfg = lvp.ae_config(argparse.Namespace(ae_widths=widths, latent_channels=channels))
    return DCAEEncoder(cfg), DCAEDecoder(cfg)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("latent") / "q"
    res = lvp.main(["--out", str(out), "--quick"])
    return out, res


def test_quick_outputs(quick):
    out, res = quick
    data = json.loads((out / "results.json").read_text())
    assert data["command"] == f"python experiments/latent_vs_pixel.py --out {out} --quick"
    assert set(data["arms"]) == {"latent", "pixel"}
    n_prompts = len(shapes.CATEGORIES)  # --quick: the first eval prompt of each category
    assert data["n_images"] == 4 * n_prompts
    for name, arm in data["arms"].items():
        assert set(arm["checker"]) == {"overall", *shapes.CATEGORIES}
        assert 1 <= arm["steps"] <= 4 and [s for s, _ in arm["losses"]] == list(range(1, arm["steps"] + 1))
        assert arm["final_loss"] == pytest.approx(arm["losses"][-1][1])  # 10% of <= 4 logged losses: the last
        assert arm["checker"]["overall"] == pytest.approx(np.mean([arm["checker"][c] for c in shapes.CATEGORIES]))
    # equal total CPU time: the latent DiT gets the budget minus what the autoencoder used
    ae = data["autoencoder"]
    assert data["arms"]["pixel"]["budget_seconds"] == pytest.approx(60 * 0.05)
    assert data["arms"]["latent"]["budget_seconds"] == pytest.approx(60 * 0.05 - ae["cpu_seconds"])
    assert 1 <= ae["steps"] <= 5 and ae["checker_ground_truth"]["overall"] == 1.0
    md = (out / "results.md").read_text()
    assert data["command"] in md
    rows = [l for l in md.splitlines() if l.startswith("| latent") or l.startswith("| pixel")]
    assert len(rows) == 2 and all(r.count("|") == 6 + len(shapes.TABLE_COLUMNS) + 1 for r in rows)
    assert f"{data['arms']['latent']['checker']['overall']:.3f}" in rows[0]
    for png in ("ae_reconstructions.png", "samples_latent.png", "samples_pixel.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["margin"] == pytest.approx(data["arms"]["latent"]["checker"]["overall"]
                                          - data["arms"]["pixel"]["checker"]["overall"])


def test_quick_checkpoints_round_trip(quick):
    """The saved AE reproduces the reported reconstruction MSE; the latent DiT decodes through it."""
    out, res = quick
    enc = DCAEEncoder.from_pretrained(str(out / "ae_encoder.safetensors")).eval()
    dec = DCAEDecoder.from_pretrained(str(out / "ae_decoder.safetensors")).eval()
    ae = res["autoencoder"]
    assert enc.scaling_factor == dec.scaling_factor == pytest.approx(ae["scaling_factor"])
    assert enc.factor == 4 and enc.config.latent_channels == 8
    prompts = lvp.eval_prompts(1)
    groups = [p for p in prompts for _ in range(4)]
    u8 = shapes.render_batch([p.spec for p in groups], 32, np.random.default_rng(0))
    x = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, 32, 32)
    with torch.no_grad():
        mse = torch.nn.functional.mse_loss(dec(enc(x)), x).item()
    assert mse == pytest.approx(ae["mse"], rel=1e-4)

    latent = LinearDiT.from_pretrained(str(out / "latent_dit.safetensors"))
    pixel = LinearDiT.from_pretrained(str(out / "pixel_dit.safetensors"))
    c, tiny = latent.config, PRESETS["shapes-tiny"]
    assert (c.in_channels, c.patch_size, c.vae) == (8, 1, str(out / "ae_decoder.safetensors"))
    assert (c.hidden_size, c.depth, c.caption_channels) == (tiny.hidden_size, tiny.depth, tiny.caption_channels)
    assert pixel.config == tiny
    z = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(load_decoder(c.vae, torch.device("cpu"))[0](z), dec(z / ae["scaling_factor"]))
    assert json.loads(latent.meta["train_config"])["preset"] == "shapes-tiny"


class Oracle(torch.nn.Module):
    """A 'model' whose velocity leads the sampler straight to given targets: v = (x - x0) / sigma, so the data
    prediction x - sigma v is x0 at every step. Row k of a batch gets targets[k] (one batch holds them all)."""

    def __init__(self, targets, vae=""):
        super().__init__()
        self.targets = targets
        self.config = argparse.Namespace(in_channels=targets.shape[1], vae=vae)

    def forward(self, x, t, y, mask):  # CFG batches are [null, text] halves of the same x
        x0 = self.targets.repeat(x.shape[0] // len(self.targets), 1, 1, 1)
        return (x - x0) / (t / 1000.0)[:, None, None, None]


def fake_text(texts):
    return torch.zeros(len(texts), 4, 8), torch.ones(len(texts), 4, dtype=torch.long)


def sampling_args(n=4):
    return argparse.Namespace(images_per_prompt=n, seed=0, eval_steps=3, eval_cfg=4.5, sampler="dpm++")


def ground_truth(groups, seed=0):
    u8 = shapes.render_batch([p.spec for p in groups], 32, np.random.default_rng(seed))
    return torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, 32, 32)


@pytest.mark.parametrize("shifted", [False, True])
def test_pixel_sampling_pairs_each_image_with_its_prompt(shifted):
    """Ground truth of the eval prompts, in sample_eval's order, scores 1; under the next prompt far lower."""
    prompts = lvp.eval_prompts(1)
    groups = [p for p in prompts for _ in range(4)]
    images = lvp.sample_eval(Oracle(ground_truth(groups)), fake_text, lambda x: x, prompts, 32, sampling_args(),
                             shift=1.0, batch_size=len(groups))
    scored = groups[4:] + groups[:4] if shifted else groups
    result = shapes.evaluate(images, scored)
    assert result["overall"] < 0.5 if shifted else result["overall"] == 1.0


def test_latent_sampling_decodes_through_the_saved_decoder(tmp_path):
    """Latent targets encoder(gt) * scale come back as decoder(encoder(gt)): the decoder divides by the scale."""
    enc, dec = tiny_ae()
    enc.config = dec.config = dataclasses.replace(enc.config, scaling_factor=0.3)
    path = str(tmp_path / "dec.safetensors")
    dec.save_pretrained(path)
    prompts = lvp.eval_prompts(1)[:3]
    gt = ground_truth([p for p in prompts for _ in range(2)])
    with torch.no_grad():
        z = enc(gt)
        want = dec(z).clamp(-1, 1)
    model = Oracle(z * 0.3, vae=path)
    images = lvp.sample_eval(model, fake_text, load_decoder(path, torch.device("cpu"))[0], prompts, 8, sampling_args(2),
                             shift=1.0, batch_size=len(gt))
    assert images.shape == (6, 3, 32, 32)
    torch.testing.assert_close(images, want, atol=1e-4, rtol=1e-4)


def test_latent_dit_has_the_pixel_models_tokens_and_size():
    pixel = PRESETS["shapes-pixel"]
    c = lvp.latent_dit_config(pixel, 16, "ae.safetensors")
    assert (c.in_channels, c.patch_size, c.vae) == (16, 1, "ae.safetensors")
    assert (8 // c.patch_size) ** 2 == (32 // pixel.patch_size) ** 2 == 64  # the same 64 tokens
    assert dataclasses.replace(c, in_channels=3, patch_size=4, vae="") == pixel
    torch.manual_seed(0)
    with torch.no_grad():
        v = LinearDiT(dataclasses.replace(c, depth=1))(torch.randn(2, 16, 8, 8), torch.rand(2) * 1000,
                                                       torch.randn(2, 16, 384), torch.ones(2, 16))
    assert v.shape == (2, 16, 8, 8)


def test_bad_input_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match="ae_minutes"):
        lvp.parse_args(["--minutes", "3", "--ae_minutes", "3"])
    with pytest.raises(SystemExit, match="comma-separated integers"):
        lvp.parse_args(["--ae_widths", "16,x"])
    with pytest.raises(SystemExit, match="pixel-space preset"):
        lvp.parse_args(["--preset", "sana-1.6b"])
    with pytest.raises(SystemExit, match="latent_channels must be >= 1"):
        lvp.parse_args(["--latent_channels", "0"])
    args = lvp.parse_args(["--ae_widths", "16,32,48"])  # 4*32 is not a multiple of 48
    with pytest.raises(SystemExit, match="ae_widths"):
        lvp.ae_config(args)
