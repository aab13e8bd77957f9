"""The pretrained teacher eps_theta(x_t, t, c) a refiner starts from, as the paper's method does.

Its settings (TeacherSettings: what train_teacher.py trains by default), the copy of it that ships
in teachers/ (used when no teacher is given), its early checkpoint (autoguidance's weak model), and
the guidance a run names. The training loop itself is train_teacher.py's.
"""
import dataclasses
import hashlib
import json
import os

import distributed
from checkpoint import fingerprint, load_checkpoint, load_teacher, save_atomic
from diffusion import CFG, DISPLAY_W, INTERVAL, Guidance
from safety import BadInput


DEFAULT_TEACHER = "runs/teacher/ckpt.pt"
# the embedded set's, trained here
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "teachers")


@dataclasses.dataclass
class TeacherSettings:
    """The teacher's training settings (train_teacher.py's flags default to these: the CPU
    default)."""
    dataset: str = "shapes"
    data_dir: str = "data"
    download: bool = False
    model: str = "unet-tiny"
    image_size: int = None  # None: the preset's size
    batch_size: int = 128   # the global batch (split over torchrun's processes)
    lr: float = 2e-3
    warmup: int = 200
    lr_decay: str = "cosine"  # after the warm-up: "cosine" to 10% of lr, or "none" (constant)
    steps: int = 2500
    cond_drop: float = 0.1  # probability of the null label, so one network also gives eps_u
    min_snr: float = 0.0    # > 0: Min-SNR-gamma loss weighting (diffusion.training_loss);
                            # 0: plain eps loss
    ema: float = 0.999
    hflip: bool = False     # random horizontal flips of the training images (natural photos only)
    amp: str = "none"       # "bf16": autocast the forward (accel.py)
    grid_every: int = 2500  # one grid, at the end (each costs seconds on a CPU)
    grid_w: float = DISPLAY_W
    save_every: int = 500
    weak_step: int = 1000   # this step's checkpoint is also kept, as autoguidance's weak model
                            # (weak_path)
    seed: int = 0


def weak_path(path, step):
    """Where the teacher at `path` keeps its checkpoint of step `step` (autoguidance's weak
    model)."""
    return os.path.join(os.path.dirname(path), f"ckpt_{step:06d}.pt")


def get_weak(path, device, step=None):
    """(weak model, its path): the teacher's own checkpoint of an early step (default: its
    weak_step), for autoguidance (Karras et al. 2024 guide a model with a less-trained version of
    itself)."""
    ckpt = load_checkpoint(path, "teacher")
    step = step or ckpt["args"].get("weak_step") or TeacherSettings.weak_step
    early = weak_path(path, step)
    if step >= ckpt["step"] or not os.path.isfile(early):
        raise BadInput(f"autoguidance needs the teacher's step-{step} checkpoint {early}, "
                       f"which is not there: train the teacher with --weak-step {step} "
                       "(below its --steps), which keeps it")
    return load_teacher(early, device)[0], early


def guidance(name, path, device, interval=INTERVAL):
    """(diffusion.Guidance, the weak model's fingerprint or None) of a guidance name of
    train_refiner.py: cfg and cfg+pag (CFG; the PAG scale rides beside w), autoguidance (with the
    teacher's early checkpoint), interval (CFG on (sigma_lo, sigma_hi])."""
    if name == "autoguidance":
        weak, _ = get_weak(path, device)
        return Guidance("autoguidance", weak=weak), fingerprint(weak)
    if name == "interval":
        return Guidance("interval", interval=tuple(interval)), None
    return CFG, None


def pretrained(path, device, rank=0):
    """(teacher, checkpoint, path): the teacher at `path`; with path None, the default teacher: the
    shipped one, copied to DEFAULT_TEACHER (or one train_teacher.py trained there). rank:
    torchrun's."""
    if path is None:
        path, settings = DEFAULT_TEACHER, TeacherSettings()
        if rank == 0:
            copy_shipped(settings)
        distributed.barrier()
        if not os.path.isfile(path) or load_checkpoint(path, "teacher")["step"] < settings.steps:
            raise BadInput(f"no finished teacher at {path}, and none ships for today's "
                           "TeacherSettings: train it first with python train_teacher.py "
                           "(--resume finishes an interrupted one)")
    model, ckpt = load_teacher(path, device)
    return model, ckpt, path


# The shipped teacher: the EMA weights of TeacherSettings' defaults, trained by this code on a
# 2-core CPU (as classifiers/ holds the filter and the judge), and beside it its weak_step
# checkpoint. Its name is a hash of the settings: a changed recipe does not find it.
def shipped_path(s):
    key = hashlib.sha256(json.dumps(dataclasses.asdict(s), sort_keys=True).encode()).hexdigest()[:8]
    return os.path.join(SHIPPED, f"teacher-{s.dataset}-{s.model}-seed{s.seed}-{key}.pt")


def shipped_weak_path(s):
    return shipped_path(s).replace(".pt", f"-step{s.weak_step}.pt")


def copy_shipped(s):
    """Copy the shipped teacher of settings s (and its weak model) to DEFAULT_TEACHER if there is no
    teacher there yet. A copy of another recipe's shipped teacher is refused in one line, not
    used."""
    if os.path.isfile(DEFAULT_TEACHER):
        ckpt = load_checkpoint(DEFAULT_TEACHER, "teacher")
        if "opt" not in ckpt and ckpt["args"] != dataclasses.asdict(s):
            raise BadInput(f"{DEFAULT_TEACHER} is a copy of the shipped teacher of other settings "
                           "than today's TeacherSettings; delete "
                           f"{os.path.dirname(DEFAULT_TEACHER)} to copy today's")
        return
    if not os.path.isfile(shipped_path(s)):
        return
    # not locked: a copy is written whole or not
    os.makedirs(os.path.dirname(DEFAULT_TEACHER), exist_ok=True)
    for src, dst in ((shipped_weak_path(s), weak_path(DEFAULT_TEACHER, s.weak_step)),
                     # the teacher last: its presence means both are there
                     (shipped_path(s), DEFAULT_TEACHER)):
        save_atomic(load_checkpoint(src, "teacher", flag="shipped teacher"), dst)
    print(f"the default teacher: the shipped one ({os.path.relpath(shipped_path(s))}), copied to "
          f"{DEFAULT_TEACHER}; python train_teacher.py trains one anew")


def default_teacher():
    """DEFAULT_TEACHER, copied from the shipped teacher first if it is not there yet."""
    copy_shipped(TeacherSettings())
    return DEFAULT_TEACHER


