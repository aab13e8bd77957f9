"""What the scripts share on the command line: one-line errors, the output folder, device and seed,
one table printer, and the defaults that several scripts show (so each is typed once)."""
import argparse
import functools
import math
import os
import random
import sys

import numpy as np
import torch

from tqdm import tqdm

from safety import BadInput, Interrupted, lock_folder


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the docstring's lines (its usage examples) and shows every flag's default,
    unless its help already says what the default means."""

    def _get_help_string(self, action):
        if "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Every script's parser: the docstring as its help, and a bad flag ends in one line naming it
    ('error: argument --lr: expected a number > 0, got -1'), exit 2, before any work starts."""

    def __init__(self, description):
        # no abbreviations: '--msd 5' must not pass as --msd-steps unseen by given_flags (and
        # --resume)
        super().__init__(description=description, formatter_class=HelpFormatter, allow_abbrev=False)

    def error(self, message):
        die(message)


# ----------------------------------------------------------------------------------------------
# Flag types: each checks its value at parse time and names its domain (tests/test_flags.py fuzzes
# them)
# ----------------------------------------------------------------------------------------------


def flag_type(domain):
    """Mark a parse function as a validator with this domain (for --help and the fuzz test)."""
    def mark(parse):
        parse.domain = domain
        parse.__name__ = domain  # what argparse would print for a ValueError
        return parse
    return mark


def converted(text, convert, kind):
    """convert(text), or the flag's one-line error naming what was expected."""
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None


def integer(lo, hi=None):
    """An integer in lo..hi (no hi: below 2^62, which no count here comes near)."""
    domain = f"an integer in {lo}..{hi}" if hi is not None else f"an integer >= {lo} (below 2^62)"

    @flag_type(domain)
    def parse(text):
        value = converted(text, int, "an integer")
        if not lo <= value <= (hi if hi is not None else 2 ** 62):
            raise argparse.ArgumentTypeError(f"expected {domain}, got {value}")
        return value
    return parse


def number(lo, hi, lo_open=False, hi_open=False):
    """A finite float in [lo, hi], either end open if asked."""
    domain = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    @flag_type(domain)
    def parse(text):
        value = converted(text, float, "a number")
        inside = ((lo < value if lo_open else lo <= value)
                  and (value < hi if hi_open else value <= hi))
        if not math.isfinite(value) or not inside:
            raise argparse.ArgumentTypeError(f"expected {domain}, got {text}")
        return value
    return parse


@flag_type("an existing checkpoint file")
def checkpoint_file(text):
    """A file torch.save wrote (a zip archive); what is in it is checked when it is loaded."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text!r}: no such file")
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a file")
    try:
        with open(text, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: cannot read it ({e.strerror})") from None
    if magic != b"PK\x03\x04":
        raise argparse.ArgumentTypeError(f"{text!r} is "
                                         f"{'empty' if not magic else 'not a checkpoint'} "
                                         "(a checkpoint is a zip archive written by torch.save)")
    return text


@flag_type("a path")
def path(text):
    """A path to read or write: not empty, and not under an existing file."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    parent = os.path.dirname(os.path.abspath(text))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"{text!r} lies under {parent!r}, which is a file")
    return text


@flag_type("a folder")
def folder(text):
    """A folder to read or write: a path, and not an existing file."""
    if os.path.isfile(path(text)):
        raise argparse.ArgumentTypeError(f"{text!r} is a file; expected a folder")
    return text


@flag_type("a file name")
def file_path(text):
    """A file to write: a path, and not an existing folder."""
    if os.path.isdir(path(text)) or text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; expected a file name")
    return text


@flag_type("auto, cpu, cuda or cuda:N")
def device(text):
    """A device this torch can use; resolve_device turns 'auto' into one."""
    kind, _, index = text.partition(":")
    if kind not in ("auto", "cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: CUDA is not available on this machine (use "
                                         "--device cpu)")
    if index and int(index) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} "
                                         "CUDA devices")
    return text


@flag_type("a Python name")
def name(text):
    if not text.replace(".", "_").isidentifier():
        raise argparse.ArgumentTypeError(f"expected a function name, got {text!r}")
    return text


SEED = integer(0, 2 ** 32 - 1)
STEPS_1000 = integer(1, 1000)  # DDIM steps: at most one per training timestep


def die(msg):
    """A clear one-line error for bad input, exit status 2, no traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def close_progress_bars():
    """End any open tqdm bar's line, so that a message after it starts on a line of its own."""
    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()


def entry_point(main):
    """Decorate a script's main: bad input raised anywhere below (safety.BadInput) ends in one line,
    exit 2; Ctrl-C in one line saying what was kept, exit 130 (the shell's code for SIGINT)."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except BadInput as e:
            close_progress_bars()
            die(str(e))
        except (Interrupted, KeyboardInterrupt) as e:
            close_progress_bars()
            print(f"interrupted {e}" if isinstance(e, Interrupted)
                  else "interrupted (Ctrl-C); the files written whole are kept, and running again "
                       "continues from them", file=sys.stderr)
            sys.exit(130)
    return run


def given_flags(parser, argv):
    """The dests of the flags written on the command line (not left at their defaults)."""
    argv = sys.argv[1:] if argv is None else argv
    return {a.dest for a in parser._actions
            if any(arg == opt or arg.startswith(opt + "=") for opt in a.option_strings
                   for arg in argv)}


def resume_flags(args, given, path, kind, keys, changeable=()):
    """--resume continues the run in `path`, so the flags in `keys` (those that shape the model or
    its data) are the checkpoint's: one written on the command line with another value is refused in
    one line, one left at its default is taken from the checkpoint, and said. Flags in `changeable`
    (say, the number of steps) are the checkpoint's too unless written on the command line."""
    # checkpoint.py knows the models, which cli.py otherwise need not
    from checkpoint import load_checkpoint
    if not os.path.isfile(path):
        die(f"--resume: no checkpoint at {path} (--out {args.out})")
    stored = load_checkpoint(path, kind, "--resume").get("args") or {}
    taken = []
    for key in (*keys, *changeable):
        if (key not in stored or stored[key] == getattr(args, key)
                or key in changeable and key in given):
            continue
        flag = "--" + key.replace("_", "-")
        if key in given:
            die(f"--resume: {path} was trained with {flag} {stored[key]}, not "
                f"{getattr(args, key)}; leave {flag} out to continue it, or choose another --out "
                "for a new run")
        setattr(args, key, stored[key])
        taken.append(f"{flag} {stored[key]}")
    if taken:
        print(f"resuming {path} with its own {', '.join(taken)}")


def refuse_overwrite(out, kind):
    """A run without --resume never overwrites the checkpoint a run before it kept."""
    from checkpoint import load_checkpoint  # as in resume_flags
    path = os.path.join(out, "ckpt.pt")
    if not os.path.isfile(path):
        return
    if "opt" not in load_checkpoint(path, kind, "--out"):
        die(f"--out {out} holds a copy of the shipped {kind} ({path}); delete {out}, or choose "
            "another --out, to train one anew")
    again = ("continues it (a finished one is only scored again)" if kind == "refiner"
             else "continues it")
    die(f"--out {out} already holds a {kind} ({path}): --resume {again}; delete it, or choose "
        "another --out, to train anew")


def make_out_dir(path):
    """Create --out and lock it for this process (safety.lock_folder)."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        die(f"--out {path}: cannot create the output folder ({e.strerror})")
    lock_folder(path)


def resolve_device(name):
    """--device as torch names it. On CUDA, every script lets fp32 matmuls use TF32 (what bf16
    autocast leaves in fp32), so a number does not depend on which script, or which step of one, ran
    first."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            die(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return name


def warn_if_cpu_busy(device):
    """One line when other work keeps the CPU busy: two torch jobs on the same cores each run many
    times slower (their threads wait for each other), unless each is given OMP_NUM_THREADS=1."""
    if device != "cpu" or torch.get_num_threads() == 1 or not hasattr(os, "getloadavg"):
        return
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores - 0.5:
        print(f"note: the CPU is busy (load {load:.1f} on {cores} cores); beside another torch job "
              "this one runs many times slower: wait for it, or run each with OMP_NUM_THREADS=1")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def print_table(header, rows):
    """Print rows of already formatted cells under a header: the first column left-aligned, the
    others right-aligned, each as wide as its widest cell."""
    cells = [[str(c) for c in header], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths))))
