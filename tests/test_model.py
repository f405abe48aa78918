"""model.py: the linear DiT against independent references, and its three checkpoint layouts."""
import json
import os

import pytest
import torch

from model import PRESETS, DiTConfig, LinearDiT, keep_freed_memory, relu_linear_attention, save_model, text_length

TINY = DiTConfig(in_channels=4, patch_size=1, hidden_size=64, depth=2, linear_head_dim=32, cross_heads=2,
                 caption_channels=24, qk_norm=True)


def inputs(cfg, B=2, H=6, W=5, L=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, H, W, generator=g)
    t = torch.tensor([999.0, 250.0])[:B]
    y = torch.randn(B, L, cfg.caption_channels, generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 4:] = 0  # first caption has 4 real tokens, then padding
    return x, t, y, mask


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_linear_attention_equals_quadratic_form_float64():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g) for _ in range(3))
    out = relu_linear_attention(q, k, v, eps=1e-8).double()
    qd, kd, vd = q.double().relu(), k.double().relu(), v.double()
    sim = qd @ kd.transpose(-1, -2)  # (B, h, N, N): the explicit N x N kernel matrix
    ref = (sim @ vd) / (sim.sum(-1, keepdim=True) + 1e-8)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_masked_text_tokens_have_no_influence():
    torch.manual_seed(0)
    model = LinearDiT(TINY).eval()
    x, t, y, mask = inputs(TINY)
    y2 = y.clone()
    y2[0, 4:] = 100 * torch.randn_like(y2[0, 4:])  # change only the padded positions of sample 0
    with torch.no_grad():
        a, b = model(x, t, y, mask), model(x, t, y2, mask)
    assert torch.equal(a[0], b[0])
    y2[0, 2] += 1.0  # a real token does matter
    with torch.no_grad():
        assert not torch.allclose(model(x, t, y2, mask)[0], a[0])


def test_inference_and_training_forward_agree_and_leave_inputs_alone():
    """Without autograd some activations are computed in place: the same numbers as with autograd, and no block
    overwrites its input (prune.py's importance hooks compare a block's input with its output)."""
    torch.manual_seed(0)
    model = LinearDiT(TINY)
    x, t, y, mask = inputs(TINY)
    before, after = [], []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda m, args: before.append(args[0].clone()))
        block.register_forward_hook(lambda m, args, out: after.append((args[0], out)))
    with torch.no_grad():
        a = model(x, t, y, mask)
    b = model(x, t, y, mask)
    assert torch.equal(a, b.detach())
    for copy, (given, out) in zip(before, after):
        assert torch.equal(copy, given) and not torch.equal(given, out)


def test_the_residual_stream_is_token_major_in_every_block():
    """Each block gets and returns (B, N, D) contiguous tokens: a strided stream (the patch conv's channels-first
    memory order, kept by every residual update) makes each norm and linear layer copy it first."""
    model = LinearDiT(TINY)
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, args, out: seen.append((args[0].is_contiguous(), out.is_contiguous())))
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            model(*inputs(TINY))
    assert seen == [(True, True)] * 2 * TINY.depth


def test_text_length_cuts_only_what_is_padding_everywhere():
    mask = torch.zeros(3, 9)
    mask[0, :4], mask[1, :2], mask[2, 6] = 1, 1, 1  # a real token after padding counts
    assert text_length(mask) == 7
    mask[2] = 0  # a caption without real tokens attends to every position: nothing is cut
    assert text_length(mask) == 9


@pytest.mark.parametrize("hw", [(4, 4), (8, 6), (3, 9)])
def test_output_shape_any_resolution(hw):
    model = LinearDiT(TINY)
    x, t, y, mask = inputs(TINY, H=hw[0], W=hw[1])
    assert model(x, t, y, mask).shape == x.shape


def test_patch_size_2_roundtrip_shape():
    cfg = DiTConfig(in_channels=3, patch_size=2, hidden_size=64, depth=1, cross_heads=2, caption_channels=24)
    x, t, y, mask = inputs(cfg, H=8, W=6)
    assert LinearDiT(cfg)(x, t, y, mask).shape == (2, 3, 8, 6)


# figures from shared/reference (diffusers.md, meta-device counts of the official models)
REFERENCE_PARAMS = {"sana-0.6b": 0.592e9, "sana-1.6b": 1.604e9, "sana1.5-1.6b": 1.605e9, "sana1.5-4.8b": 4.722e9}


@pytest.mark.parametrize("name", list(REFERENCE_PARAMS))
def test_preset_parameter_counts(name):
    with torch.device("meta"):
        n = sum(p.numel() for p in LinearDiT(PRESETS[name]).parameters())
    assert abs(n / REFERENCE_PARAMS[name] - 1) < 0.01


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    a = LinearDiT(TINY)
    b = LinearDiT(DiTConfig(**{**TINY.__dict__, "grad_checkpointing": True}))
    b.load_state_dict(a.state_dict())
    x, t, y, mask = inputs(TINY)
    a(x, t, y, mask).square().mean().backward()
    b(x, t, y, mask).square().mean().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), n


# ---- checkpoint layouts -----------------------------------------------------------------------------

def test_our_format_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = LinearDiT(TINY).eval()
    save_model(model, tmp_path / "m.safetensors", step=3)
    back = LinearDiT.from_pretrained(str(tmp_path / "m.safetensors")).eval()
    assert back.config == TINY and back.meta["step"] == "3"
    x, t, y, mask = inputs(TINY)
    with torch.no_grad():
        assert torch.equal(model(x, t, y, mask), back(x, t, y, mask))


def official_state_dict(model):
    """What an official checkpoint holds: our keys plus the two buffers with no learned state."""
    sd = dict(model.state_dict())
    D = model.config.hidden_size
    sd["pos_embed"] = torch.zeros(1, 16, D)
    sd["y_embedder.y_embedding"] = torch.randn(300, model.config.caption_channels)
    return sd


@pytest.mark.parametrize("ext", [".pth", ".safetensors"])
def test_official_layout_roundtrip(tmp_path, ext):
    from safetensors.torch import save_file
    cfg = DiTConfig(**{**TINY.__dict__, "hidden_size": 1152, "depth": 1, "cross_heads": 16})  # official width
    torch.manual_seed(0)
    model = LinearDiT(cfg).eval()
    path = str(tmp_path / f"official{ext}")
    if ext == ".pth":
        torch.save({"state_dict": official_state_dict(model), "step": 1}, path)
    else:
        save_file(official_state_dict(model), path)
    back = LinearDiT.from_pretrained(path).eval()
    assert back.config.hidden_size == 1152 and back.config.cross_heads == 16 and back.config.qk_norm
    x, t, y, mask = inputs(cfg)
    with torch.no_grad():
        assert torch.equal(model(x, t, y, mask), back(x, t, y, mask))


def test_bad_checkpoints_one_line_errors(tmp_path):
    torch.manual_seed(0)
    model = LinearDiT(TINY)
    path = str(tmp_path / "m.safetensors")
    save_model(model, path)
    with pytest.raises(ValueError, match="wrong|expected"):
        LinearDiT.from_pretrained(path, config=DiTConfig(**{**TINY.__dict__, "depth": 3}))
    with pytest.raises(FileNotFoundError, match="not found"):
        LinearDiT.from_pretrained(str(tmp_path / "nope.pth"))
    sd = official_state_dict(LinearDiT(DiTConfig(**{**TINY.__dict__, "hidden_size": 1152, "cross_heads": 16})))
    del sd["blocks.1.mlp.depth_conv.conv.bias"]
    torch.save({"state_dict": sd}, tmp_path / "broken.pth")
    with pytest.raises(ValueError) as e:
        LinearDiT.from_pretrained(str(tmp_path / "broken.pth"))
    msg = str(e.value)
    assert "\n" not in msg and "blocks.1.mlp.depth_conv.conv.bias" in msg
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a SANA checkpoint"):
        LinearDiT.from_pretrained(str(tmp_path / "other.pth"))
    (tmp_path / "x.ckpt").write_text("hi")
    with pytest.raises(ValueError, match="unknown checkpoint type"):
        LinearDiT.from_pretrained(str(tmp_path / "x.ckpt"))


# ---- diffusers as the reference implementation (optional) -----------------------------------------

def tiny_diffusers(qk_norm, interpolation_scale=None):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    m = diffusers.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=36, attention_head_dim=32, num_layers=2,
        num_cross_attention_heads=16, cross_attention_head_dim=72, cross_attention_dim=1152,
        caption_channels=24, mlp_ratio=2.5, dropout=0.0, attention_bias=False, sample_size=8, patch_size=1,
        norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=interpolation_scale, qk_norm=qk_norm)
    with torch.no_grad():  # diffusers zero/one-inits some tensors: randomise all so every weight matters
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return m.eval()


def to_official_keys(dsd):
    """The converter's mapping, written independently of model.py (shared/reference/diffusers.md)."""
    ren = {"patch_embed.proj": "x_embedder.proj", "caption_projection.linear_1": "y_embedder.y_proj.fc1",
           "caption_projection.linear_2": "y_embedder.y_proj.fc2",
           "time_embed.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
           "time_embed.emb.timestep_embedder.linear_2": "t_embedder.mlp.2", "time_embed.linear": "t_block.1",
           "caption_norm": "attention_y_norm", "proj_out": "final_layer.linear",
           "attn1.norm_q": "attn.q_norm", "attn1.norm_k": "attn.k_norm", "attn1.to_out.0": "attn.proj",
           "attn2.to_q": "cross_attn.q_linear", "attn2.norm_q": "cross_attn.q_norm",
           "attn2.norm_k": "cross_attn.k_norm", "attn2.to_out.0": "cross_attn.proj",
           "ff.conv_inverted": "mlp.inverted_conv.conv", "ff.conv_depth": "mlp.depth_conv.conv",
           "ff.conv_point": "mlp.point_conv.conv"}
    out = {"final_layer.scale_shift_table": dsd["scale_shift_table"]}
    for k, v in dsd.items():
        if k.startswith("transformer_blocks.") and k.endswith(".scale_shift_table"):
            out["blocks." + k.split(".")[1] + ".scale_shift_table"] = v
            continue
        head, _, leaf = k.rpartition(".")
        prefix = ""
        if head.startswith("transformer_blocks."):
            i, head = head.split(".", 2)[1], head.split(".", 2)[2]
            prefix = f"blocks.{i}."
            if head in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_k", "attn2.to_v"):
                continue
        if k != "scale_shift_table":
            out[prefix + ren.get(head, head) + "." + leaf] = v
    n = len({k.split(".")[1] for k in dsd if k.startswith("transformer_blocks.")})
    for i in range(n):
        p = f"transformer_blocks.{i}."
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([dsd[p + f"attn1.to_{c}.weight"] for c in "qkv"])
        for w in ("weight", "bias"):
            out[f"blocks.{i}.cross_attn.kv_linear.{w}"] = torch.cat([dsd[p + f"attn2.to_{c}.{w}"] for c in "kv"])
    return out


def test_positional_embedding_matches_diffusers(tmp_path):
    # the 2K/4K models' 2D sin-cos embedding (interpolation_scale 2.0 as at 4K), on an 8x6 grid, not the
    # 8x8 it was configured for, so that the base size and the non-square layout both count
    ref = tiny_diffusers("rms_norm_across_heads", interpolation_scale=2.0)
    x, t, y, mask = inputs(DiTConfig(in_channels=4, caption_channels=24), H=8, W=6)
    t = torch.tensor([999.0, 250.0])
    with torch.no_grad():
        want = ref(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask).sample
    ref.save_pretrained(tmp_path / "diffusers")
    ours = LinearDiT.from_pretrained(str(tmp_path / "diffusers")).eval()
    assert ours.config.use_pe and ours.config.pe_interpolation == 2.0 and ours.config.pe_base_size == 8
    with torch.no_grad():
        assert rel_err(ours(x, t, y, mask), want) < 1e-5
        ours.config.use_pe = False  # the embedding matters: without it the outputs differ
        assert rel_err(ours(x, t, y, mask), want) > 1e-3


@pytest.mark.parametrize("empty", [False, True])
def test_cut_padding_matches_diffusers(tmp_path, empty):
    """Text positions padded in every caption are cut before the caption MLP; diffusers computes them all. With a
    caption of padding only (empty=True), every position counts and none is cut."""
    ref = tiny_diffusers("rms_norm_across_heads")
    x, t, y, mask = inputs(DiTConfig(in_channels=4, caption_channels=24), H=8, W=6, L=9)
    mask[:, 5:] = 0  # the last 4 positions are padding in both captions
    if empty:
        mask[1] = 0
    with torch.no_grad():
        want = ref(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask).sample
    ref.save_pretrained(tmp_path / "diffusers")
    ours = LinearDiT.from_pretrained(str(tmp_path / "diffusers")).eval()
    assert text_length(mask) == (9 if empty else 5)
    with torch.no_grad():
        assert rel_err(ours(x, t, y, mask), want) < 1e-5


@pytest.mark.parametrize("qk_norm", [None, "rms_norm_across_heads"])
def test_matches_diffusers_in_both_layouts(tmp_path, qk_norm):
    ref = tiny_diffusers(qk_norm)
    cfg_like = DiTConfig(in_channels=4, caption_channels=24)
    x, t, y, mask = inputs(cfg_like, H=8, W=6)
    t = torch.tensor([999.0, 250.0])  # integer timesteps: the official model truncates, diffusers does not
    with torch.no_grad():
        want = ref(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask).sample
    ref.save_pretrained(tmp_path / "diffusers")
    ours = LinearDiT.from_pretrained(str(tmp_path / "diffusers")).eval()
    with torch.no_grad():
        assert rel_err(ours(x, t, y, mask), want) < 1e-5
    # the original layout: the same weights under official names in a .pth
    torch.save({"state_dict": to_official_keys(ref.state_dict())}, tmp_path / "official.pth")
    orig = LinearDiT.from_pretrained(str(tmp_path / "official.pth")).eval()
    # official cross-attention qk-norm eps is 1e-6; diffusers' is 1e-5: compare at diffusers' value
    for m in orig.modules():
        if hasattr(m, "eps") and m.eps == 1e-6 and m.__class__.__name__ == "RMSNorm":
            m.eps = 1e-5
    with torch.no_grad():
        assert rel_err(orig(x, t, y, mask), want) < 1e-5


def test_keep_freed_memory_takes_effect_with_glibc():
    """The allocator setting sample.py makes on a CPU (model.keep_freed_memory): glibc's mallopt accepts it."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("no glibc: keep_freed_memory is a no-op here")
    assert keep_freed_memory() is True
