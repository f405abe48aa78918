"""DC-AE encoder/decoder: exact match with diffusers' AutoencoderDC, shapes, checkpoints, parameter counts."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model import (DCAE_PRESETS, DCAEConfig, DCAEDecoder, DCAEEncoder, DownBlock, UpBlock, litemla_quadratic,
                   relu_linear_attention)


def litemla_linear(q, k, v, eps):  # DC-AE's (B, h, d, N) layout over model.relu_linear_attention's (B, h, N, d)
    return relu_linear_attention(*(z.transpose(-1, -2) for z in (q, k, v)), eps).transpose(-1, -2)

TINY = DCAE_PRESETS["shapes-tiny"]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def randomize_(module, seed=0):
    """Move every tensor off its init (norm weights 1, biases 0) so no parameter can hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


# --- the attention kernel against an explicit float64 form ---------------------------------------------------

def test_attention_equals_float64_quadratic_form():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 8, 20, generator=g) for _ in range(3))  # (B, h, d, N)
    q, k = F.relu(q), F.relu(k)
    qd, kd, vd = q.double(), k.double(), v.double()
    w = torch.einsum("bhdm,bhdn->bhmn", kd, qd)  # (B, h, N, N): w[m, n] = k_m . q_n
    ref = torch.einsum("bhdm,bhmn->bhdn", vd, w) / (w.sum(dim=2)[:, :, None] + 1e-15)
    assert rel_err(litemla_linear(q, k, v, 1e-15).double(), ref) < 1e-5
    assert rel_err(litemla_quadratic(q, k, v, 1e-15).double(), ref) < 1e-5


def test_shortcuts_are_pooling_and_nearest_upsampling():
    # with the convs zeroed, the channel-averaging unshuffle is 2x2 average pooling and the
    # channel-duplicating shuffle is nearest upsampling (for equal in/out widths)
    x = torch.randn(2, 4, 6, 8)
    down, up = DownBlock(4, 4), UpBlock(4, 4)
    for m in (down, up):
        torch.nn.init.zeros_(m.conv.weight)
        torch.nn.init.zeros_(m.conv.bias)
    torch.testing.assert_close(down(x), F.avg_pool2d(x, 2))
    torch.testing.assert_close(up(x), F.interpolate(x, scale_factor=2, mode="nearest"))


# --- exact numerics against diffusers ---------------------------------------------------------------------

def tiny_diffusers_ae(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ae = diffusers.AutoencoderDC(  # every field set: the class defaults are not dc-ae-f32c32's
        in_channels=3, latent_channels=4, attention_head_dim=8,
        encoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 16, 32), decoder_block_out_channels=(8, 16, 32),
        encoder_layers_per_block=(1, 1, 2), decoder_layers_per_block=(1, 2, 2),
        encoder_qkv_multiscales=((), (5,), (3, 5)), decoder_qkv_multiscales=((), (5,), (3, 5)),
        upsample_block_type="interpolate", downsample_block_type="conv", decoder_norm_types="rms_norm",
        decoder_act_fns="silu", encoder_out_shortcut=True, decoder_in_shortcut=True, decoder_conv_act_fn="relu",
        scaling_factor=0.41407).eval()
    randomize_(ae)
    ae.save_pretrained(tmp_path / "vae")
    return ae


@pytest.mark.parametrize("size", [8, 16])  # 8: last stage 2x2 <= head_dim -> quadratic branch; 16: all linear
def test_matches_diffusers(tmp_path, size):
    ae = tiny_diffusers_ae(tmp_path)
    enc = DCAEEncoder.from_pretrained(str(tmp_path / "vae"))
    dec = DCAEDecoder.from_pretrained(str(tmp_path))  # a pipeline folder: finds vae/
    assert enc.scaling_factor == dec.scaling_factor == 0.41407
    assert enc.config.block_types == ("ResBlock", "EfficientViTBlock", "EfficientViTBlock")
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = torch.randn(2, 4, size // 4, size // 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref_z, ref_x = ae.encode(x).latent, ae.decode(z).sample
        out_z, out_x = enc(x), dec(z)
    assert out_z.shape == ref_z.shape == (2, 4, size // 4, size // 4) and out_x.shape == ref_x.shape == x.shape
    assert rel_err(out_z, ref_z) < 1e-5, rel_err(out_z, ref_z)
    assert rel_err(out_x, ref_x) < 1e-5, rel_err(out_x, ref_x)


def test_diffusers_layout_rejects_other_kinds(tmp_path):
    tiny_diffusers_ae(tmp_path)
    cfg_file = tmp_path / "vae" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["upsample_block_type"] = "pixel_shuffle"
    cfg_file.write_text(json.dumps(cfg))
    DCAEEncoder.from_pretrained(str(tmp_path / "vae"))  # the encoder does not care about upsampling
    with pytest.raises(ValueError, match="upsample_block_type='pixel_shuffle' is not supported"):
        DCAEDecoder.from_pretrained(str(tmp_path / "vae"))


# --- no diffusers needed ---------------------------------------------------------------------------------

def test_shapes():
    enc, dec = DCAEEncoder(TINY), DCAEDecoder(TINY)
    with torch.no_grad():
        assert enc(torch.randn(2, 3, 64, 96)).shape == (2, 32, 2, 3)
        assert dec(torch.randn(1, 32, 3, 2)).shape == (1, 3, 96, 64)
        with pytest.raises(ValueError, match="multiple of 32"):
            enc(torch.randn(1, 3, 48, 64))


def test_our_format_round_trip(tmp_path):
    torch.manual_seed(0)
    enc, dec = DCAEEncoder(TINY), DCAEDecoder(TINY)
    randomize_(enc), randomize_(dec)
    enc.save_pretrained(str(tmp_path / "enc.safetensors"))
    dec.save_pretrained(str(tmp_path / "dec.safetensors"))
    enc2 = DCAEEncoder.from_pretrained(str(tmp_path / "enc.safetensors"))
    dec2 = DCAEDecoder.from_pretrained(str(tmp_path / "dec.safetensors"))
    assert enc2.config == enc.config == TINY and dec2.config == TINY
    x, z = torch.randn(1, 3, 64, 64), torch.randn(1, 32, 2, 2)
    with torch.no_grad():
        assert torch.equal(enc(x), enc2(x)) and torch.equal(dec(z), dec2(z))


def one_line_error(fn, *needles):
    with pytest.raises(ValueError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg


def test_bad_checkpoints(tmp_path):
    dec = DCAEDecoder(TINY)
    good = tmp_path / "dec.safetensors"
    dec.save_pretrained(str(good))
    sd = load_file(str(good))
    with safe_open(str(good), "pt") as f:
        meta = f.metadata()

    missing = dict(sd)
    del missing["decoder.up_blocks.3.1.attn.to_q.weight"]
    save_file(missing, str(tmp_path / "missing.safetensors"), metadata=meta)
    one_line_error(lambda: DCAEDecoder.from_pretrained(str(tmp_path / "missing.safetensors")),
                   "does not fit DCAEDecoder", "missing key 'up_blocks.3.1.attn.to_q.weight'", "(32, 32)")

    wrong = dict(sd, **{"decoder.conv_in.weight": torch.zeros(64, 32, 1, 1)})
    save_file(wrong, str(tmp_path / "wrong.safetensors"), metadata=meta)
    one_line_error(lambda: DCAEDecoder.from_pretrained(str(tmp_path / "wrong.safetensors")),
                   "'conv_in.weight' has shape (64, 32, 1, 1), expected (64, 32, 3, 3)")

    extra = dict(sd, **{"decoder.up_blocks.9.bias": torch.zeros(3)})
    save_file(extra, str(tmp_path / "extra.safetensors"), metadata=meta)
    one_line_error(lambda: DCAEDecoder.from_pretrained(str(tmp_path / "extra.safetensors")),
                   "unexpected key 'up_blocks.9.bias'")

    one_line_error(lambda: DCAEEncoder.from_pretrained(str(good)), "no 'encoder.*' keys")

    save_file(sd, str(tmp_path / "nometa.safetensors"))
    one_line_error(lambda: DCAEDecoder.from_pretrained(str(tmp_path / "nometa.safetensors")), "no 'config'")

    (tmp_path / "folder").mkdir()
    one_line_error(lambda: DCAEDecoder.from_pretrained(str(tmp_path / "folder")), "config.json")


def test_config_validation():
    with pytest.raises(ValueError, match="encoder_depths has 2 entries"):
        DCAEConfig(encoder_depths=(1, 1))
    with pytest.raises(ValueError, match="multiple of latent_channels"):
        DCAEConfig(latent_channels=48)


def test_param_counts_f32c32():
    with torch.device("meta"):
        enc, dec = DCAEEncoder(DCAE_PRESETS["dc-ae-f32c32"]), DCAEDecoder(DCAE_PRESETS["dc-ae-f32c32"])
    n_enc, n_dec = (sum(p.numel() for p in m.parameters()) for m in (enc, dec))
    assert abs(n_enc / 153.0e6 - 1) < 0.01, n_enc
    assert abs(n_dec / 159.2e6 - 1) < 0.01, n_dec
