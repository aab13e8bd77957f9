"""Checkpoints as plain dicts, written atomically and read safely; nothing here knows the method.

A checkpoint is a dict of state dicts plus `args`, `config`, `step`, `kind` and `format`; a model
is rebuilt from `config` alone. Files are written to a temporary name and renamed
(safety.write_atomic), so a killed run never leaves a half-written checkpoint, and read with
torch.load(weights_only=True), so a file cannot run code.
"""
import contextlib
import hashlib
import json
import math
import os
import textwrap

import torch

from data import resolve_dir
from models import build_model
from safety import BadInput, Interrupted, write_atomic

FORMAT = 1  # bump when the checkpoint layout changes


def save_atomic(obj, path):
    """torch.save, whole or not at all."""
    write_atomic(path, lambda f: torch.save(obj, f))


def save_json(obj, path):
    write_atomic(path, lambda f: json.dump(obj, f, indent=2), mode="w")


def fingerprint(model):
    """A short hash of a model's weights, so a refiner (or a cached table) can name the exact
    network."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def load_checkpoint(path, kind, flag="--teacher"):
    """Load a checkpoint dict written by this repository; `kind` is 'teacher', 'refiner' or
    'classifier'."""
    if not os.path.isfile(path):
        raise BadInput(f"{flag} {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a checkpoint, or a pickle that wants to run code
        first = (str(e).splitlines() or [""])[0]
        # whole words, unless the first is too long
        why = textwrap.shorten(first, 120, placeholder=" ...")
        why = why if why != "..." else first[:117] + "..."
        raise BadInput(f"{flag} {path}: not a readable {kind} checkpoint "
                       f"({type(e).__name__}: {why})") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        found = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise BadInput(f"{flag} {path}: expected a {kind} checkpoint, found {found!r}")
    if ckpt.get("format") != FORMAT:
        raise BadInput(f"{flag} {path}: checkpoint format {ckpt.get('format')} "
                       f"but this code reads format {FORMAT}")
    return ckpt


def teacher_of(refiner_path, flag="--refiner"):
    """The teacher checkpoint a refiner was trained on (stored as an absolute path: found from any
    folder)."""
    path = load_checkpoint(refiner_path, "refiner", flag)["teacher"]
    if not os.path.isfile(path):
        raise BadInput(f"{flag} {refiner_path} was trained on the teacher {path}, "
                       "which is not there (moved?): name it with --teacher")
    return path


def load_teacher(path, device="cpu", flag="--teacher"):
    """(EMA teacher in eval mode with frozen weights, checkpoint dict)."""
    ckpt = load_checkpoint(path, "teacher", flag)
    if "data_dir" in ckpt.get("data", {}):
        # found from any working directory
        ckpt["data"]["data_dir"] = resolve_dir(ckpt["data"]["data_dir"])
    model = build_model(ckpt["config"])
    model.load_state_dict(ckpt["ema"])
    model.requires_grad_(False)
    return model.to(device).eval(), ckpt


class Keeper:
    """The checkpoint a training loop keeps: `save()` writes `state()` to `path` whole; a loop that
    stops early (Ctrl-C, a loss that is not finite) ends in one line saying which step's checkpoint
    is kept. Both training loops (noiserefine.fit, teacher_loop.fit) use it, so the loops hold only
    the method."""

    def __init__(self, path, every, state, step=None, write=True):
        # write: False off rank 0
        self.path, self.every, self.state, self.write = path, every, state, write
        self.saved = step  # the step of the checkpoint on disk (None: none yet)
        self.step = step or 0  # steps done: the loop moves it on after each step (Ctrl-C says it)

    def save(self, step, path=None):
        """Write the checkpoint of `step`; with `path`, a copy elsewhere that is not the kept
        one."""
        if self.write:
            save_atomic(self.state(), path or self.path)
        if path is None:
            self.saved = step  # only once the file is whole

    def kept(self):
        if self.saved is None:
            return f"no checkpoint was written yet (one every {self.every} steps)"
        return (f"the checkpoint of step {self.saved} is kept in {self.path}; "
                "--resume continues from it")

    def check(self, loss, step, what="loss"):
        """Stop in one line if the loss of `step` is not finite."""
        if not math.isfinite(loss):
            raise BadInput(f"{what} is {loss} at step {step}; {self.kept()}")

    @contextlib.contextmanager
    def on_interrupt(self):
        """Ctrl-C inside the block becomes Interrupted: at which step, and which checkpoint is
        kept."""
        try:
            yield
        except KeyboardInterrupt:
            raise Interrupted(f"at step {self.step}; {self.kept()}") from None
