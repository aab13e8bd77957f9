"""Sample from a teacher: Gaussian noise with or without CFG, or refined noise without guidance.

    python sample.py --teacher runs/teacher/ckpt.pt --w 3               # Gaussian noise + CFG
    python sample.py --refiner runs/refiner/ckpt.pt                     # refined noise, no guidance

Writes --out.png (one row per label) and --out.npz (uint8 images, labels, the x_T used).
"""
import argparse

import numpy as np
import torch

import data
import noises
from checkpoint import load_teacher
from cli import HelpFormatter, die, entry_point, resolve_device, seed_everything
from diffusion import SAMPLERS, STEPS, sample_many
from noiserefine import load_refiner
from safety import write_atomic


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--teacher", default="runs/teacher/ckpt.pt", help="teacher checkpoint")
    p.add_argument("--refiner", default=None, help="refiner checkpoint: sample from refined noise (w = 0)")
    p.add_argument("--w", type=float, default=0.0, help="CFG scale, eps_c + w (eps_c - eps_u); 0 = none")
    p.add_argument("--steps", type=int, default=STEPS, help="sampling steps")
    p.add_argument("--sampler", default="ddim", choices=list(SAMPLERS), help="ddim (the paper's), euler, dpm2m")
    p.add_argument("--labels", type=int, nargs="+", default=None, help="class ids (default: every class, up to 10)")
    p.add_argument("--per-label", type=int, default=8, help="samples per label")
    p.add_argument("--out", default="samples/sample", help="output path without extension")
    p.add_argument("--seed", type=int, default=0, help="seeds the noises x_T")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if args.w < 0 or args.steps < 1 or args.per_label < 1:
        die("--w must be >= 0, --steps and --per-label >= 1")
    if args.refiner and args.w != 0:
        die("--refiner samples without guidance; leave --w at 0")
    return args


@entry_point
def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    teacher, ckpt = load_teacher(args.teacher, device)
    K, size = len(ckpt["data"]["classes"]), ckpt["data"]["image_size"]
    labels = args.labels if args.labels is not None else list(range(min(K, 10)))
    if any(not 0 <= k < K for k in labels):
        die(f"--labels must lie in 0..{K - 1}")
    refiner = None
    if args.refiner:
        refiner = load_refiner(args.refiner, teacher, device)
    y = torch.tensor(labels).repeat_interleave(args.per_label)
    x_T = torch.randn((len(y), 3, size, size), generator=noises.generator("sample", args.seed))  # never a pair's
    images = sample_many(teacher, x_T, y, args.steps, args.w, refiner=refiner, desc="sampling", sampler=args.sampler)
    data.save_grid(images, args.per_label, args.out + ".png")
    write_atomic(args.out + ".npz", lambda f: np.savez(f, images=data.to_uint8(images).numpy(), labels=y.numpy(),
                                                        x_T=x_T.numpy()))
    regime = "refined noise, no guidance" if refiner else f"Gaussian noise, w = {args.w}"
    print(f"wrote {args.out}.png and {args.out}.npz: {len(y)} samples, {regime}, {args.steps} {args.sampler} steps")


if __name__ == "__main__":
    main()
