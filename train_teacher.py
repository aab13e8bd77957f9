"""Train a class-conditional teacher eps_theta(x_t, t, c) with condition dropout, so CFG works.

    python train_teacher.py                      # the CPU default: unet-tiny on the embedded shapes
    python train_teacher.py --recipe ddpm-cifar10 --download --amp bf16 --channels-last --compile
    torchrun --standalone --nproc_per_node=4 train_teacher.py ...
                                                 # DDP: --batch-size is the global batch

Writes --out/ckpt.pt (atomically) and --out/samples_<step>.png: one row per class, unguided samples
on the left, CFG samples on the right; --resume continues exactly where it stopped. The loop is
teacher_loop.fit. The embedded set's default teacher also ships in teachers/ (what train_refiner.py
uses when no teacher is given); --check-shipped retrains it and compares.
"""
import argparse
import dataclasses
import os
import shutil
import sys

import torch

import accel
import cli
import data
import distributed
from checkpoint import load_checkpoint, save_atomic
from cli import entry_point, make_out_dir, resolve_device
from models import PRESET_NAMES
from safety import BadInput
from teacher import TeacherSettings, shipped_path, shipped_weak_path, weak_path
from teacher_loop import fit

# Named training recipes: train_teacher.py --recipe NAME takes its defaults from one (flags still
# override). Each value is the source's, except where a comment says otherwise; see docs/gpu.md for
# the wall times.
RECIPES = {
    # TeacherSettings' defaults: unet-tiny on the embedded shapes, tuned here on a 2-core CPU
    "cpu": {},
    # DDPM on CIFAR-10 (Ho et al. 2020, arXiv 2006.11239, App. B): the 35.7M UNet with dropout 0.1
    # (our unet-cifar preset), Adam lr 2e-4 after 5,000 warm-up steps, then constant; batch 128,
    # 800k steps (102M images seen), gradient clipping at 1, EMA 0.9999, random horizontal flips.
    # DDPM is unconditional: the label and its 10% dropout for CFG are Ho & Salimans'
    # (arXiv 2207.12598), who drop 10-20%.
    "ddpm-cifar10": dict(dataset="cifar10", model="unet-cifar", batch_size=128, lr=2e-4,
                         warmup=5000, lr_decay="none", steps=800_000, ema=0.9999, hflip=True,
                         cond_drop=0.1, save_every=5000, grid_every=50_000),
    # DiT (Peebles & Xie 2023, arXiv 2212.09748, §4 "Training"): AdamW, constant lr 1e-4, no weight
    # decay, no warm-up, batch 256, EMA 0.9999, horizontal flips only, class dropout 0.1; 400k steps
    # is the budget of their model comparisons (102M images seen). Our dit-cifar preset is their
    # DiT-S/2 on 32 px pixels (they train on 32 x 32 latents of 256 px ImageNet).
    "dit-cifar10": dict(dataset="cifar10", model="dit-cifar", batch_size=256, lr=1e-4, warmup=0,
                        lr_decay="none", steps=400_000, ema=0.9999, hflip=True, cond_drop=0.1,
                        save_every=5000, grid_every=50_000),
}


# what sampling needs, and the losses
SLIM = ("kind", "format", "config", "data", "ema", "step", "losses")


def ship(path, s):
    """Write the shipped copy of the teacher at `path`, trained with settings s, and of its weak
    model: the EMA weights and what describes them (no optimiser: a shipped teacher samples, it does
    not resume)."""
    ckpt = load_checkpoint(path, "teacher")
    trained = {k: ckpt["args"].get(k) for k in dataclasses.asdict(s)}
    trained["data_dir"] = data.portable_dir(trained["data_dir"] or "")
    if (trained != {**dataclasses.asdict(s), "data_dir": data.portable_dir(s.data_dir)}
            or ckpt["step"] != s.steps):
        raise BadInput(f"{path} was not trained with today's default settings "
                       f"{dataclasses.asdict(s)}")
    weak = load_checkpoint(weak_path(path, s.weak_step), "teacher")
    for c, dst in ((weak, shipped_weak_path(s)), (ckpt, shipped_path(s))):
        save_atomic({**{k: c[k] for k in SLIM}, "args": dataclasses.asdict(s)}, dst)
    return shipped_path(s)


def check_shipped(device, out="runs/check-teacher"):
    """Train the default teacher anew into `out` (emptied first: always today's code) and compare
    its EMA weights with the shipped copy; where no copy has today's name, write one to commit. Exit
    status 1 if they differ: on the CPU and thread count that made it, the code changed; elsewhere
    the last bits may."""
    s = TeacherSettings()
    shutil.rmtree(out, ignore_errors=True)
    make_out_dir(out)
    fit(s, out, device)
    path = os.path.join(out, "ckpt.pt")
    if not os.path.isfile(shipped_path(s)):
        print(f"no shipped teacher under today's name; wrote {ship(path, s)} and its weak model: "
              "commit both, and remove the ones they replace")
        return
    mine, theirs = (load_checkpoint(path, "teacher")["ema"],
                    load_checkpoint(shipped_path(s), "teacher")["ema"])
    diff = max((mine[k].float() - v.float()).abs().max().item() for k, v in theirs.items())
    print(f"retrained here on {torch.get_num_threads()} thread(s): largest EMA weight difference "
          f"from {os.path.relpath(shipped_path(s))} {diff:.3g}"
          + (" (identical)" if diff == 0 else ""))
    if diff > 0:
        sys.exit("the shipped teacher differs from the one trained here (it was made on one "
                 "thread: run OMP_NUM_THREADS=1 python train_teacher.py --check-shipped to compare "
                 "like with like)")


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------


def build_parser():
    d = TeacherSettings()  # the defaults, in one place
    p = cli.Parser(__doc__)
    p.add_argument("--recipe", default="cpu", choices=RECIPES, help="defaults from a published "
                   "recipe (RECIPES names each source); the flags below override them")
    p.add_argument("--dataset", default=d.dataset, choices=data.DATASETS, help="shapes: the "
                   "embedded set (no download); folder: --data-dir/<class>/<image>")
    p.add_argument("--data-dir", type=cli.folder, default=d.data_dir, help="where the data set "
                   "(and the classifiers' caches) live")
    p.add_argument("--download", action="store_true", help="cifar10: fetch the archive if missing")
    p.add_argument("--model", default=d.model, choices=PRESET_NAMES,
                   help="the network (models.py's presets)")
    p.add_argument("--image-size", type=cli.integer(8, 512), default=d.image_size,
                   help="None: the preset's size")
    p.add_argument("--batch-size", type=cli.integer(1, 65536), default=d.batch_size,
                   help="global batch (split over torchrun's processes)")
    p.add_argument("--lr", type=cli.number(0, 1, lo_open=True), default=d.lr,
                   help="peak AdamW learning rate")
    p.add_argument("--warmup", type=cli.integer(0), default=d.warmup,
                   help="linear warm-up steps, then --lr-decay")
    p.add_argument("--lr-decay", default=d.lr_decay, choices=["cosine", "none"],
                   help="after the warm-up: cosine to 10%% of --lr, or constant")
    p.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=d.hflip,
                   help="random horizontal flips (photos only)")
    p.add_argument("--steps", type=cli.integer(1), default=d.steps, help="total training steps")
    p.add_argument("--min-snr", type=cli.number(0, 1e6), default=d.min_snr,
                   help="Min-SNR-gamma loss weighting (Hang et al. 2023; they use 5); 0: the plain "
                   "eps loss")
    p.add_argument("--cond-drop", type=cli.number(0, 1, hi_open=True), default=d.cond_drop,
                   help="probability of the null label (for CFG)")
    p.add_argument("--ema", type=cli.number(0, 1, hi_open=True), default=d.ema,
                   help="EMA decay of the weights used for sampling")
    p.add_argument("--grid-every", type=cli.integer(1), default=d.grid_every,
                   help="write a sample grid every K steps")
    p.add_argument("--grid-w", type=cli.number(0, 100), default=d.grid_w,
                   help="CFG scale of the grid's right half")
    p.add_argument("--save-every", type=cli.integer(1), default=d.save_every,
                   help="write the checkpoint every K steps")
    p.add_argument("--weak-step", type=cli.integer(1), default=d.weak_step,
                   help="also keep this step's checkpoint, as autoguidance's weak model "
                   "(train_refiner.py --guidance autoguidance)")
    p.add_argument("--seed", type=cli.SEED, default=d.seed,
                   help="seeds the weights, the batches and the grid's noises")
    p.add_argument("--out", type=cli.folder, default="runs/teacher", help="output folder")
    p.add_argument("--resume", action="store_true", help="continue from --out/ckpt.pt")
    p.add_argument("--stop-at", type=cli.integer(1), default=None, help="stop after this step as "
                   "if interrupted (tests)")
    p.add_argument("--check-shipped", action="store_true", help="only train the default teacher "
                   "anew (into runs/check-teacher) and compare it with the shipped copy in "
                   "teachers/, or write a copy where none has today's name")
    accel.add_flags(p, amp=True, compile=True, channels_last=True)
    p.add_argument("--device", type=cli.device, default="auto", help="auto, cpu, cuda, cuda:1, ...")
    return p


# what --resume takes from the checkpoint, refusing another value on the command line: the data, the
# model and how it is trained; and what it takes unless given: how long, how often it saves and
# draws
RESUME_KEYS = ("recipe", "dataset", "model", "image_size", "batch_size", "lr", "warmup", "lr_decay",
               "hflip", "cond_drop", "min_snr", "ema", "amp", "seed")
RESUME_CHANGEABLE = ("steps", "save_every", "grid_every", "grid_w", "weak_step")


def parse_args(argv=None):
    p = build_parser()
    # --recipe first: it sets the defaults
    first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    first.error = cli.die  # one line, like the full parser
    first.add_argument("--recipe", default="cpu")
    recipe = first.parse_known_args(argv)[0].recipe
    if recipe in RECIPES:  # else parse_args below names the bad choice
        p.set_defaults(**RECIPES[recipe])
    args = p.parse_args(argv)
    if args.resume:
        cli.resume_flags(args, cli.given_flags(p, argv), os.path.join(args.out, "ckpt.pt"),
                         "teacher", RESUME_KEYS, RESUME_CHANGEABLE)
    elif not args.check_shipped:
        cli.refuse_overwrite(args.out, "teacher")
    return args


def settings_of(args):
    """The TeacherSettings the flags describe."""
    return TeacherSettings(**{f.name: getattr(args, f.name)
                              for f in dataclasses.fields(TeacherSettings)})


@entry_point
def main(argv=None):
    args = parse_args(argv)
    if args.check_shipped:
        return check_shipped(resolve_device(args.device))
    rank, world, device = distributed.init(resolve_device(args.device))
    if rank == 0:
        print(f"train_teacher: {vars(args)}")
        cli.warn_if_cpu_busy(device)
        make_out_dir(args.out)
    distributed.barrier()
    fit(settings_of(args), args.out, device, args.resume, args.stop_at, args.compile, rank, world,
        flags=vars(args), channels_last=args.channels_last)


if __name__ == "__main__":
    main()
    distributed.finish()
