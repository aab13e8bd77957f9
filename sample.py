"""Sample from a teacher: Gaussian noise with or without CFG, or refined noise without guidance.

    python sample.py --teacher runs/teacher/ckpt.pt --w 3               # Gaussian noise + CFG
    python sample.py --refiner runs/refiner/ckpt.pt                     # refined noise, no guidance

Writes --out.png (one row per label) and --out.npz: uint8 images, labels, the x_T drawn and the
x_hat_T sampled from (the same without --refiner), and w, steps, sampler, teacher and refiner.
"""
import os

import numpy as np
import torch

import cli
import data
import noises
from checkpoint import load_teacher, teacher_of
from cli import die, entry_point, resolve_device, seed_everything
from diffusion import SAMPLERS, STEPS, sample_many
from noiserefine import load_refiner, refine_many
from safety import write_atomic
from teacher import DEFAULT_TEACHER, default_teacher


def build_parser():
    p = cli.Parser(__doc__)
    p.add_argument("--teacher", type=cli.checkpoint_file, default=None,
                   help="teacher checkpoint (default: the one --refiner was trained on, else "
                        f"{DEFAULT_TEACHER})")
    p.add_argument("--refiner", type=cli.checkpoint_file, default=None,
                   help="refiner checkpoint: sample from refined noise (w = 0)")
    p.add_argument("--w", type=cli.number(0, 100), default=0.0,
                   help="CFG scale, eps_c + w (eps_c - eps_u); 0 = none")
    p.add_argument("--steps", type=cli.STEPS_1000, default=STEPS, help="sampling steps")
    p.add_argument("--sampler", default="ddim", choices=list(SAMPLERS),
                   help="ddim (the paper's), euler, dpm2m")
    p.add_argument("--labels", type=cli.integer(0, 10 ** 6), nargs="+", default=None,
                   help="class ids (default: every class, up to 10)")
    p.add_argument("--per-label", type=cli.integer(1, 10000), default=8, help="samples per label")
    p.add_argument("--out", type=cli.file_path, default="samples/sample",
                   help="output path, without extension (a .png or .npz given is dropped)")
    p.add_argument("--seed", type=cli.SEED, default=0, help="seeds the noises x_T")
    p.add_argument("--device", type=cli.device, default="auto", help="auto, cpu, cuda, cuda:1, ...")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    root, ext = os.path.splitext(args.out)
    # --out x/b.png writes x/b.png, not b.png.png
    args.out = root if ext.lower() in (".png", ".npz") else args.out
    if args.refiner and args.w != 0:
        die("--refiner samples without guidance; leave --w at 0")
    return args


@entry_point
def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    if args.teacher is None:  # a refiner names the teacher it was trained on
        args.teacher = teacher_of(args.refiner) if args.refiner else default_teacher()
    teacher, ckpt = load_teacher(args.teacher, device)
    K, size = len(ckpt["data"]["classes"]), ckpt["data"]["image_size"]
    labels = args.labels if args.labels is not None else list(range(min(K, 10)))
    if any(not 0 <= k < K for k in labels):
        die(f"--labels must lie in 0..{K - 1}")
    refiner = None
    if args.refiner:
        refiner = load_refiner(args.refiner, teacher, device)
    y = torch.tensor(labels).repeat_interleave(args.per_label)
    # never a pair's
    x_T = torch.randn((len(y), 3, size, size), generator=noises.generator("sample", args.seed))
    x_hat_T = refine_many(refiner, x_T, y) if refiner else x_T  # what the sampler starts from
    images = sample_many(teacher, x_hat_T, y, args.steps, args.w, desc="sampling",
                         sampler=args.sampler)
    regime = "refined noise, no guidance" if refiner else f"Gaussian noise, w = {args.w:g}"
    data.save_grid(images, args.per_label, args.out + ".png", header=[(regime, args.per_label)],
                   row_names=[ckpt["data"]["classes"][k] for k in labels])
    write_atomic(args.out + ".npz", lambda f: np.savez(
        f, images=data.to_uint8(images).numpy(), labels=y.numpy(), x_T=x_T.numpy(),
        x_hat_T=x_hat_T.numpy(), w=args.w, steps=args.steps, sampler=args.sampler,
        teacher=args.teacher, refiner=args.refiner or ""))
    print(f"wrote {args.out}.png and {args.out}.npz: {len(y)} samples, {regime}, {args.steps} "
          f"{args.sampler} steps")


if __name__ == "__main__":
    main()
