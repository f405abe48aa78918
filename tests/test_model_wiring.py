"""model.py's adaLN-single wiring rebuilt by hand from the official equations (shared/reference/sana-official.md,
"Forward pass" and "SanaMSBlock.forward"), with no reference library: which chunk of (table + t0) is shift,
scale and gate, that both residual branches are gated, and that the final layer is modulated by t itself."""
import torch
import torch.nn.functional as F

from model import DiTConfig, FinalLayer, LinearDiT, SanaBlock

CFG = DiTConfig(in_channels=4, patch_size=1, hidden_size=64, depth=1, linear_head_dim=32, cross_heads=2,
                caption_channels=24, qk_norm=True)


def randomized(module, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module.eval()


def test_block_modulation_by_hand():
    block = randomized(SanaBlock(CFG))
    g = torch.Generator().manual_seed(1)
    B, (h, w), L, D = 2, (3, 4), 5, CFG.hidden_size
    x = torch.randn(B, h * w, D, generator=g)
    y = torch.randn(B, L, D, generator=g)
    bias = torch.zeros(B, 1, 1, L)
    bias[0, ..., 3:] = -10000.0  # padding of the first caption
    t0 = torch.randn(B, 6 * D, generator=g)  # t_block's output, shared by all blocks

    m = block.scale_shift_table[None] + t0.view(B, 6, D)  # (B, 6, D): this block's offset + the shared projection
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (m[:, i:i + 1] for i in range(6))

    def ln(z):
        return F.layer_norm(z, (D,), eps=CFG.norm_eps)  # no affine parameters

    x1 = x + gate_msa * block.attn(ln(x) * (1 + scale_msa) + shift_msa)
    x2 = x1 + block.cross_attn(x1, y, bias)  # no norm, no modulation, no gate
    want = x2 + gate_mlp * block.mlp(ln(x2) * (1 + scale_mlp) + shift_mlp, (h, w))
    with torch.no_grad():
        got = block(x, y, bias, t0, (h, w))
        assert torch.allclose(got, want, atol=1e-5)
        ungated = x2 + block.mlp(ln(x2) * (1 + scale_mlp) + shift_mlp, (h, w))
        assert not torch.allclose(got, ungated, atol=1e-3)  # the gates are far from 1: the check can fail


def test_final_layer_modulation_by_hand():
    final = randomized(FinalLayer(CFG))
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 12, CFG.hidden_size, generator=g), torch.randn(2, CFG.hidden_size, generator=g)
    shift, scale = final.scale_shift_table[None, 0] + t, final.scale_shift_table[None, 1] + t  # (B, D) each
    want = final.linear(F.layer_norm(x, (CFG.hidden_size,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None])
    with torch.no_grad():
        assert torch.allclose(final(x, t), want, atol=1e-5)


def test_model_feeds_t0_to_the_blocks_and_t_to_the_final_layer():
    model = randomized(LinearDiT(CFG))
    seen = {}
    model.blocks[0].register_forward_hook(lambda m, args, out: seen.update(t0=args[3]))
    model.final_layer.register_forward_hook(lambda m, args, out: seen.update(t=args[1]))
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, 4, 3, 4, generator=g), torch.randn(2, 5, 24, generator=g)
    timesteps = torch.tensor([999.0, 250.0])
    with torch.no_grad():
        model(x, timesteps, y, torch.ones(2, 5, dtype=torch.long))
        t = model.t_embedder(timesteps)
        assert torch.equal(seen["t"], t) and torch.equal(seen["t0"], model.t_block(t))
