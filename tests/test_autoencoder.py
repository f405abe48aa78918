"""autoencoder.py: the laptop's tiny DC-AE, its file, LatentData, and the latent path through train.py."""
import dataclasses
import os

import pytest
import torch
from safetensors import safe_open

import autoencoder
import shapes
from autoencoder import LatentData, save_autoencoder, train_autoencoder
from model import DCAE_PRESETS, PRESETS, DCAEConfig, DCAEDecoder, DCAEEncoder, LinearDiT, save_model, vae_factor
from train import TrainConfig, evaluate_shapes, make_data, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_ae(widths=(8, 16, 16), channels=8):
    torch.manual_seed(0)
    config = DCAEConfig(latent_channels=channels, widths=widths, encoder_depths=(1,) * 3, decoder_depths=(1,) * 3,
                        block_types=("ResBlock",) * 3, qkv_multiscales=((),) * 3, scaling_factor=1.0)
    return DCAEEncoder(config), DCAEDecoder(config)


def tiny_ae(path, scale=0.5):
    torch.manual_seed(0)
    config = dataclasses.replace(DCAE_PRESETS["shapes"], scaling_factor=scale)
    enc, dec = DCAEEncoder(config), DCAEDecoder(config)
    save_autoencoder(enc, dec, str(path))
    return enc, dec


def test_one_file_holds_both_halves(tmp_path):
    enc, dec = tiny_ae(tmp_path / "ae.safetensors")
    enc2 = DCAEEncoder.from_pretrained(str(tmp_path / "ae.safetensors"))
    dec2 = DCAEDecoder.from_pretrained(str(tmp_path / "ae.safetensors"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert enc2(x).shape == (2, 16, 8, 8)
    torch.testing.assert_close(enc2(x), enc(x))
    torch.testing.assert_close(dec2(enc(x)), dec(enc(x)))
    assert enc2.scaling_factor == 0.5 and vae_factor(str(tmp_path / "ae.safetensors")) == 4


def test_latent_data_is_shapes_data_through_the_frozen_encoder():
    enc, _ = small_ae()
    enc.config = dataclasses.replace(enc.config, scaling_factor=0.37)
    cache = {}

    def text(texts):  # a fake caption encoder: deterministic per caption
        for t in texts:
            cache.setdefault(t, torch.full((3, 5), float(len(t))))
        return torch.stack([cache[t] for t in texts]), torch.ones(len(texts), 3, dtype=torch.long)

    text.dim = 5
    data = shapes.ShapesData(32, 3, text)
    wrapped = LatentData(data, enc)
    got, ref = wrapped.get_batch(7, 6, 1, 2), data.get_batch(7, 6, 1, 2)
    with torch.no_grad():
        want = enc(ref["x"]) * 0.37
    assert got["x"].shape == (3, 8, 8, 8) and not got["x"].requires_grad
    torch.testing.assert_close(got["x"], want)
    assert got["prompts"] == ref["prompts"]
    torch.testing.assert_close(got["y"], ref["y"])
    torch.testing.assert_close(got["mask"], ref["mask"])
    torch.testing.assert_close(wrapped.null()[0], data.null()[0])


def test_latent_scale_is_one_over_std_of_all_latents():
    asked, given = [], []

    class Fake:  # returns N(0, 2.5^2) + 1 "images", seeded by step, and records what was asked
        def get_batch(self, step, batch_size):
            asked.append(batch_size)
            x = 2.5 * torch.randn(batch_size, 4, 2, 2, generator=torch.Generator().manual_seed(step)) + 1
            given.append(x)
            return {"x": x}

    scale, mean = autoencoder.latent_scale(lambda x: 3 * x, Fake(), 40, batch_size=16)
    assert sum(asked) == 40 and max(asked) == 16
    z = 3 * torch.cat(given).double()
    assert scale == pytest.approx(1 / z.std().item(), rel=1e-5)
    assert mean == pytest.approx(z.mean().item(), rel=1e-5)
    assert (3 * torch.cat(given) * scale).std().item() == pytest.approx(1.0, rel=1e-5)


def test_autoencoder_training_lowers_the_reconstruction_error():
    enc, dec = small_ae()
    data = shapes.ShapesData(32, 1)
    x = data.get_batch(10_000, 16)["x"]  # held-out renders
    with torch.no_grad():
        before = torch.nn.functional.mse_loss(dec(enc(x)), x).item()
    run = train_autoencoder(enc, dec, data, steps=40, batch_size=8, lr=3e-3, log_every=10)
    with torch.no_grad():
        after = torch.nn.functional.mse_loss(dec(enc(x)), x).item()
    assert run["steps"] == 40 and [s for s, _ in run["losses"]] == [10, 20, 30, 40]
    assert after < 0.5 * before


def test_the_laptop_preset_trains_on_latents_and_evaluates_decoded_images(tmp_path):
    tiny_ae(tmp_path / "ae.safetensors")
    mcfg = dataclasses.replace(PRESETS["shapes-tiny"], in_channels=16, patch_size=2,
                               vae=str(tmp_path / "ae.safetensors"))
    torch.manual_seed(0)
    save_model(LinearDiT(mcfg), str(tmp_path / "init.safetensors"))
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), init_from=str(tmp_path / "init.safetensors"), batch_size=4,
                      max_steps=2, warmup_steps=1, log_every=1, save_every=1000, progress=False, dtype="float32",
                      eval_every=2, eval_prompts=1, eval_steps=2)
    data = make_data(cfg, mcfg)
    assert data.get_batch(0, 2)["x"].shape == (2, 16, 8, 8)
    out = train(cfg)
    assert set(out["eval"]) >= set(shapes.CATEGORIES)
    model = LinearDiT.from_pretrained(str(tmp_path / "run" / "ckpt" / "model.safetensors"))
    assert model.config.vae == str(tmp_path / "ae.safetensors")
    assert os.path.exists(tmp_path / "run" / "samples-0000002.png")  # decoded 32x32 images, not 8x8 latents


def test_the_command_writes_a_loadable_file(tmp_path):
    out = tmp_path / "ae.safetensors"
    scores = autoencoder.main(["--out", str(out), "--steps", "3", "--calib_images", "8", "--batch_size", "4",
                               "--latent_channels", "8", "--decoder_steps", "2"])
    assert DCAEEncoder.from_pretrained(str(out)).config.latent_channels == 8
    assert 0.0 <= scores["checker"]["overall"] <= 1.0 and scores["checker_ground_truth"]["overall"] > 0.99
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert "--steps 3" in meta["command"]
    assert DCAEEncoder.from_pretrained(str(out)).scaling_factor != 1.0  # calibrated
    assert os.path.exists(tmp_path / "ae_reconstructions.png")


def test_decoder_fine_tuning_keeps_the_encoder_and_learns_noisy_latents():
    """Stage 3: the encoder is untouched; the decoder's L1 on noisy latents of held-out renders falls."""
    torch.manual_seed(0)
    enc, dec = small_ae()
    data = shapes.ShapesData(32, 1)
    train_autoencoder(enc, dec, data, steps=30, batch_size=8, lr=3e-3, log_every=100)
    enc_before = {k: v.clone() for k, v in enc.state_dict().items()}
    x = data.get_batch(10_000, 16)["x"]
    noise = torch.randn_like(enc(x)) * 0.6

    def noisy_l1():
        with torch.no_grad():
            z = enc(x) * enc.scaling_factor
            return torch.nn.functional.l1_loss(dec((z + noise) / enc.scaling_factor), x).item()

    before = noisy_l1()
    losses = autoencoder.finetune_decoder(enc, dec, data, steps=40, noise=0.6, batch_size=8, lr=3e-3, log_every=20)
    assert [s for s, _ in losses] == [20, 40]
    assert all(torch.equal(v, enc.state_dict()[k]) for k, v in enc_before.items())
    assert noisy_l1() < before


def test_from_fine_tunes_the_decoder_of_a_file_and_keeps_its_encoder(tmp_path):
    src, out = tmp_path / "ae.safetensors", tmp_path / "ae_ft.safetensors"
    autoencoder.main(["--out", str(src), "--steps", "2", "--calib_images", "8", "--batch_size", "4",
                      "--decoder_steps", "0"])
    autoencoder.main(["--from", str(src), "--out", str(out), "--batch_size", "4", "--decoder_steps", "3"])
    a, b = (DCAEEncoder.from_pretrained(str(p)) for p in (src, out))
    assert a.config == b.config and all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    da, db = (DCAEDecoder.from_pretrained(str(p)) for p in (src, out))
    assert any(not torch.equal(v, db.state_dict()[k]) for k, v in da.state_dict().items())
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert "--decoder_steps 0" in meta["first_command"] and "--from" in meta["command"]


@pytest.mark.parametrize("argv, message", [(["--steps", "0"], "--steps=0: must be an integer >= 1"),
                                           (["--decoder_steps", "-1"], "--decoder_steps=-1: must be >= 0"),
                                           (["--lr", "nan"], "--lr=nan: the learning rate must be"),
                                           (["--decoder_noise", "inf"], "--decoder_noise=inf: must be >= 0"),
                                           (["--from", "x.safetensors", "--decoder_steps", "0"], "needs --decoder_steps"),
                                           (["--from", "missing.safetensors"], "--from missing.safetensors"),
                                           (["--image_size", "30"], "multiple of"),
                                           (["--out", "ae.pt"], ".safetensors"),
                                           (["--out", "ae.safetensors", "--latent_channels", "5"], "must divide"),
                                           (["--preset", "shapes-tiny"], "pass --out")])
def test_bad_flags_give_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        autoencoder.main(argv)
    said = capsys.readouterr().err.strip() if e.value.code == 2 else str(e.value.code)  # 2: a usage error, on stderr
    assert message in said and "\n" not in said


@pytest.mark.parametrize("preset", ["shapes", "shapes-c4"])
def test_the_shipped_autoencoders_are_the_laptop_presets(preset):
    vae = PRESETS[preset].vae
    assert vae and os.path.isfile(os.path.join(ROOT, vae)), f"{vae} is shipped in the repo"
    enc = DCAEEncoder.from_pretrained(os.path.join(ROOT, vae))
    assert enc.config.latent_channels == PRESETS[preset].in_channels and enc.factor == 4


def test_train_vae_flag_sets_the_latent_space(tmp_path):
    # --vae: a new model on another autoencoder; its latent channels become the DiT's input channels
    tiny_ae(tmp_path / "ae.safetensors")  # 16 channels
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), preset="shapes-c4", vae=str(tmp_path / "ae.safetensors"),
                      batch_size=2, max_steps=1, warmup_steps=1, log_every=1, progress=False, dtype="float32")
    train(cfg)
    model = LinearDiT.from_pretrained(str(tmp_path / "run" / "ckpt" / "model.safetensors"))
    assert model.config.in_channels == 16 and model.config.vae == str(tmp_path / "ae.safetensors")
    for bad, message in [(dict(vae=str(tmp_path / "missing.safetensors")), "--vae"),
                         (dict(init_from=str(tmp_path / "run" / "ckpt" / "model.safetensors")), "drop --vae")]:
        with pytest.raises(SystemExit) as e:
            train(dataclasses.replace(cfg, out_dir=str(tmp_path / "bad"), **bad))
        assert message in str(e.value.code) and "\n" not in str(e.value.code)
