"""Models by preset name, checkpoints as plain dicts written atomically, and loading them safely.

A checkpoint is a dict of state dicts plus `args`, `config`, `step` and `format`; the model is rebuilt
from `config` alone. Files are written to a temporary name and renamed, so a killed run never leaves
a half-written checkpoint, and read with torch.load(weights_only=True), so a file cannot run code.
"""
import atexit
import dataclasses
import hashlib
import os
import sys

import torch

import dit
import unet
from noiserefine import Refiner

FORMAT = 1  # bump when the checkpoint layout changes


def die(msg):
    """A clear one-line error for bad input, exit status 2, no traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------

PRESET_NAMES = sorted(dit.PRESETS) + sorted(unet.PRESETS)


def model_config(preset, num_classes, image_size=None):
    """The config dict of a preset, with the data set's class count and (optionally) image size."""
    if preset in dit.PRESETS:
        cfg = dit.DiTConfig(**dit.PRESETS[preset])
    elif preset in unet.PRESETS:
        cfg = unet.UNetConfig(**unet.PRESETS[preset])
    else:
        raise ValueError(f"--model {preset!r} is not one of {', '.join(PRESET_NAMES)}")
    cfg.num_classes = num_classes
    if image_size is not None:
        cfg.image_size = image_size
    return dataclasses.asdict(cfg)


def build_model(config):
    """Rebuild a DiT or UNet from the config dict a checkpoint stores."""
    if config["arch"] == "dit":
        return dit.DiT(dit.DiTConfig(**config))
    cfg = dict(config, mult=tuple(config["mult"]), attn_res=tuple(config["attn_res"]))
    return unet.UNet(unet.UNetConfig(**cfg))


def fingerprint(model):
    """A short hash of a model's weights, so a refiner can name the exact teacher it belongs to."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def make_out_dir(path):
    """Create --out and lock it for this process: a second run into the same folder is refused, not
    interleaved. A lock left behind by a killed run (its process is gone) is taken over."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        die(f"--out {path}: cannot create the output folder ({e.strerror})")
    lock = os.path.join(path, ".lock")
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid = lock_owner(lock)
            if pid == os.getpid():
                return
            if pid is not None and process_alive(pid):
                die(f"--out {path}: another run (pid {pid}) is writing there; wait for it or choose another --out")
            os.remove(lock)  # stale: its run was killed
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        atexit.register(lambda: lock_owner(lock) == os.getpid() and os.remove(lock))
        return


def lock_owner(lock):
    try:
        return int(open(lock).read())
    except (OSError, ValueError):
        return None


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save_atomic(obj, path):
    """torch.save to path.tmp, then rename: readers see the old file or the new one, never half of one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, kind, flag="--teacher"):
    """Load a checkpoint dict written by this repository; `kind` is 'teacher', 'refiner' or 'classifier'."""
    if not os.path.isfile(path):
        die(f"{flag} {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a checkpoint, or a pickle that wants to run code
        die(f"{flag} {path}: not a readable {kind} checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        found = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
        die(f"{flag} {path}: expected a {kind} checkpoint, found {found!r}")
    if ckpt.get("format") != FORMAT:
        die(f"{flag} {path}: checkpoint format {ckpt.get('format')} but this code reads format {FORMAT}")
    return ckpt


def load_teacher(path, device="cpu", flag="--teacher"):
    """(EMA teacher in eval mode with frozen weights, checkpoint dict)."""
    ckpt = load_checkpoint(path, "teacher", flag)
    model = build_model(ckpt["config"])
    model.load_state_dict(ckpt["ema"])
    model.requires_grad_(False)
    return model.to(device).eval(), ckpt


def load_refiner_ckpt(path, teacher_fp, flag="--refiner"):
    ckpt = load_checkpoint(path, "refiner", flag)
    if ckpt["teacher_fingerprint"] != teacher_fp:
        die(f"{flag} {path} was trained on teacher {ckpt['teacher_fingerprint']}, but this teacher is "
            f"{teacher_fp}; pass the teacher it was trained on (--teacher)")
    return ckpt


def load_refiner(path, teacher, device="cpu", flag="--refiner"):
    """A trained refiner (best validation weights, LoRA merged) for the given teacher."""
    ckpt = load_refiner_ckpt(path, fingerprint(teacher), flag)
    refiner = Refiner(teacher, ckpt["rank"], ckpt["alpha"])
    unexpected = refiner.load_state_dict(ckpt["best"], strict=False).unexpected_keys
    if unexpected:
        die(f"{flag} {path}: weights do not fit this teacher ({unexpected[0]} ...)")
    return refiner.merge().to(device).eval()


def resolve_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        die(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return name


def seed_everything(seed):
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
