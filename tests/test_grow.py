"""grow.py: growth plans, the identity property of partial preservation through the model's output, replicated
weights, training after growth, official-layout sources, and the CLI."""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from grow import describe_plan, grow, growth_plan
from model import DiTConfig, LinearDiT, save_model
from conftest import trained_like

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = DiTConfig(in_channels=4, patch_size=1, hidden_size=64, depth=4, linear_head_dim=32, cross_heads=2,
                caption_channels=24, qk_norm=True)


def inputs(cfg, B=2, H=5, W=6, L=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, H, W, generator=g)
    t = torch.tensor([900.0, 120.0])[:B]
    y = torch.randn(B, L, cfg.caption_channels, generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 3:] = 0
    return x, t, y, mask


def block_sd(model, i):
    return {k: v for k, v in model.blocks[i].state_dict().items()}


def non_block_sd(model):
    return {k: v for k, v in model.state_dict().items() if not k.startswith("blocks.")}


# -----------------------------------------------------------------------------
# plans


def test_plans_follow_the_paper_formulas():
    assert growth_plan(20, 60, "partial", 2) == [(i, i if i < 18 else None) for i in range(60)]
    assert growth_plan(4, 10, "cyclic", 0) == [(i, i % 4) for i in range(10)]  # theta_i = theta_{i mod N}
    assert growth_plan(20, 60, "block", 0) == [(3 * i + j, i) for i in range(20) for j in range(3)]  # r = 3
    assert growth_plan(5, 9, "block", 2) == [(3 * i + j, i) for i in range(3) for j in range(3)]  # N' = 3


def test_describe_plan_compresses_runs():
    assert describe_plan(growth_plan(20, 60, "partial", 2)) == [
        "blocks 0-17      <- source 0-17", "blocks 18-59     new (identity: zeroed output projections)"]
    assert describe_plan(growth_plan(2, 4, "cyclic", 0)) == ["blocks 0-1       <- source 0-1",
                                                             "blocks 2-3       <- source 0-1"]
    assert describe_plan(growth_plan(2, 4, "block", 0)) == ["blocks 0-1       <- source 0 (x2)",
                                                            "blocks 2-3       <- source 1 (x2)"]


@pytest.mark.parametrize("args, words", [
    ((4, 4, "partial", 0), "does not grow"),
    ((4, 3, "cyclic", 1), "does not grow"),
    ((4, 6, "partial", 4), "drop_last"),
    ((4, 6, "partial", -1), "drop_last"),
    ((4, 6, "stack", 0), "unknown growth strategy"),
    ((4, 10, "block", 0), "multiple"),
])
def test_bad_requests_give_one_line_errors(args, words):
    with pytest.raises(ValueError) as e:
        growth_plan(*args)
    assert words in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError):
        grow(LinearDiT(dataclasses.replace(SRC, hidden_size=32, cross_heads=1)), args[1], args[2], args[3])


# -----------------------------------------------------------------------------
# partial preservation: identity through the model output


def test_partial_drop0_reproduces_the_source_output():
    src = trained_like(SRC)
    grown = grow(src, 7, init="partial", drop_last=0).eval()
    assert grown.config.depth == 7 and len(grown.blocks) == 7
    x, t, y, mask = inputs(SRC)
    with torch.no_grad():
        a, b = src(x, t, y, mask), grown(x, t, y, mask)
    assert a.abs().mean() > 0.1  # a real output, not a zero that would match anything
    assert torch.equal(a, b)  # new blocks add exact zeros: bit-exact


def test_partial_drop_k_reproduces_the_truncated_source():
    src = trained_like(SRC)
    k = 2
    ref = LinearDiT(dataclasses.replace(SRC, depth=SRC.depth - k)).eval()  # the source minus its last k blocks
    sd = src.state_dict()
    ref.load_state_dict({n: sd[n] for n in ref.state_dict()}, strict=True)
    grown = grow(src, 6, init="partial", drop_last=k).eval()
    x, t, y, mask = inputs(SRC)
    with torch.no_grad():
        out_ref, out_grown, out_src = ref(x, t, y, mask), grown(x, t, y, mask), src(x, t, y, mask)
    assert torch.allclose(out_grown, out_ref, atol=1e-6, rtol=0)
    assert not torch.allclose(out_grown, out_src, atol=1e-3)  # dropping blocks did change the function


def test_partial_new_blocks_are_random_except_zeroed_projections():
    src = trained_like(SRC)
    grown = grow(src, 6, init="partial", drop_last=1)
    for i in range(3, 6):
        b = grown.blocks[i]
        for p in (b.attn.proj.weight, b.attn.proj.bias, b.cross_attn.proj.weight, b.cross_attn.proj.bias,
                  b.mlp.point_conv.conv.weight):
            assert torch.count_nonzero(p) == 0
        for p in (b.attn.qkv.weight, b.cross_attn.q_linear.weight, b.cross_attn.kv_linear.weight,
                  b.mlp.inverted_conv.conv.weight, b.mlp.depth_conv.conv.weight, b.scale_shift_table):
            assert p.std() > 1e-3  # trainable, not stuck at zero
        for norm in (b.attn.q_norm, b.attn.k_norm, b.cross_attn.q_norm, b.cross_attn.k_norm):
            assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    assert not torch.equal(grown.blocks[3].attn.qkv.weight, grown.blocks[4].attn.qkv.weight)


# -----------------------------------------------------------------------------
# replication: the expected source tensors in every target block


@pytest.mark.parametrize("init, depth, drop_last, source_of", [
    ("cyclic", 10, 0, lambda i: i % 4),
    ("cyclic", 5, 1, lambda i: i % 3),
    ("block", 8, 0, lambda i: i // 2),
    ("block", 9, 1, lambda i: i // 3),
])
def test_replication_copies_the_expected_blocks(init, depth, drop_last, source_of):
    src = trained_like(SRC)
    grown = grow(src, depth, init=init, drop_last=drop_last)
    for i in range(depth):
        want, got = block_sd(src, source_of(i)), block_sd(grown, i)
        assert want.keys() == got.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), f"block {i} {k}"
    for k, v in non_block_sd(src).items():
        assert torch.equal(non_block_sd(grown)[k], v), k
    # replicas are independent tensors: training one copy must not move another
    assert len({b.attn.qkv.weight.data_ptr() for b in grown.blocks}) == depth


def test_non_block_params_are_carried_and_source_untouched():
    src = trained_like(SRC)
    before = {k: v.clone() for k, v in src.state_dict().items()}
    grown = grow(src, 6, init="partial", drop_last=2)
    for k, v in non_block_sd(src).items():
        assert torch.equal(grown.state_dict()[k], v), k
    for k, v in src.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_source_without_qk_norm_gains_it():
    cfg = dataclasses.replace(SRC, qk_norm=False)
    src = trained_like(cfg)
    grown = grow(src, 6, init="cyclic", drop_last=1)
    assert grown.config.qk_norm and not src.config.qk_norm
    assert torch.equal(grown.blocks[3].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    assert torch.equal(grown.blocks[4].cross_attn.q_norm.weight, torch.ones(cfg.hidden_size))


def test_grown_model_keeps_the_source_dtype():
    src = trained_like(SRC).to(torch.bfloat16)
    grown = grow(src, 5, init="partial", drop_last=0)
    assert all(p.dtype == torch.bfloat16 for p in grown.parameters())
    assert torch.equal(grown.blocks[1].mlp.depth_conv.conv.weight, src.blocks[1].mlp.depth_conv.conv.weight)


# -----------------------------------------------------------------------------
# training after growth


@pytest.mark.parametrize("init", ["partial", "cyclic", "block"])
def test_grown_model_trains(init):
    src = trained_like(SRC)
    torch.manual_seed(1)
    grown = grow(src, 8, init=init, drop_last=0).train()
    opt = torch.optim.AdamW(grown.parameters(), lr=1e-3)
    x, t, y, mask = inputs(SRC)
    target = torch.randn_like(x)
    qkv0 = grown.blocks[-1].attn.qkv.weight.clone()
    losses = []
    for _ in range(12):
        loss = (grown(x, t, y, mask) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], losses
    # a new block's inner weights move too once its zeroed output projection has moved (no dead block)
    assert not torch.equal(grown.blocks[-1].attn.qkv.weight, qkv0)


# -----------------------------------------------------------------------------
# official-layout source and the CLI


def test_grow_official_layout_checkpoint(tmp_path):
    # width 1152 so from_pretrained infers 16 cross heads; a small FFN and caption width keep it light
    cfg = DiTConfig(in_channels=4, patch_size=1, hidden_size=1152, depth=2, cross_heads=16, mlp_ratio=0.25,
                    caption_channels=16, qk_norm=False)
    torch.manual_seed(0)
    src = LinearDiT(cfg)
    sd = dict(src.state_dict())
    sd["pos_embed"] = torch.zeros(1, 16, 1152)  # official buffers we drop on load
    sd["y_embedder.y_embedding"] = torch.zeros(300, 16)
    path = tmp_path / "official.pth"
    torch.save({"state_dict": sd}, path)
    loaded = LinearDiT.from_pretrained(str(path))
    assert not loaded.config.qk_norm
    grown = grow(loaded, 3, init="partial", drop_last=0)
    assert grown.config.qk_norm and grown.config.depth == 3 and grown.config.cross_heads == 16
    for i in range(2):
        for k, v in block_sd(src, i).items():
            assert torch.equal(block_sd(grown, i)[k], v), k
    assert torch.equal(grown.blocks[0].attn.q_norm.weight, torch.ones(1152))
    assert torch.count_nonzero(grown.blocks[2].cross_attn.proj.weight) == 0


def run_cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "grow.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_cli_round_trip(tmp_path):
    src = trained_like(SRC)
    save_model(src, str(tmp_path / "src.safetensors"))
    out = tmp_path / "grown.safetensors"
    r = run_cli("--src", str(tmp_path / "src.safetensors"), "--depth", "6", "--init", "partial",
                "--drop_last", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "blocks 0-2       <- source 0-2" in r.stdout and "blocks 3-5       new" in r.stdout
    assert "params:" in r.stdout
    grown = LinearDiT.from_pretrained(str(out)).eval()
    assert grown.config.depth == 6 and grown.config.qk_norm
    assert grown.meta["grow_init"] == "partial"
    ref = grow(src, 6, init="partial", drop_last=1).eval()
    x, t, y, mask = inputs(SRC)
    with torch.no_grad():
        assert torch.equal(grown(x, t, y, mask), ref(x, t, y, mask))  # new blocks are identities either way
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # atomic write left no temp file

    bad = run_cli("--src", str(tmp_path / "src.safetensors"), "--depth", "3", "--drop_last", "0",
                  "--out", str(tmp_path / "x.safetensors"))
    assert bad.returncode != 0 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1, bad.stderr
    missing = run_cli("--src", str(tmp_path / "nope.safetensors"), "--depth", "6", "--out", str(tmp_path / "y.safetensors"))
    assert missing.returncode != 0 and missing.stderr.startswith("error: checkpoint not found")
    made = out.read_bytes()
    again = run_cli("--src", str(tmp_path / "src.safetensors"), "--depth", "8", "--out", str(out))
    assert again.returncode == 1 and again.stderr.strip() == f"error: --out {out} exists; pass --overwrite to replace it or choose another --out"
    assert out.read_bytes() == made  # never overwritten unasked
    for flag, bad_value in (("--depth", "0"), ("--drop_last", "-1")):
        r = run_cli("--src", str(tmp_path / "src.safetensors"), "--depth", "6", flag, bad_value, "--out", str(tmp_path / "z"))
        assert r.returncode == 2 and r.stderr.startswith(f"error: {flag}={bad_value}: must be") and r.stderr.count("\n") == 1
