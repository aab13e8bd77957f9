"""The teacher's training loop: a class-conditional eps_theta(x_t, t, c) with condition dropout,
so that CFG works (train_teacher.py reads the flags and calls `fit`).

Warm-up and cosine learning rate, EMA weights for sampling, a checkpoint every so often through the
Keeper (exact resume, one line on Ctrl-C), a sample grid at the end, and DDP under torchrun (every
process draws the same global batch and computes its share).
"""
import copy
import dataclasses
import math
import os
import shutil
import time

import torch
from tqdm import tqdm

import data
import distributed
import noises
from accel import autocast, to_channels_last
from checkpoint import FORMAT, Keeper, load_checkpoint
from cli import seed_everything
from diffusion import STEPS, sample, training_loss
from models import build_model, model_config
from safety import BadInput
from teacher import TeacherSettings, weak_path


def lr_at(step, s):
    """Linear warm-up, then cosine decay to 10% of the peak (short CPU runs end on small steps), or
    constant (lr_decay "none": DDPM's and DiT's schedule)."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    if s.lr_decay == "none":
        return s.lr
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- ema + (1 - decay) (model - ema), every tensor in one call (the same numbers as a
    loop)."""
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
                   header=[("unguided", per_side), (f"CFG w={w:g}", per_side)],
                   row_names=classes[:K])


def setup(s, out, resume, device, rank=0, world=1):
    """Fresh or resumed (model, ema, optimiser, generator, step, losses, config, data meta, training
    set). A resumed run takes its data set, folder and image size from the checkpoint."""
    ckpt = kept_run(out) if resume else None
    if ckpt is not None:
        config, meta = ckpt["config"], ckpt["data"]
        s = dataclasses.replace(s, dataset=meta["dataset"],
                                data_dir=data.resolve_dir(meta["data_dir"]),
                                image_size=meta["image_size"])
    train = data.load_dataset(s.dataset, s.data_dir, s.image_size, "train", s.download)
    if ckpt is None:
        config, meta = new_run(s, train)
    if s.batch_size > len(train):
        raise BadInput(f"--batch-size {s.batch_size} is larger than the data set "
                       f"({len(train)} images)")
    model = build_model(config).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    # fused AdamW on CUDA (one kernel for all parameters); on the CPU the foreach form, which gives
    # the same weights as the per-tensor loop bit for bit and saves 4% of a step (docs/speed.md)
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
    if rank == 0:
        print(f"model {config['arch']} with "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
              f"{len(train)} training images of {meta['image_size']}px, "
              f"{len(meta['classes'])} classes"
              + (f"; {world} processes, {s.batch_size // world} images each per step"
                 if world > 1 else ""))
    return model, ema, opt, gen, step, losses, config, meta, train


def kept_run(out):
    """The checkpoint --resume continues: it must exist and hold an optimiser."""
    path = os.path.join(out, "ckpt.pt")
    if not os.path.isfile(path):
        raise BadInput(f"--resume: no checkpoint at {path} (--out {out})")
    ckpt = load_checkpoint(path, "teacher", flag="--resume")
    if "opt" not in ckpt:
        raise BadInput(f"--resume: {path} holds sampling weights only (a shipped teacher), "
                       f"nothing to resume; delete {out} to train a teacher anew")
    return ckpt


def new_run(s, train):
    """(model config, data meta) of a new teacher: a preset that cannot take this data set
    (an image size its patches or levels do not divide) stops in one line."""
    try:
        config = model_config(s.model, len(train.classes), train.images.shape[-1])
        build_model(config)
    except ValueError as e:
        raise BadInput(str(e)) from None
    return config, {"dataset": s.dataset, "data_dir": data.portable_dir(s.data_dir),
                    "image_size": train.images.shape[-1], "classes": train.classes}


def fit(s, out, device, resume=False, stop_at=None, compile=False, rank=0, world=1, flags=None,
        channels_last=False):
    """Train (or resume) the teacher of settings s into out/ckpt.pt, with a sample grid every
    s.grid_every steps. rank, world: this process under torchrun. flags: the run's args, as the
    checkpoint records them. compile, channels_last: speed only (accel.py)."""
    if s.batch_size % world:
        raise BadInput(f"--batch-size {s.batch_size} must be divisible by the {world} processes")
    seed_everything(s.seed)  # the same on every rank: same initial weights, same batches
    model, ema, opt, gen, step, losses, config, meta, train = setup(
        s, out, resume, device, rank, world)
    net = for_training(model, ema, world, compile, channels_last)
    # this rank's rows
    mine = slice(rank * s.batch_size // world, (rank + 1) * s.batch_size // world)
    path = os.path.join(out, "ckpt.pt")
    keeper = Keeper(path, s.save_every, lambda: {
        "kind": "teacher", "format": FORMAT, "config": config, "data": meta,
        "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
        "losses": losses, "args": flags or dataclasses.asdict(s),
        "rng": {"gen": gen.get_state(), "torch": torch.get_rng_state()}},
        step if resume else None, write=rank == 0)
    last = min(s.steps, stop_at or s.steps)
    bar = tqdm(range(step, last), initial=step, total=s.steps, desc="teacher", disable=rank > 0)
    start, first = time.perf_counter(), step
    with keeper.on_interrupt():
        for step in bar:
            batch = global_batch(train, s, gen, device, channels_last)
            losses.append(teacher_step(net, model, ema, opt, batch, step, s, gen, mine,
                                       len(meta["classes"]), device, keeper))
            step += 1
            keeper.step = step
            bar.set_postfix(
                loss=f"{losses[-1]:.4f}",
                img_s=f"{(step - first) * s.batch_size / (time.perf_counter() - start):.0f}")
            keep(keeper, step, last, s, rank, ema, meta, out)
    if rank == 0:
        print(f"done: step {step}, checkpoint {path}, {time.perf_counter() - start:.0f} s")
    distributed.barrier()  # no rank leaves before rank 0 has written the checkpoint


def teacher_step(net, model, ema, opt, batch, step, s, gen, mine, num_classes, device, keeper):
    """One optimiser step on the eps-prediction loss (diffusion.training_loss), then the EMA.
    Returns the global batch's loss (the same on every rank)."""
    for g in opt.param_groups:
        g["lr"] = lr_at(step, s)
    x0, y = batch
    with autocast(device, s.amp):
        loss = training_loss(net, x0, y, num_classes, s.cond_drop, gen, mine, s.min_snr)
    value = distributed.mean_over_ranks(loss).item()
    keeper.check(value, step)  # before the weights move
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    update_ema(ema, model, min(s.ema, (1 + step) / (10 + step)))  # warm-up cap: docs/speed.md
    return value


def keep(keeper, step, last, s, rank, ema, meta, out):
    """After `step` steps: the checkpoint, the weak model's copy (autoguidance) and the EMA's
    sample grid, each at its own steps."""
    if step % s.save_every == 0 or step == last:
        keeper.save(step)
    if step == s.weak_step:
        keeper.save(step, weak_path(keeper.path, step))
    if rank == 0 and (step % s.grid_every == 0 or step == s.steps):
        write_grid(ema.eval(), meta["classes"], meta["image_size"], s.grid_w,
                   os.path.join(out, f"samples_{step:06d}.png"), seed=s.seed)


def global_batch(train, s, gen, device, channels_last=False):
    """The step's global batch of (x0, y), the same on every rank, flipped at random where
    s.hflip."""
    x0, y = train.batch(torch.randint(len(train), (s.batch_size,), generator=gen))
    if s.hflip:
        x0 = torch.where(torch.rand(len(x0), 1, 1, 1, generator=gen) < 0.5, x0.flip(-1), x0)
    x0 = x0.to(device)
    return (to_channels_last(x0) if channels_last else x0), y.to(device)


def for_training(model, ema, world, compile, channels_last):
    """The network the loop calls (speed only: the checkpoint stays the plain state dict)."""
    if channels_last:  # in place: the optimiser's tensors stay
        to_channels_last(model)
        to_channels_last(ema)
    # averages gradients
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    return torch.compile(net) if compile else net


def rebuild_weak(path, step, device):
    """Give the teacher at `path` its checkpoint of `step` where it did not keep one: re-run its
    training from its stored settings to `step`, accepted only if the re-run's losses equal the
    original's first `step` losses bit for bit (then it retraced the same run; a resume with other
    settings, another device or several processes would not)."""
    early = weak_path(path, step)
    if os.path.isfile(early):
        return
    ckpt = load_checkpoint(path, "teacher")
    if step >= ckpt["step"]:
        raise BadInput(f"{path} trained {ckpt['step']} steps: it has no step {step} to re-run to")
    fields = {f.name for f in dataclasses.fields(TeacherSettings)}
    s = TeacherSettings(**{k: v for k, v in ckpt["args"].items() if k in fields})
    s = dataclasses.replace(s, data_dir=data.resolve_dir(s.data_dir), save_every=step,
                            grid_every=10 ** 9, weak_step=-1)
    print(f"no step-{step} checkpoint next to {path}: re-running its training to step {step}")
    scratch = early + ".run"
    fit(s, scratch, device, stop_at=step)
    rerun = load_checkpoint(os.path.join(scratch, "ckpt.pt"), "teacher")
    if rerun["losses"] != ckpt.get("losses", [])[:step]:
        shutil.rmtree(scratch)
        raise BadInput(f"re-running {path} to step {step} did not retrace its training (resumed "
                       "with other settings, or trained on another device or in several "
                       f"processes): retrain the teacher with --weak-step {step}")
    os.replace(os.path.join(scratch, "ckpt.pt"), early)
    shutil.rmtree(scratch)
