"""Train the NoiseRefine refiner g_phi with the MSD loss, then compare regimes on held-out noises.

    python train_refiner.py        # the whole job on the embedded set: pairs, refiner, table
    python train_refiner.py --quick    # a quick look: fewer pairs, a shorter refiner, 200 noises
    torchrun --standalone --nproc_per_node=4 train_refiner.py --device cuda ...
                                   # pairs made by 4 GPUs

1. Teacher: --teacher CKPT, or (default) runs/teacher/ckpt.pt, a copy of the teacher shipped in
   teachers/ (teacher.py); train_teacher.py trains one anew.
2. Guided pairs (x_T, c, x0_guide): N' guided DDIM steps from Gaussian x_T, a guidance scale drawn
   per pair from --w-range; the guidance is --guidance: CFG (the default), CFG + PAG, autoguidance
   (the teacher guided by its own early checkpoint) or CFG on a noise-level interval; cached in
   shards next to the teacher (pairs.py). Under torchrun each process makes its share of the shards;
   the refiner then trains on rank 0 alone. --filter keeps pairs whose x0_guide the filter
   classifier assigns to its label with at least that confidence (the paper's aesthetic filter).
3. Refiner: a copy of the teacher, fine-tuned whole or with LoRA (--lora-rank), trained with L_MSD
   over --msd-steps unguided DDIM steps; the weights of the best validation loss are kept
   (noiserefine.fit).
4. Evaluation on the test bank of held-out noises (never a training x_T), scored by the judge, a
   classifier that is not the filter: unguided, Gaussian noise with the pairs' guidance,
   refined-unguided, with 95% bootstrap intervals; metrics.json and a PNG grid with the regimes side
   by side.
"""
import importlib
import os
import time

import torch

import accel
import distributed
import noises
import pairs
import teacher as teachers
from checkpoint import fingerprint, save_atomic, save_json
import cli
from cli import die, entry_point, make_out_dir, resolve_device, seed_everything
from data import save_grid
from diffusion import GUIDANCES, INTERVAL, STEPS
from metrics import (judge_line, load_filter, load_judge, print_difference, print_regimes,
                      run_regimes)
from noiserefine import Refiner, RefinerSettings, fit, lora_layers
from timing import ratio, ratio_text


def build_parser():
    r, s = RefinerSettings(), pairs.PairSettings()  # the defaults, in one place
    ranges = {name: g["w_range"] for name, g in GUIDANCES.items()}
    p = cli.Parser(__doc__)
    p.add_argument("--teacher", type=cli.checkpoint_file, default=None, help="teacher checkpoint "
                   f"(default: {teachers.DEFAULT_TEACHER}: a copy of the shipped teacher, or the "
                   "one python train_teacher.py wrote there)")
    p.add_argument("--pairs", type=cli.integer(1, 10 ** 8), default=s.count, help="guided pairs "
                   "to generate (before filtering)")
    p.add_argument("--pairs-dir", type=cli.folder, default=None, help="pair cache (default: next "
                   "to the teacher, named by its settings)")
    p.add_argument("--guide-steps", type=cli.STEPS_1000, default=s.guide_steps, help="N': guided "
                   "DDIM steps that make x0_guide")
    p.add_argument("--guidance", default="cfg", choices=list(GUIDANCES), help="the guidance that "
                   "makes x0_guide: cfg (the paper's), cfg+pag (PAG scale --pag, default "
                   f"{GUIDANCES['cfg+pag']['pag']:g}), autoguidance (the teacher's "
                   f"step-{teachers.TeacherSettings.weak_step} checkpoint as the weak model), "
                   "interval (CFG where sigma_t is in --interval)")
    p.add_argument("--w", type=cli.number(0, 100), default=None, help="one guidance scale for "
                   "every pair (overrides --w-range)")
    p.add_argument("--w-range", type=cli.number(0, 100), nargs=2, default=None, help="guidance "
                   f"scale drawn per pair, low high (default: the --guidance's, {ranges})")
    p.add_argument("--pag", type=cli.number(0, 100), default=None, help="PAG scale added to the "
                   f"pairs' guidance (default: {GUIDANCES['cfg+pag']['pag']:g} with --guidance "
                   "cfg+pag, else 0)")
    p.add_argument("--interval", type=cli.number(0, 1e6), nargs=2, default=list(INTERVAL),
                   help="(sigma_lo, sigma_hi] of --guidance interval")
    p.add_argument("--filter", type=cli.number(0, 1, hi_open=True), default=pairs.FILTER,
                   help="min confidence of the filter classifier in a kept pair (0: off)")
    p.add_argument("--val-frac", type=cli.number(0, 1, lo_open=True, hi_open=True),
                   default=pairs.VAL_FRAC, help="share of kept pairs held out for validation")
    p.add_argument("--msd-steps", type=cli.STEPS_1000, default=r.msd_steps, help="N: unguided "
                   "DDIM steps inside the MSD loss")
    p.add_argument("--lora-rank", type=cli.integer(0, 4096), default=0, help="LoRA rank (the "
                   "paper's choice; 8 was measured, docs/teacher.md); 0 fine-tunes the whole copy, "
                   "which did better on the 0.67M-parameter default teacher")
    p.add_argument("--lora-alpha", type=cli.number(0, 1e6, lo_open=True), default=None,
                   help="LoRA alpha (default: the rank)")
    p.add_argument("--lr", type=cli.number(0, 1, lo_open=True), default=r.lr,
                   help="peak AdamW learning rate")
    p.add_argument("--adam-eps", type=cli.number(0, 1, lo_open=True), default=r.adam_eps,
                   help="AdamW's eps (noiserefine.fit says why it must stay small next to sqrt(v))")
    p.add_argument("--batch-size", type=cli.integer(1, 65536), default=r.batch_size,
                   help="refiner batch")
    p.add_argument("--steps", type=cli.integer(1), default=r.steps, help="refiner training steps")
    p.add_argument("--val-every", type=cli.integer(1), default=r.val_every, help="validate and "
                   "checkpoint every K steps")
    p.add_argument("--eval-n", type=cli.integer(8, 10 ** 7), default=1000, help="held-out noises "
                   "in the final table (precision and recall need a few per class)")
    p.add_argument("--eval-steps", type=cli.STEPS_1000, default=STEPS,
                   help="DDIM steps of the final table")
    p.add_argument("--fid", action="store_true", help="also Inception FID against the training "
                   "set, and of the refined samples against the guided samples (needs pytorch-fid; "
                   "fid.py)")
    p.add_argument("--bank", default="test", choices=noises.BANKS,
                   help="held-out noises of the final table: 'test' for reported results, "
                   "'dev' for choosing settings")
    p.add_argument("--out", type=cli.folder, default="runs/refiner", help="output folder (a kept "
                   "refiner there is not overwritten: --resume)")
    p.add_argument("--resume", action="store_true", help="continue from --out/ckpt.pt; a finished "
                   "refiner is only scored again")
    p.add_argument("--stop-at", type=cli.integer(1), default=None, help="stop after this step as "
                   "if interrupted (tests)")
    p.add_argument("--seed", type=cli.SEED, default=0,
                   help="seeds the pairs, the refiner's batches and its LoRA")
    p.add_argument("--quick", action="store_true", help="a quick look at the method on the "
                   "default teacher: unless given, "
                   + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items())
                   + " (a short refiner: its table shows refined noise moving towards CFG, not "
                   "reaching it)")
    # the pairs' guided steps and the refiner's training; the final table stays fp32
    accel.add_flags(p, amp=True)
    p.add_argument("--device", type=cli.device, default="auto", help="auto, cpu, cuda, cuda:1, ...")
    return p


# what --resume takes from the checkpoint: the refiner's shape, its pairs and their split
RESUME_KEYS = ("lora_rank", "lora_alpha", "pairs", "guide_steps", "guidance", "w_range", "pag",
               "interval", "filter", "val_frac", "seed", "amp", "msd_steps", "batch_size")


# --quick: the default teacher (shipped), fewer pairs, a shorter refiner, a smaller table
QUICK = {"pairs": 2000, "steps": 200, "val_every": 100, "eval_n": 200, "out": "runs/quick/refiner"}


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    given = cli.given_flags(p, argv)
    if args.quick:
        for key, value in QUICK.items():
            if key not in given:
                setattr(args, key, value)
    if args.w is not None:
        args.w_range = [args.w, args.w]
        given.add("w_range")
    default = pairs.for_guidance(args.guidance)  # the guidance's own scale range and PAG scale
    if args.w_range is None:
        args.w_range = list(default.w_range)
    if args.pag is None:
        args.pag = default.pag
    if args.guidance == "autoguidance" and args.pag:
        die("--pag goes with --guidance cfg, cfg+pag or interval, not autoguidance")
    if args.w_range[0] > args.w_range[1]:
        die(f"--w-range must be low high, got {args.w_range[0]:g} {args.w_range[1]:g}")
    if args.interval[0] >= args.interval[1]:
        die(f"--interval must be sigma_lo sigma_hi with lo < hi, got {args.interval[0]:g} "
            f"{args.interval[1]:g}")
    if args.resume:
        cli.resume_flags(args, given, os.path.join(args.out, "ckpt.pt"), "refiner", RESUME_KEYS)
    else:
        cli.refuse_overwrite(args.out, "refiner")
    return args


def pair_settings(args):
    return pairs.for_guidance(args.guidance, count=args.pairs, guide_steps=args.guide_steps,
                              w_range=tuple(args.w_range), pag=args.pag,
                              interval=tuple(args.interval), seed=args.seed, amp=args.amp)


def settings(args):
    return RefinerSettings(args.steps, args.batch_size, args.lr, args.adam_eps, args.msd_steps,
                           args.val_every, args.seed, args.amp)


@entry_point
def main(argv=None):
    """The paper's four stages, each one call."""
    args = parse_args(argv)
    start = time.perf_counter()
    rank, world, device, inception = set_up(args)
    # 1. the pretrained teacher
    teacher, ckpt = get_teacher(args, device, rank)
    # 2. guided pairs (x_T, c, x0_guide)
    made = make_pairs(teacher, ckpt, args, device, rank, world)
    # another torchrun process: its share of the pairs is made, rank 0 goes on alone
    if made is None:
        return
    train_pairs, val, pair_filter, guidance = made
    # 3. g_phi, trained with L_MSD
    refiner = train(teacher, train_pairs, val, args, device)
    if refiner is not None:
        # 4. the table
        report(teacher, refiner, ckpt, pair_filter, guidance, inception, args, device)
        print(f"total {time.perf_counter() - start:.0f} s")


def set_up(args):
    """(rank, world, device, Inception or None): the device and torchrun's processes, the seed, the
    locked output folder, and --fid's network (loaded first: a missing package fails here, not at
    the end)."""
    rank, world, device = distributed.init(resolve_device(args.device))
    if rank == 0:
        print(f"train_refiner: {vars(args)}")
        cli.warn_if_cpu_busy(device)
        make_out_dir(args.out)
    seed_everything(args.seed)
    # Inception only when asked for
    fid = importlib.import_module("fid") if args.fid and rank == 0 else None
    return rank, world, device, fid and fid.inception(device)


def get_teacher(args, device, rank):
    """Stage 1: --teacher, or the default teacher (a copy of the one shipped in teachers/)."""
    teacher, ckpt, args.teacher = teachers.pretrained(args.teacher, device, rank)
    return teacher, ckpt


def make_pairs(teacher, ckpt, args, device, rank, world):
    """Stage 2: every torchrun process makes its share of the guided pairs (cached next to the
    teacher); then, on rank 0 alone, (training pairs, validation pairs, the filter, the guidance).
    None elsewhere."""
    ds = ckpt["data"]
    K, size = len(ds["classes"]), ds["image_size"]
    # rank 0 trains and caches the filter if it is missing; the other ranks then read it
    pair_filter = distributed.main_first(
        lambda: load_filter(ds["dataset"], ds["data_dir"], size, device))
    settings = pair_settings(args)
    guidance, weak_fp = teachers.guidance(args.guidance, args.teacher, device, args.interval)
    folder = args.pairs_dir or pairs.cache_dir(settings, args.teacher, fingerprint(teacher),
                                               weak_fp)
    if rank == 0:
        print(f"guided pairs ({args.guidance}): {folder}")
    pairs.make_pairs(teacher, pair_filter, settings, folder, K, size, rank, world, guidance)
    distributed.finish()  # the rest runs in one process
    if rank > 0:
        return None
    kept = pairs.read_pairs(settings, folder, pair_filter)
    return (*pairs.split_pairs(kept, args.filter, args.val_frac, args.batch_size), pair_filter,
            guidance)


def train(teacher, train_pairs, val, args, device):
    """Stage 3: the refiner, a copy of the teacher (whole, or LoRA), trained with L_MSD; the weights
    of its best validation step, LoRA merged. None when --stop-at stopped it early."""
    # the same initialisation whether or not a classifier was just trained
    seed_everything(args.seed)
    refiner = Refiner(teacher, args.lora_rank, args.lora_alpha).to(device)
    n_train = sum(p.numel() for p in refiner.parameters() if p.requires_grad)
    how = (f"LoRA rank {args.lora_rank} on {len(lora_layers(refiner))} layers" if args.lora_rank
           else "full fine-tuning")
    print(f"refiner: {how}, {n_train / 1e6:.3f}M trainable parameters; "
          f"MSD over {args.msd_steps} steps")
    meta = {"teacher_fingerprint": fingerprint(teacher), "teacher": os.path.abspath(args.teacher),
            "args": vars(args)}
    refiner = fit(refiner, teacher, train_pairs, val, settings(args), device,
                  os.path.join(args.out, "ckpt.pt"), meta, args.resume, args.stop_at)
    if args.stop_at is not None and args.stop_at < args.steps:
        print(f"stopped at step {args.stop_at} (--stop-at); --resume continues")
        return None
    return refiner.merge()


def report(teacher, refiner, ckpt, pair_filter, guidance, inception, args, device):
    """Stage 4: the regimes on the held-out bank, scored by the judge: the table, refined's
    differences, the time ratio; metrics.json, what the judge saw (measured.pt) and the picture
    (regimes.png)."""
    ds = ckpt["data"]
    judge = load_judge(ds["dataset"], ds["data_dir"], ds["image_size"], device)
    rows, differences, speed, images, measured, y = evaluate_regimes(teacher, refiner, judge, args,
                                                                     len(ds["classes"]),
                                                                     ds["image_size"], guidance)
    print_regimes(rows, f"{args.eval_n} held-out noises ({args.bank} bank), {args.eval_steps} "
                        "DDIM steps; 95% bootstrap intervals over the noises\n"
                        f"{judge_line(judge, pair_filter)}")
    for name, diff in differences.items():
        print_difference(*name.split(" - "), diff)
    nfe = {r["name"]: r["nfe_per_image"] for r in rows}
    print(f"time per image, refined / {args.guidance}: {ratio_text(speed)} (fastest rounds "
          f"[range of the {speed['rounds']} interleaved rounds]; forwards {nfe['refined']:g} "
          f"against {nfe[args.guidance]:g})")
    fid_rows = fid_table(inception, images, ds, args.guidance)
    save_json({"regimes": rows, "differences": differences, "time_refined_over_guided": speed,
               "fid": fid_rows, "judge": judge.info(), "filter": pair_filter.info(),
               "bank": args.bank, "teacher": args.teacher, "args": vars(args)},
              os.path.join(args.out, "metrics.json"))
    # what the judge saw: a table can be re-scored from it
    save_atomic({name: {"feats": m.feats, "probs": m.probs, "labels": m.labels}
                 for name, m in measured.items()},
                os.path.join(args.out, "measured.pt"))
    titles = {r["name"]: f"{r['name']} w={r['w']:g}" if r["w"] else r["name"] for r in rows}
    write_regime_grid(images, y, ds["classes"], os.path.join(args.out, "regimes.png"), titles)
    print(f"wrote {args.out}/metrics.json, measured.pt and regimes.png "
          f"(columns: {', '.join(images)})")


def evaluate_regimes(teacher, refiner, judge, args, num_classes, image_size, guidance):
    """The regimes on the held-out bank, each scored by the judge; refined minus each other regime,
    with paired intervals (the regimes share their noises and labels); and refined's time per image
    over the guided regime's, from interleaved rounds (timing.ratio). Gaussian noise is guided with
    the pairs' own guidance (named after it: cfg, cfg+pag, autoguidance, interval)."""
    x_T, y = noises.bank(args.bank, args.eval_n, num_classes, (3, image_size, image_size))
    lo, hi = args.w_range
    guided = dict(guidance=guidance, pag=args.pag)
    regimes = {"unguided": {}, args.guidance: dict(w=(lo + hi) / 2, **guided)}
    if hi > lo:
        regimes[f"{args.guidance}_top"] = dict(w=hi, **guided)
    regimes["refined"] = dict(refiner=refiner)
    rows, images, measured, rounds = run_regimes(teacher, judge, x_T, y, regimes, args.eval_steps)
    differences = {f"refined - {name}": judge.difference(measured["refined"], measured[name])
                   for name in measured if name != "refined"}
    speed = {**ratio(rounds["refined"], rounds[args.guidance]), "rounds": len(rounds["refined"])}
    return list(rows.values()), differences, speed, images, measured, y


def write_regime_grid(images, y, classes, path, titles, per_class=6):
    """One row per class (at most 10), named, the regimes side by side on the same noises and
    labels, each under its title."""
    K = min(len(classes), 10)
    per_class = min(per_class, int(torch.bincount(y, minlength=K)[:K].min()))
    idx = torch.cat([torch.nonzero(y == k)[:per_class, 0] for k in range(K)])
    cols = [images[name][idx].view(K, per_class, *images[name].shape[1:]) for name in images]
    save_grid(torch.cat(cols, 1).flatten(0, 1), per_class * len(cols), path,
              header=[(titles[name], per_class) for name in images], row_names=classes[:K])


def fid_table(inception, images, ds, guidance):
    """--fid: Inception FID of each regime against the training set, and of refined against
    guided."""
    if inception is None:
        return None
    fid = importlib.import_module("fid")
    scorer = fid.FID(inception)
    rows = scorer.table(images, scorer.reference(ds["dataset"], ds["data_dir"], ds["image_size"]),
                        ("refined", guidance))
    fid.print_fid(rows)
    return rows


if __name__ == "__main__":
    main()
    distributed.finish()
