"""Every Gaussian noise the repository draws comes from one named stream, so no two uses share a
noise.

A training x_T must never be shown in a picture or scored in a table, and the noises that chose a
default must not also report the result. So each use has its own stream, seeded by a hash of
(stream, seed, index), and `tests/test_noises.py` checks that no stream repeats a pair shard's x_T:

    pairs     the x_T of the guided training pairs, one generator per shard (index = shard)
    dev       held-out bank for choosing defaults, the analyses and validation-style checks
    test      held-out bank used only by the final tables (train_refiner, evaluate, ablate)
    sample    sample.py's noises (--seed)
    grid      the teacher's sample grids during training
    analysis  the analyses' other random draws (image choice and noising of the Jacobian test)
    bench     bench.py's random inputs
"""
import hashlib

import torch

STREAMS = ("pairs", "dev", "test", "sample", "grid", "analysis", "bench")
BANKS = ("dev", "test")


def generator(stream, seed=0, index=0):
    """A CPU torch.Generator for one (stream, seed, index); the same triple gives the same
    numbers."""
    if stream not in STREAMS:
        raise ValueError(f"unknown noise stream {stream!r}; one of {', '.join(STREAMS)}")
    digest = hashlib.sha256(f"{stream}/{seed}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def bank(name, n, num_classes, shape, index=0):
    """n held-out noises x_T with balanced labels (n / num_classes each), the same in every run.

    name: 'dev' or 'test'. index > 0 gives further independent noises of the same bank (the
    analyses' second noise of a pair, a fresh noise for a band swap)."""
    if name not in BANKS:
        raise ValueError(f"bank must be one of {', '.join(BANKS)}, got {name!r}")
    return (torch.randn((n, *shape), generator=generator(name, 0, index)),
            torch.arange(n) % num_classes)
