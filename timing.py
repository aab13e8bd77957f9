"""Timing that a slow spell of the machine cannot tilt: configurations take turns over rounds, and a
ratio is read off each one's fastest round, with the spread of the per-round ratios printed beside
it.

Why the fastest round: other work on the machine can only make a round slower, never faster, so each
configuration's fastest round is the least disturbed measure of it (the advice of Python's timeit);
a median still moves when half the rounds are slowed.
"""
import statistics
import sys
import time

import torch

# a configuration whose slowest round took this much longer than its fastest is flagged
SPREAD_WARN = 1.25


def spread(values):
    """{'median', 'min', 'max'} of per-round values."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def ratio(slow, fast):
    """slow / fast from per-round seconds: 'best', the ratio of each one's fastest round (the
    statistic reported), with the median, min and max of the per-round ratios (the spread printed
    beside it)."""
    return {"best": min(slow) / min(fast), **spread([s / f for s, f in zip(slow, fast)])}


def ratio_text(r):
    """'best [min-max]x': the ratio of the fastest rounds, and the range of the per-round ratios."""
    return f"{r['best']:.2f} [{r['min']:.2f}-{r['max']:.2f}]x"


def timed(fn, device):
    """(fn's result, its wall seconds), synchronised around it on CUDA."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def warn_if_spread(times, label=""):
    """A line on stderr for each configuration whose rounds lie more than SPREAD_WARN apart."""
    for name, t in times.items():
        if max(t) > SPREAD_WARN * min(t):
            print(f"warning: {label}{name}: rounds took {min(t):.3g}-{max(t):.3g} s (more than "
                  f"{SPREAD_WARN}x apart); the machine was busy, read this row's spread",
                  file=sys.stderr)


def interleaved_seconds(fns, device, repeats, label=""):
    """{name: [seconds of each round]}: a warm-up call of each, then `repeats` rounds timing each fn
    in turn, so that a slow spell of the machine hits every configuration alike instead of one of
    them."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device)[1])
    warn_if_spread(times, label)
    return times
