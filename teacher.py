"""Training a class-conditional teacher eps_theta(x_t, t, c) with condition dropout, so that CFG works.

The loop behind train_teacher.py (and behind train_refiner.py when the default teacher is missing):
warm-up and cosine learning rate, EMA weights for sampling, a checkpoint and a sample grid every so often,
exact resume, and DDP under torchrun (every process draws the same global batch and computes its share).
"""
import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time

import torch
from tqdm import tqdm

import data
import distributed
import noises
from accel import autocast, to_channels_last
from checkpoint import FORMAT, fingerprint, load_checkpoint, load_teacher, save_atomic
from cli import make_out_dir, seed_everything
from diffusion import CFG, STEPS, Guidance, sample, training_loss
from models import build_model, model_config
from pairs import DISPLAY_W, INTERVAL
from safety import BadInput, kept_checkpoint, on_interrupt


DEFAULT_TEACHER = "runs/teacher/ckpt.pt"
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "teachers")  # the embedded set's, trained here


@dataclasses.dataclass
class TeacherSettings:
    """The teacher's training settings (train_teacher.py's flags default to these: the CPU default)."""
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
    min_snr: float = 0.0    # > 0: Min-SNR-gamma loss weighting (diffusion.training_loss); 0: plain eps loss
    ema: float = 0.999
    hflip: bool = False     # random horizontal flips of the training images (natural photos only)
    amp: str = "none"       # "bf16": autocast the forward (accel.py)
    grid_every: int = 2500  # one grid, at the end: each costs the CPU default about 5 s (docs/speed.md)
    grid_w: float = DISPLAY_W
    save_every: int = 500
    weak_step: int = 1000   # this step's checkpoint is also kept, as autoguidance's weak model (weak_path)
    seed: int = 0


# Named training recipes: train_teacher.py --recipe NAME takes its defaults from one (flags still override).
# Each value is the source's, except where a comment says otherwise; see docs/gpu.md for the wall times.
RECIPES = {
    "cpu": {},  # TeacherSettings' defaults: unet-tiny on the embedded shapes, tuned here on a 2-core CPU
    # DDPM on CIFAR-10 (Ho et al. 2020, arXiv 2006.11239, App. B): the 35.7M UNet with dropout 0.1 (our
    # unet-cifar preset), Adam lr 2e-4 after 5,000 warm-up steps, then constant; batch 128, 800k steps
    # (102M images seen), gradient clipping at 1, EMA 0.9999, random horizontal flips. DDPM is unconditional:
    # the label and its 10% dropout for CFG are Ho & Salimans' (arXiv 2207.12598), who drop 10-20%.
    "ddpm-cifar10": dict(dataset="cifar10", model="unet-cifar", batch_size=128, lr=2e-4, warmup=5000,
                         lr_decay="none", steps=800_000, ema=0.9999, hflip=True, cond_drop=0.1,
                         save_every=5000, grid_every=50_000),
    # DiT (Peebles & Xie 2023, arXiv 2212.09748, §4 "Training"): AdamW, constant lr 1e-4, no weight decay,
    # no warm-up, batch 256, EMA 0.9999, horizontal flips only, class dropout 0.1; 400k steps is the budget
    # of their model comparisons (102M images seen). Our dit-cifar preset is their DiT-S/2 on 32 px pixels
    # (they train on 32 x 32 latents of 256 px ImageNet).
    "dit-cifar10": dict(dataset="cifar10", model="dit-cifar", batch_size=256, lr=1e-4, warmup=0, lr_decay="none",
                        steps=400_000, ema=0.9999, hflip=True, cond_drop=0.1, save_every=5000, grid_every=50_000),
}


def lr_at(step, s):
    """Linear warm-up, then cosine decay to 10% of the peak (short CPU runs end on small steps), or constant
    (lr_decay "none": DDPM's and DiT's schedule)."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    if s.lr_decay == "none":
        return s.lr
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- ema + (1 - decay) (model - ema), every tensor in one call (the same numbers as a loop)."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


@torch.no_grad()
def write_grid(ema, classes, image_size, w, path, per_side=8, seed=0):
    """One row per class (at most 10): per_side unguided samples, then per_side CFG samples."""
    K = min(len(classes), 10)
    device = next(ema.parameters()).device
    gen = noises.generator("grid", seed)  # its own stream: no picture shows a training pair's x_T
    x_T = torch.randn(K * per_side, 3, image_size, image_size, generator=gen).to(device)
    y = torch.arange(K).repeat_interleave(per_side).to(device)
    unguided = sample(ema, x_T, y, STEPS, 0.0).view(K, per_side, 3, image_size, image_size)
    guided = sample(ema, x_T, y, STEPS, w).view(K, per_side, 3, image_size, image_size)
    data.save_grid(torch.cat([unguided, guided], 1).flatten(0, 1).cpu(), 2 * per_side, path,
                   header=[("unguided", per_side), (f"CFG w={w:g}", per_side)], row_names=classes[:K])


def setup(s, out, resume, device):
    """Fresh or resumed (model, ema, optimiser, generator, step, losses, config, data meta, training set).
    A resumed run takes its data set, folder and image size from the checkpoint."""
    path = os.path.join(out, "ckpt.pt")
    ckpt, meta = None, None
    if resume:
        if not os.path.isfile(path):
            raise BadInput(f"--resume: no checkpoint at {path} (--out {out})")
        ckpt = load_checkpoint(path, "teacher", flag="--resume")
        if "opt" not in ckpt:
            raise BadInput(f"--resume: {path} holds sampling weights only (a shipped teacher), nothing to resume; "
                           f"delete {out} to train a teacher anew")
        config, meta = ckpt["config"], ckpt["data"]
        s = dataclasses.replace(s, dataset=meta["dataset"], data_dir=data.resolve_dir(meta["data_dir"]),
                                image_size=meta["image_size"])
    train = data.load_dataset(s.dataset, s.data_dir, s.image_size, "train", s.download)
    if meta is None:
        try:
            config = model_config(s.model, len(train.classes), train.images.shape[-1])
            build_model(config)
        except ValueError as e:
            raise BadInput(str(e)) from None
        meta = {"dataset": s.dataset, "data_dir": data.portable_dir(s.data_dir), "image_size": train.images.shape[-1],
                "classes": train.classes}
    if s.batch_size > len(train):
        raise BadInput(f"--batch-size {s.batch_size} is larger than the data set ({len(train)} images)")
    model = build_model(config).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    # fused AdamW on CUDA (one kernel for all parameters); on the CPU the foreach form, which gives the same
    # weights as the per-tensor loop bit for bit and saves 4% of a step (docs/speed.md)
    fast = {"fused": True} if device.startswith("cuda") else {"foreach": True}
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.0, **fast)
    gen = torch.Generator().manual_seed(s.seed)
    step, losses = 0, []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        gen.set_state(ckpt["rng"]["gen"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        step, losses = ckpt["step"], ckpt.get("losses", [])
    return model, ema, opt, gen, step, losses, config, meta, train


def fit(s, out, device, resume=False, stop_at=None, compile=False, rank=0, world=1, flags=None, channels_last=False):
    """Train (or resume) the teacher of settings s into out/ckpt.pt, with a sample grid every s.grid_every
    steps. rank, world: this process under torchrun. flags: what the checkpoint records as the run's args.
    compile, channels_last: speed only (accel.py); the checkpoint is the same plain state dict."""
    if s.batch_size % world:
        raise BadInput(f"--batch-size {s.batch_size} must be divisible by the {world} processes")
    log = print if rank == 0 else (lambda *a, **k: None)
    seed_everything(s.seed)  # the same on every rank: same initial weights, same batches
    model, ema, opt, gen, step, losses, config, meta, train = setup(s, out, resume, device)
    log(f"model {config['arch']} with {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
        f"{len(train)} training images of {meta['image_size']}px, {len(meta['classes'])} classes"
        + (f"; {world} processes, {s.batch_size // world} images each per step" if world > 1 else ""))
    if channels_last:
        model, ema = to_channels_last(model), to_channels_last(ema)  # in place: the optimiser's tensors stay
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model  # averages gradients
    net = torch.compile(net) if compile else net
    mine = slice(rank * s.batch_size // world, (rank + 1) * s.batch_size // world)  # this rank's rows
    null_class = len(meta["classes"])
    last = min(s.steps, stop_at or s.steps)

    saved = step if resume else None  # the step of the checkpoint on disk
    kept = lambda: kept_checkpoint(saved, os.path.join(out, "ckpt.pt"), s.save_every)  # noqa: E731
    def save(path=None):  # None: out/ckpt.pt; a path: a copy kept beside it (the weak model)
        nonlocal saved
        if rank == 0:
            save_atomic({"kind": "teacher", "format": FORMAT, "config": config, "data": meta,
                         "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                         "step": step, "losses": losses, "args": flags or dataclasses.asdict(s),
                         "rng": {"gen": gen.get_state(), "torch": torch.get_rng_state()}},
                        path or os.path.join(out, "ckpt.pt"))
        if path is None:
            saved = step  # only once the file is whole

    bar = tqdm(range(step, last), initial=step, total=s.steps, desc="teacher", disable=rank > 0)
    start, first = time.perf_counter(), step
    with on_interrupt(lambda: f"at step {step}; {kept()}"):
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, s)
            x0, y = train.batch(torch.randint(len(train), (s.batch_size,), generator=gen))  # the global batch
            if s.hflip:
                x0 = torch.where(torch.rand(len(x0), 1, 1, 1, generator=gen) < 0.5, x0.flip(-1), x0)
            x0 = to_channels_last(x0.to(device)) if channels_last else x0.to(device)
            with autocast(device, s.amp):
                loss = training_loss(net, x0, y.to(device), null_class, s.cond_drop, gen, mine, s.min_snr)
            global_loss = distributed.mean_over_ranks(loss).item()  # the global batch's loss; every rank agrees
            if not math.isfinite(global_loss):
                raise BadInput(f"loss is {global_loss} at step {step}; {kept()}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            # the warm-up cap (1 + step) / (10 + step) is below 0.999 until step 8,990: on the 2,500-step CPU
            # default it governs throughout, an average over about the last ninth of the steps (docs/speed.md)
            update_ema(ema, model, min(s.ema, (1 + step) / (10 + step)))
            losses.append(global_loss)
            step += 1
            img_per_s = (step - first) * s.batch_size / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", img_s=f"{img_per_s:.0f}")
            if step % s.save_every == 0 or step == last:
                save()
            if step == s.weak_step:
                save(weak_path(os.path.join(out, "ckpt.pt"), step))
            if rank == 0 and (step % s.grid_every == 0 or step == s.steps):
                write_grid(ema.eval(), meta["classes"], meta["image_size"], s.grid_w,
                           os.path.join(out, f"samples_{step:06d}.png"), seed=s.seed)
    log(f"done: step {step}, checkpoint {os.path.join(out, 'ckpt.pt')}, {time.perf_counter() - start:.0f} s")
    distributed.barrier()  # no rank leaves before rank 0 has written the checkpoint


def weak_path(path, step):
    """Where the teacher at `path` keeps its checkpoint of step `step` (autoguidance's weak model)."""
    return os.path.join(os.path.dirname(path), f"ckpt_{step:06d}.pt")


def get_weak(path, device, step=None):
    """(weak model, its path): the teacher's own checkpoint of an early step (default: its weak_step), for
    autoguidance (Karras et al. 2024 guide a model with a less-trained version of itself). A teacher trained
    before such checkpoints were kept gets it by re-running its training to that step (rebuild_weak)."""
    ckpt = load_checkpoint(path, "teacher")
    step = step or ckpt["args"].get("weak_step") or TeacherSettings.weak_step
    if step >= ckpt["step"]:
        raise BadInput(f"autoguidance needs an earlier checkpoint of the teacher {path}, which trained "
                       f"{ckpt['step']} steps, but its weak step is {step}: train it with a smaller --weak-step")
    early = weak_path(path, step)
    if not os.path.isfile(early):
        rebuild_weak(ckpt, path, early, step, device)
    return load_teacher(early, device)[0], early


def rebuild_weak(ckpt, path, early, step, device):
    """Re-run the teacher's training from its stored settings to `step` and keep that checkpoint at `early`,
    but only if the re-run's losses equal the original's first `step` losses bit for bit: then it retraced
    the same run (a resume with another --steps, another device or several processes would not)."""
    if distributed.world_size() > 1:
        raise BadInput(f"{early} is missing: make it once in one process, with "
                       f"python -c \"import teacher; teacher.get_weak('{path}', 'cpu')\", then run torchrun again")
    fields = {f.name for f in dataclasses.fields(TeacherSettings)}
    s = TeacherSettings(**{k: v for k, v in ckpt["args"].items() if k in fields})
    s = dataclasses.replace(s, data_dir=data.resolve_dir(s.data_dir), save_every=step, grid_every=10 ** 9, weak_step=-1)
    print(f"no step-{step} checkpoint next to {path}: re-running its training to step {step}")
    scratch = early + ".run"
    fit(s, scratch, device, stop_at=step)
    rerun = load_checkpoint(os.path.join(scratch, "ckpt.pt"), "teacher")
    if rerun["losses"] != ckpt.get("losses", [])[:step]:
        shutil.rmtree(scratch)
        raise BadInput(f"re-running {path} to step {step} did not retrace its training (resumed with other "
                       "settings, or trained on another device or in several processes): retrain the teacher, "
                       "which keeps that step itself (--weak-step)")
    os.replace(os.path.join(scratch, "ckpt.pt"), early)
    shutil.rmtree(scratch)


def guidance(name, path, device, interval=INTERVAL):
    """(diffusion.Guidance, the weak model's fingerprint or None) of a guidance name of train_refiner.py:
    cfg and cfg+pag (CFG; the PAG scale rides beside w), autoguidance (with the teacher's early checkpoint),
    interval (CFG on (sigma_lo, sigma_hi])."""
    if name == "autoguidance":
        weak, _ = get_weak(path, device)
        return Guidance("autoguidance", weak=weak), fingerprint(weak)
    if name == "interval":
        return Guidance("interval", interval=tuple(interval)), None
    return CFG, None


def get_or_train(path, device, rank=0, world=1):
    """(teacher, checkpoint, path): the teacher at `path`; with path None, the default teacher: the shipped
    one (copied to DEFAULT_TEACHER), else trained with TeacherSettings' defaults (or finished, if a run was
    interrupted) first, by every torchrun process."""
    if path is None:
        path, settings = DEFAULT_TEACHER, TeacherSettings()
        if rank == 0:
            copy_shipped(settings)
        distributed.barrier()
        done = os.path.isfile(path) and load_checkpoint(path, "teacher")["step"] >= settings.steps
        distributed.barrier()  # every rank has read `done` before rank 0 writes
        if not done:
            out = os.path.dirname(path)
            if rank == 0:
                print(f"no finished teacher at {path}: training the default teacher first")
                make_out_dir(out)
            distributed.barrier()
            fit(settings, out, device, resume=os.path.isfile(path), rank=rank, world=world)
    model, ckpt = load_teacher(path, device)
    return model, ckpt, path


# The shipped teacher: the EMA weights of TeacherSettings' defaults, trained by this code on a 2-core CPU,
# as classifiers/ holds the filter and the judge, so that a first run starts where the paper does, from a
# pretrained model; beside it, its weak_step checkpoint (autoguidance's weak model). Its name is a hash of
# the settings: a changed recipe does not find it, and trains anew.
SLIM = ("kind", "format", "config", "data", "ema", "step", "losses")  # what sampling needs, and the losses


def shipped_path(s):
    key = hashlib.sha256(json.dumps(dataclasses.asdict(s), sort_keys=True).encode()).hexdigest()[:8]
    return os.path.join(SHIPPED, f"teacher-{s.dataset}-{s.model}-seed{s.seed}-{key}.pt")


def shipped_weak_path(s):
    return shipped_path(s).replace(".pt", f"-step{s.weak_step}.pt")


def copy_shipped(s):
    """Copy the shipped teacher of settings s (and its weak model) to DEFAULT_TEACHER if there is no teacher
    there yet. A copy of another recipe's shipped teacher is refused in one line, not used."""
    if os.path.isfile(DEFAULT_TEACHER):
        ckpt = load_checkpoint(DEFAULT_TEACHER, "teacher")
        if "opt" not in ckpt and ckpt["args"] != dataclasses.asdict(s):
            raise BadInput(f"{DEFAULT_TEACHER} is a copy of the shipped teacher of other settings than today's "
                           f"TeacherSettings; delete {os.path.dirname(DEFAULT_TEACHER)} to copy today's")
        return
    if not os.path.isfile(shipped_path(s)):
        return
    os.makedirs(os.path.dirname(DEFAULT_TEACHER), exist_ok=True)  # not locked: a copy is written whole or not
    for src, dst in ((shipped_weak_path(s), weak_path(DEFAULT_TEACHER, s.weak_step)),
                     (shipped_path(s), DEFAULT_TEACHER)):  # the teacher last: its presence means both are there
        save_atomic(load_checkpoint(src, "teacher", flag="shipped teacher"), dst)
    print(f"the default teacher: the shipped one ({os.path.relpath(shipped_path(s))}), copied to "
          f"{DEFAULT_TEACHER}; python train_teacher.py trains one anew")


def default_teacher():
    """DEFAULT_TEACHER, copied from the shipped teacher first if it is not there yet."""
    copy_shipped(TeacherSettings())
    return DEFAULT_TEACHER


def ship(path, s):
    """Write the shipped copy of the teacher at `path`, trained with settings s, and of its weak model: the
    EMA weights and what describes them (no optimiser: a shipped teacher samples, it does not resume)."""
    ckpt = load_checkpoint(path, "teacher")
    trained = {k: ckpt["args"].get(k) for k in dataclasses.asdict(s)}
    trained["data_dir"] = data.portable_dir(trained["data_dir"] or "")
    if trained != {**dataclasses.asdict(s), "data_dir": data.portable_dir(s.data_dir)} or ckpt["step"] != s.steps:
        raise BadInput(f"{path} was not trained with today's default settings {dataclasses.asdict(s)}")
    weak = load_checkpoint(weak_path(path, s.weak_step), "teacher")
    for c, dst in ((weak, shipped_weak_path(s)), (ckpt, shipped_path(s))):
        save_atomic({**{k: c[k] for k in SLIM}, "args": dataclasses.asdict(s)}, dst)
    return shipped_path(s)


def check_shipped(device, out="runs/check-teacher"):
    """Train the default teacher anew into `out` (emptied first: always today's code) and compare its EMA
    weights with the shipped copy; where no copy has today's name, write one to commit. Exit status 1 if
    they differ: on the CPU and thread count that made it, the code changed; elsewhere the last bits may."""
    s = TeacherSettings()
    shutil.rmtree(out, ignore_errors=True)
    make_out_dir(out)
    fit(s, out, device)
    path = os.path.join(out, "ckpt.pt")
    if not os.path.isfile(shipped_path(s)):
        print(f"no shipped teacher under today's name; wrote {ship(path, s)} and its weak model: commit both, and "
              "remove the ones they replace")
        return
    mine, theirs = load_checkpoint(path, "teacher")["ema"], load_checkpoint(shipped_path(s), "teacher")["ema"]
    diff = max((mine[k].float() - v.float()).abs().max().item() for k, v in theirs.items())
    print(f"retrained here on {torch.get_num_threads()} thread(s): largest EMA weight difference from "
          f"{os.path.relpath(shipped_path(s))} {diff:.3g}" + (" (identical)" if diff == 0 else ""))
    if diff > 0:
        sys.exit("the shipped teacher differs from the one trained here (it was made on one thread: run "
                 "OMP_NUM_THREADS=1 python train_teacher.py --check-shipped to compare like with like)")
