"""What the scripts share on the command line: one-line errors, the output folder, device and seed, one
table printer, and the defaults that several scripts show (so each is typed once)."""
import argparse
import functools
import os
import random
import sys

import numpy as np
import torch

from safety import BadInput, lock_folder


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the docstring's lines (its usage examples) and shows every flag's default."""


def die(msg):
    """A clear one-line error for bad input, exit status 2, no traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def entry_point(main):
    """Decorate a script's main: bad input raised anywhere below (safety.BadInput) ends in one line."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except BadInput as e:
            die(str(e))
    return run


def make_out_dir(path):
    """Create --out and lock it for this process (safety.lock_folder)."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        die(f"--out {path}: cannot create the output folder ({e.strerror})")
    lock_folder(path)


def resolve_device(name):
    """--device as torch names it. On CUDA, every script lets fp32 matmuls use TF32 (what bf16 autocast
    leaves in fp32), so a number does not depend on which script, or which step of one, ran first."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            die(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return name


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def print_table(header, rows):
    """Print rows of already formatted cells under a header: the first column left-aligned, the others
    right-aligned, each as wide as its widest cell."""
    cells = [[str(c) for c in header], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
