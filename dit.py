"""A small DiT (Peebles & Xie, arXiv 2212.09748) that predicts eps in pixel space.

Patchify -> fixed 2-D sin-cos positions -> adaLN-Zero blocks conditioned on (t, y) -> final adaLN
layer -> unpatchify. The label table has one extra row, the null class, for classifier-free
guidance. `Attention` and `timestep_embedding` are shared with unet.py.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# Shared pieces: timestep embedding, self-attention with the PAG identity switch
# ----------------------------------------------------------------------------------------------


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of integer timesteps, (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention over tokens (B, L, C).

    identity_attn=True replaces the attention map softmax(QK^T) by the identity, so each token
    returns its own value: the perturbation of perturbed-attention guidance (PAG, eq. 27).
    """

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, identity_attn=False):
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        # (B, heads, L, C/heads)
        out = v if identity_attn else F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


# ----------------------------------------------------------------------------------------------
# Embedders
# ----------------------------------------------------------------------------------------------


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t, dtype=torch.float32):
        return self.mlp(timestep_embedding(t, self.freq_dim).to(dtype))


def pos_embed_2d(dim, grid):
    """Fixed 2-D sin-cos position embedding, (grid*grid, dim): half the channels for rows, half for
    columns."""
    def embed_1d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2) / (d / 2))
        out = np.outer(pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    emb = np.concatenate([embed_1d(dim // 2, rows.ravel()),
                          embed_1d(dim // 2, cols.ravel())], axis=1)
    return torch.from_numpy(emb).float()


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


# ----------------------------------------------------------------------------------------------
# Core model
# ----------------------------------------------------------------------------------------------


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero: the conditioning regresses shift, scale and a
    gate per branch; the gates start at zero, so every block starts as the identity."""

    def __init__(self, hidden, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_hidden, hidden))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        nn.init.zeros_(self.adaLN[1].weight)
        nn.init.zeros_(self.adaLN[1].bias)

    def forward(self, x, c, identity_attn=False):
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN(c).chunk(6, dim=1)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), sh1, sc1), identity_attn)
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), sh2, sc2))


class FinalLayer(nn.Module):
    def __init__(self, hidden, patch, out_ch):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.linear = nn.Linear(hidden, patch * patch * out_ch)
        for layer in (self.adaLN[1], self.linear):  # zero output at initialisation
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, c):
        shift, scale = self.adaLN(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


@dataclass
class DiTConfig:
    image_size: int = 16
    patch: int = 2
    hidden: int = 128
    depth: int = 4
    heads: int = 4
    num_classes: int = 10
    channels: int = 3
    arch: str = "dit"


class DiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        c = self.config = config
        if c.image_size % c.patch:
            raise ValueError(f"--image-size {c.image_size} is not divisible by the DiT patch size "
                             f"{c.patch}")
        self.num_classes = c.num_classes  # label id num_classes is the null class
        self.grid = c.image_size // c.patch
        self.patch_embed = nn.Conv2d(c.channels, c.hidden, c.patch, stride=c.patch)
        self.register_buffer("pos", pos_embed_2d(c.hidden, self.grid)[None], persistent=False)
        self.t_embed = TimestepEmbedder(c.hidden)
        self.y_embed = nn.Embedding(c.num_classes + 1, c.hidden)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        self.blocks = nn.ModuleList([DiTBlock(c.hidden, c.heads) for _ in range(c.depth)])
        self.final = FinalLayer(c.hidden, c.patch, c.channels)

    def output_layer(self):
        """The last layer; the refiner re-initialises it to zero to start as the identity."""
        return self.final.linear

    def unpatchify(self, x):
        """(B, L, p*p*C) -> (B, C, H, W)."""
        B, p, g, C = x.shape[0], self.config.patch, self.grid, self.config.channels
        x = x.view(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, C, g * p, g * p)

    def forward(self, x, t, y, identity_attn=False):
        """x: (B, C, H, W), t: (B,) int64, y: (B,) int64 in 0..num_classes -> eps (B, C, H, W)."""
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos  # (B, L, hidden)
        c = self.t_embed(t, x.dtype) + self.y_embed(y)                          # (B, hidden)
        for block in self.blocks:
            h = block(h, c, identity_attn)
        return self.unpatchify(self.final(h, c))


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------

PRESETS = {
    "dit-tiny": dict(image_size=16, patch=4, hidden=128, depth=6, heads=4),    # CPU size, 16 tokens
    "dit-cifar": dict(image_size=32, patch=2, hidden=384, depth=12, heads=6),  # DiT-S/2, ~33M
    "dit-imagenet64": dict(image_size=64, patch=4, hidden=512, depth=12, heads=8),
}
