"""Faster on a GPU, one story for every script: bf16 autocast (--amp), torch.compile (--compile) and
channels-last memory (--channels-last). Each also runs on the CPU (bf16 autocast and the inductor
compiler both have CPU back ends), so the tests run the code a GPU user runs, differing only in the
device.

What stays fp32 under --amp bf16, and why: autocast runs matmuls and convolutions in bf16 (8 bits of
mantissa, about 3 significant digits) and keeps norms, softmax and reductions in fp32. The callers
cast every eps back to the dtype of x (fp32) before they combine or accumulate it: the CFG
difference eps_c - eps_u is small next to either term, and the MSD chain's x_hat_0 - x0_guide is a
small residual of a 10-step sum, so bf16 rounding there would be the same size as the signal (see
diffusion.guided_eps and noiserefine.msd_loss).
"""
import contextlib

import torch

AMP = ("none", "bf16")


def add_flags(p, amp=True, compile=False, channels_last=False):
    """The speed flags a script offers, with one help text each."""
    if amp:
        p.add_argument("--amp", default="none", choices=AMP,
                       help="bf16 autocast of the network forwards (accumulations and losses stay "
                            "fp32)")
    if compile:
        p.add_argument("--compile", action="store_true",
                       help="torch.compile the network (CUDA or CPU)")
    if channels_last:
        p.add_argument("--channels-last", action="store_true",
                       help="channels-last memory for the network and its inputs (helps "
                            "convolutions on tensor cores: the UNet)")


def autocast(device, amp):
    """bf16 autocast on the device's type (cuda or cpu), or nothing for amp = 'none'."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def to_channels_last(x):
    """A module or a 4-D tensor in channels-last memory (the same values; only the strides
    change)."""
    if isinstance(x, torch.nn.Module):
        return x.to(memory_format=torch.channels_last)
    return x.contiguous(memory_format=torch.channels_last)
