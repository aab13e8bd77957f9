"""A small ADM/DDPM-style UNet that predicts eps (Ho et al. 2020; Dhariwal & Nichol 2021).

ResBlocks (GroupNorm, SiLU, timestep + class embedding as scale-shift), self-attention at chosen
resolutions, skip connections between the down and up paths, zero-initialised output convolution.
The label table has one extra row, the null class, for classifier-free guidance.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dit import Attention, timestep_embedding

# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------


def zero_(module):
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class ResBlock(nn.Module):
    """GN-SiLU-conv, then the (t, y) embedding as scale and shift of the second GroupNorm."""

    def __init__(self, in_ch, out_ch, emb_dim, groups, dropout):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_(nn.Conv2d(out_ch, out_ch, 3, padding=1))  # block starts as its skip path
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Self-attention over the H*W positions, residual; output projection zero-initialised."""

    def __init__(self, ch, heads, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch)
        self.attn = Attention(ch, heads)
        zero_(self.attn.proj)

    def forward(self, x, identity_attn=False):
        B, C, H, W = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        return x + self.attn(tokens, identity_attn).transpose(1, 2).view(B, C, H, W)


class Level(nn.Module):
    """One ResBlock, optionally followed by attention."""

    def __init__(self, in_ch, out_ch, emb_dim, groups, dropout, attn, heads):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, groups, dropout)
        self.attn = AttnBlock(out_ch, heads, groups) if attn else None

    def forward(self, x, emb, identity_attn=False):
        x = self.res(x, emb)
        return self.attn(x, identity_attn) if self.attn is not None else x


# ----------------------------------------------------------------------------------------------
# Core model
# ----------------------------------------------------------------------------------------------


@dataclass
class UNetConfig:
    image_size: int = 16
    ch: int = 32
    mult: tuple = (1, 2, 2)
    num_res: int = 1
    attn_res: tuple = (8,)
    heads: int = 4
    groups: int = 8
    dropout: float = 0.0
    num_classes: int = 10
    channels: int = 3
    arch: str = "unet"


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        c = self.config = config
        if c.image_size % 2 ** (len(c.mult) - 1):
            raise ValueError(f"--image-size {c.image_size} is not divisible by 2^{len(c.mult) - 1} "
                             f"(the UNet's down-sampling levels)")
        self.num_classes = c.num_classes  # label id num_classes is the null class
        emb_dim = 4 * c.ch
        self.t_mlp = nn.Sequential(nn.Linear(c.ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.y_embed = nn.Embedding(c.num_classes + 1, emb_dim)
        self.in_conv = nn.Conv2d(c.channels, c.ch, 3, padding=1)
        level = lambda i, o, res: Level(i, o, emb_dim, c.groups, c.dropout, res in c.attn_res,
                                        c.heads)

        self.down, skips, ch, res = nn.ModuleList(), [c.ch], c.ch, c.image_size
        for i, m in enumerate(c.mult):
            for _ in range(c.num_res):
                self.down.append(level(ch, c.ch * m, res))
                ch = c.ch * m
                skips.append(ch)
            if i < len(c.mult) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
                res //= 2
        self.mid = nn.ModuleList([level(ch, ch, res),
                                  ResBlock(ch, ch, emb_dim, c.groups, c.dropout)])
        self.mid[0].attn = AttnBlock(ch, c.heads, c.groups)  # ADM: attention in the middle always

        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(c.mult))):
            for _ in range(c.num_res + 1):
                self.up.append(level(ch + skips.pop(), c.ch * m, res))
                ch = c.ch * m
            if i > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
                self.up.append(nn.Conv2d(ch, ch, 3, padding=1))
                res *= 2
        self.out_norm = nn.GroupNorm(c.groups, ch)
        self.out_conv = zero_(nn.Conv2d(ch, c.channels, 3, padding=1))

    def output_layer(self):
        """The last layer; the refiner re-initialises it to zero to start as the identity."""
        return self.out_conv

    def forward(self, x, t, y, identity_attn=False):
        """x: (B, C, H, W), t: (B,) int64, y: (B,) int64 in 0..num_classes -> eps (B, C, H, W)."""
        # (B, 4ch)
        emb = self.t_mlp(timestep_embedding(t, self.config.ch).to(x.dtype)) + self.y_embed(y)
        h = self.in_conv(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb, identity_attn) if isinstance(layer, Level) else layer(h)
            hs.append(h)
        h = self.mid[1](self.mid[0](h, emb, identity_attn), emb)
        for layer in self.up:
            if isinstance(layer, Level):
                h = layer(torch.cat([h, hs.pop()], dim=1), emb, identity_attn)
            else:
                h = layer(h)
        return self.out_conv(F.silu(self.out_norm(h)))


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------

PRESETS = {
    # CPU default: 16 channels at 16px, attention only in the 4x4 middle (0.48 ms/image forward on 2
    # cores)
    "unet-tiny": dict(image_size=16, ch=16, mult=(1, 2, 4), num_res=1, attn_res=(), groups=4),
    "unet-cifar": dict(image_size=32, ch=128, mult=(1, 2, 2, 2), num_res=2, attn_res=(16,),
                       groups=32, dropout=0.1),                           # DDPM-CIFAR size, ~36M
    "unet-imagenet64": dict(image_size=64, ch=128, mult=(1, 2, 3, 4), num_res=2, attn_res=(16, 8),
                            groups=32, heads=4, dropout=0.1),
}
