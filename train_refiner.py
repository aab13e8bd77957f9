"""Train the NoiseRefine refiner g_phi with the MSD loss, then compare regimes on held-out noises.

    python train_refiner.py        # the whole job on the embedded set: teacher, pairs, refiner, table
    torchrun --standalone --nproc_per_node=4 train_refiner.py --device cuda ...  # pairs made by 4 GPUs

1. Teacher: --teacher CKPT, or (default) runs/teacher/ckpt.pt, trained first if it is not there.
2. Guided pairs (x_T, c, x0_guide): N' guided DDIM steps from Gaussian x_T, a CFG scale drawn per pair
   from --w-range, optional PAG; cached in shards next to the teacher (written atomically, so an
   interrupted generation resumes from the last whole shard). Under torchrun each process makes its share
   of the shards; the refiner then trains on rank 0 alone. --filter keeps pairs whose x0_guide the
   filter classifier assigns to its label with at least that confidence (the paper's aesthetic filter).
3. Refiner: LoRA (or full fine-tuning, --lora-rank 0) on a copy of the teacher, trained with L_MSD over
   --msd-steps unguided DDIM steps; the checkpoint with the best validation loss is kept.
4. Evaluation on the test bank of held-out noises (never a training x_T), scored by the judge, a classifier
   that is not the filter: unguided, CFG, refined-unguided, with 95% bootstrap intervals; metrics.json and
   a PNG grid with the regimes side by side.
"""
import argparse
import hashlib
import json
import math
import os
import time

import torch
from tqdm import tqdm

import data
import distributed
import noises
import train_teacher
from checkpoint import (FORMAT, die, fingerprint, load_checkpoint, load_refiner_ckpt, load_teacher, make_out_dir,
                        resolve_device, save_atomic, seed_everything)
from diffusion import sample_many
from evaluate import (judge_line, load_filter, load_judge, print_difference, print_table, run_regime,
                      write_json)
from noiserefine import Refiner, lora_layers, msd_loss, prod_a

DEFAULT_TEACHER = "runs/teacher/ckpt.pt"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", default=None, help=f"teacher checkpoint (default: {DEFAULT_TEACHER}, "
                   "trained with train_teacher.py's defaults if missing)")
    p.add_argument("--pairs", type=int, default=10000, help="guided pairs to generate (before filtering)")
    p.add_argument("--pairs-dir", default=None, help="pair cache (default: next to the teacher)")
    p.add_argument("--guide-steps", type=int, default=20, help="N': guided DDIM steps that make x0_guide")
    p.add_argument("--w", type=float, default=None, help="one CFG scale for every pair (overrides --w-range)")
    p.add_argument("--w-range", type=float, nargs=2, default=[2.0, 4.0], help="CFG scale drawn per pair")
    p.add_argument("--pag", type=float, default=0.0, help="PAG scale added to the pairs' guidance")
    p.add_argument("--filter", type=float, default=0.9, help="min confidence of the filter classifier in a kept pair (0: off)")
    p.add_argument("--val-frac", type=float, default=0.05, help="share of kept pairs held out for validation")
    p.add_argument("--msd-steps", type=int, default=10, help="N: unguided DDIM steps inside the MSD loss")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank (the paper's choice; try 8 with --lr 1e-3); "
                   "0 fine-tunes the whole copy, which did better on the 0.67M-parameter default teacher")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW's eps (see train(): it must stay small "
                   "next to sqrt(v), or the loss scale starts to shape the steps)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=800, help="refiner training steps")
    p.add_argument("--val-every", type=int, default=200)
    p.add_argument("--eval-n", type=int, default=1000, help="held-out noises in the final table")
    p.add_argument("--eval-steps", type=int, default=20, help="DDIM steps of the final table")
    p.add_argument("--bank", default="test", choices=noises.BANKS,
                   help="held-out noises of the final table: 'test' for reported results, 'dev' for choosing settings")
    p.add_argument("--out", default="runs/refiner")
    p.add_argument("--resume", action="store_true", help="continue from --out/ckpt.pt")
    p.add_argument("--stop-at", type=int, default=None, help="stop after this step as if interrupted (tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if args.steps < 1 or args.pairs < 1 or args.batch_size < 1:
        die("--steps, --pairs and --batch-size must be >= 1")
    if not 1 <= args.msd_steps <= 1000 or not 1 <= args.guide_steps <= 1000:
        die(f"--msd-steps and --guide-steps must be in 1..1000, got {args.msd_steps} and {args.guide_steps}")
    if args.w is not None:
        args.w_range = [args.w, args.w]
    if min(args.w_range) < 0 or args.w_range[0] > args.w_range[1] or args.pag < 0:
        die(f"--w/--w-range must be >= 0 and low <= high, --pag >= 0; got {args.w_range}, {args.pag}")
    if args.lora_rank < 0 or not 0 <= args.filter < 1 or not 0 < args.val_frac < 1:
        die("--lora-rank must be >= 0, --filter in [0, 1), --val-frac in (0, 1)")
    return args


# ----------------------------------------------------------------------------------------------
# 1. Teacher
# ----------------------------------------------------------------------------------------------


def get_teacher(args, device):
    """The teacher named by --teacher; without one, the default teacher, trained (or finished) first."""
    path = args.teacher or DEFAULT_TEACHER
    if args.teacher is None:
        steps = train_teacher.parse_args([]).steps
        done = os.path.isfile(path) and load_checkpoint(path, "teacher")["step"] >= steps
        if not done:
            print(f"no finished teacher at {path}: training the default teacher first")
            resume = ["--resume"] if os.path.isfile(path) else []
            train_teacher.main(["--out", os.path.dirname(path), "--seed", str(args.seed),
                                "--device", args.device, *resume])
    teacher, ckpt = load_teacher(path, device)
    return teacher, ckpt, path


# ----------------------------------------------------------------------------------------------
# 2. Guided pairs, cached in shards
# ----------------------------------------------------------------------------------------------

SHARD = 1000  # pairs per shard (fewer when --pairs is smaller)


def shard_size(args):
    return min(SHARD, args.pairs)


def pairs_dir(args, teacher_path, teacher_fp):
    """A cache folder keyed by everything that decides a shard's content, so changing one makes a new one."""
    if args.pairs_dir:
        return args.pairs_dir
    key = json.dumps([teacher_fp, args.guide_steps, args.w_range, args.pag, args.seed, shard_size(args)])
    return os.path.join(os.path.dirname(teacher_path), "pairs-" + hashlib.sha256(key.encode()).hexdigest()[:10])


def pair_inputs(index, args, num_classes, image_size):
    """x_T ~ N(0, I), c and w ~ U(w_range) of one shard, from the shard's own generator in the 'pairs'
    stream: a resumed or split generation draws exactly the same, and no other use draws these noises."""
    n = shard_size(args)
    gen = noises.generator("pairs", args.seed, index)
    x_T = torch.randn(n, 3, image_size, image_size, generator=gen)
    y = torch.randint(num_classes, (n,), generator=gen)
    lo, hi = args.w_range
    w = lo + (hi - lo) * torch.rand(n, generator=gen)  # random scales reduce one scale's bias (§3.3)
    return x_T, y, w


def make_shard(teacher, pair_filter, index, args, num_classes, image_size):
    """One shard of pairs: x_T, c, w and x0_guide = DenoiseGuide(x_T, c) (eq. 1-2), with the filter's
    confidence in each x0_guide and the filter's fingerprint (so a changed filter is noticed)."""
    x_T, y, w = pair_inputs(index, args, num_classes, image_size)
    x0_guide = sample_many(teacher, x_T, y, args.guide_steps, w, args.pag)
    x0_guide = data.to_uint8(x0_guide)  # what a guided image is: 8 bits; also 4x smaller on disk
    return {"x_T": x_T, "y": y, "w": w, "x0_guide": x0_guide, **filter_scores(pair_filter, x0_guide, y)}


def filter_scores(pair_filter, x0_guide, y):
    return {"conf": pair_filter.confidence(data.to_float(x0_guide), y), "filter": pair_filter.fingerprint()}


def shard_paths(args, folder):
    return [os.path.join(folder, f"shard_{i:05d}.pt") for i in range(math.ceil(args.pairs / shard_size(args)))]


def make_pairs(teacher, pair_filter, args, folder, num_classes, image_size, rank=0, world=1):
    """Generate the shards missing from the cache, each written atomically. Under torchrun, process r
    makes shards r, r + world, ...; since a shard depends only on its index, the union is the same."""
    os.makedirs(folder, exist_ok=True)
    paths = shard_paths(args, folder)
    for i in tqdm(range(rank, len(paths), world), desc="guided pairs", disable=rank > 0):
        if not os.path.isfile(paths[i]):  # a shard exists only once it was written whole (rename)
            save_atomic(make_shard(teacher, pair_filter, i, args, num_classes, image_size), paths[i])
    distributed.barrier()


def read_pairs(args, folder, pair_filter):
    """Every shard of the cache; a shard whose confidences came from another filter is re-scored (and
    rewritten) by this one, since x_T and x0_guide do not depend on the filter but `conf` does."""
    shards = []
    for path in shard_paths(args, folder):
        try:
            shard = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            die(f"pair cache {path} is unreadable ({type(e).__name__}); delete it to regenerate")
        if shard.get("filter") != pair_filter.fingerprint():
            shard.update(filter_scores(pair_filter, shard["x0_guide"], shard["y"]))
            save_atomic(shard, path)
        shards.append(shard)
    return {k: torch.cat([s[k] for s in shards])[:args.pairs] for k in shards[0] if k != "filter"}


def load_pairs(teacher, pair_filter, args, folder, num_classes, image_size):
    """All args.pairs pairs (one process): whole shards from the cache, missing ones generated."""
    make_pairs(teacher, pair_filter, args, folder, num_classes, image_size)
    return read_pairs(args, folder, pair_filter)


def split_pairs(pairs, args):
    """Quality filter (paper §3.3), then a fixed validation split."""
    keep = pairs["conf"] >= args.filter
    kept = {k: v[keep] for k, v in pairs.items()}
    n = len(kept["y"])
    n_val = max(1, int(args.val_frac * n))
    print(f"filter: kept {n} of {len(keep)} pairs ({n / len(keep):.1%}) with the filter's confidence "
          f">= {args.filter}; {n - n_val} train, {n_val} validation")
    if n - n_val < args.batch_size:
        die(f"--filter {args.filter} leaves {max(0, n - n_val)} training pairs, fewer than --batch-size "
            f"{args.batch_size}")
    return {k: v[n_val:] for k, v in kept.items()}, {k: v[:n_val] for k, v in kept.items()}


def batch_of(pairs, idx, device):
    x0_guide = data.to_float(pairs["x0_guide"][idx])
    return pairs["x_T"][idx].to(device), pairs["y"][idx].to(device), x0_guide.to(device)


# ----------------------------------------------------------------------------------------------
# 3. Refiner training with L_MSD
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def validation_loss(refiner, teacher, val, args, device):
    refiner.eval()  # the mode sampling uses (dropout off, where a preset has it)
    total = 0.0
    for i in range(0, len(val["y"]), 250):
        x_T, y, x0_guide = batch_of(val, slice(i, i + 250), device)
        total += msd_loss(teacher, refiner(x_T, y), y, x0_guide, args.msd_steps).item() * len(y)
    return total / len(val["y"])


def train(refiner, teacher, train_pairs, val, args, device, teacher_fp):
    """MSD training of the refiner's trainable weights; returns the refiner with the weights of the best
    validation loss (a snapshot, cloned, so later steps do not move it)."""
    params = [p for p in refiner.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, eps=args.adam_eps)
    gen = torch.Generator().manual_seed(args.seed)
    step, best, best_state = 0, float("inf"), refiner.trainable_state()
    path = os.path.join(args.out, "ckpt.pt")
    if args.resume:
        ckpt = load_refiner_ckpt(path, teacher_fp, "--resume")
        refiner.load_state_dict(ckpt["state"], strict=False)
        opt.load_state_dict(ckpt["opt"])
        gen.set_state(ckpt["gen"])
        step, best, best_state = ckpt["step"], ckpt["best_val"], ckpt["best"]

    def save():
        save_atomic({"kind": "refiner", "format": FORMAT, "teacher_fingerprint": teacher_fp,
                     "teacher": args.teacher, "rank": refiner.rank, "alpha": refiner.alpha,
                     "state": refiner.trainable_state(), "best": best_state, "best_val": best,
                     "opt": opt.state_dict(), "gen": gen.get_state(), "step": step, "args": vars(args)}, path)

    # To first order x_hat_0 moves by prod(a_t) ~ 157 times a move of x_hat_T, so L_MSD / prod(a_t)^2 is
    # the squared size of the noise-space correction x_hat_T still lacks (~1e-6: the correction is small).
    # That is the number we print. We backpropagate L_MSD itself: Adam's steps ignore the loss scale only
    # while its eps is small next to sqrt(v), and with the loss divided by prod(a_t)^2 ~ 2.5e4 it was not
    # (sqrt(v) < 10 eps for 98% of the weights at step 10, 48% at step 800). The validation line prints
    # that share ("eps-bound"); the ablation row eps_scaled trains the old way.
    scale = prod_a(args.msd_steps) ** 2
    if step == 0:
        tqdm.write(f"step 0 (identity refiner): validation L_MSD/prod(a)^2 "
                   f"{validation_loss(refiner, teacher, val, args, device) / scale:.4e}")
    last = min(args.steps, args.stop_at or args.steps)
    bar = tqdm(range(step, last), initial=step, total=args.steps, desc="refiner (MSD)")
    for step in bar:
        for g in opt.param_groups:  # cosine decay: the last steps settle
            g["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        x_T, y, x0_guide = batch_of(train_pairs, torch.randint(len(train_pairs["y"]), (args.batch_size,),
                                                                generator=gen), device)
        refiner.train()
        loss = msd_loss(teacher, refiner(x_T, y), y, x0_guide, args.msd_steps)
        if not torch.isfinite(loss):
            die(f"MSD loss is {loss.item()} at step {step}; the last good checkpoint is kept in {args.out}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.set_postfix(loss=f"{loss.item() / scale:.3e}", best_val=f"{best / scale:.3e}")
        if step % args.val_every == 0 or step == args.steps:
            val_loss = validation_loss(refiner, teacher, val, args, device)
            if val_loss < best:
                best, best_state = val_loss, refiner.trainable_state()
            save()
            tqdm.write(f"step {step}: validation L_MSD/prod(a)^2 {val_loss / scale:.4e} (best {best / scale:.4e}); "
                       f"eps-bound weights {eps_bound_share(opt):.2%}")
        elif step == last:
            save()
    refiner.load_state_dict(best_state, strict=False)
    return refiner.eval()


@torch.no_grad()
def eps_bound_share(opt):
    """Share of the trained weights whose Adam denominator is mostly eps: sqrt(v_hat) < 10 eps. Where it is
    not small, the loss scale changes the steps (a loss k times smaller moves those weights less)."""
    bound = total = 0
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p)
            if state:
                v_hat = state["exp_avg_sq"] / (1 - group["betas"][1] ** float(state["step"]))
                bound += int((v_hat.sqrt() < 10 * group["eps"]).sum())
                total += p.numel()
    return bound / max(total, 1)


# ----------------------------------------------------------------------------------------------
# 4. Evaluation on held-out noises
# ----------------------------------------------------------------------------------------------


def evaluate_regimes(teacher, refiner, judge, args, num_classes, image_size):
    """The regimes on the held-out bank, each scored by the judge; and refined minus each other regime,
    with paired intervals (the regimes share their noises and labels)."""
    x_T, y = noises.bank(args.bank, args.eval_n, num_classes, (3, image_size, image_size))
    lo, hi = args.w_range
    regimes = [("unguided", 0.0, None), ("cfg", (lo + hi) / 2, None)]
    if hi > lo:
        regimes.append(("cfg_top", hi, None))
    regimes.append(("refined", 0.0, refiner))
    rows, images, measured = [], {}, {}
    for name, w, ref in regimes:
        row, images[name], measured[name] = run_regime(teacher, judge, x_T, y, name, w, args.eval_steps, ref)
        rows.append(row)
    differences = {f"refined - {name}": judge.difference(measured["refined"], measured[name])
                   for name in measured if name != "refined"}
    return rows, differences, images, y


def write_regime_grid(images, y, num_classes, path, per_class=6):
    """One row per class (at most 10), the regimes side by side on the same noises and labels."""
    K = min(num_classes, 10)
    per_class = min(per_class, int(torch.bincount(y, minlength=K)[:K].min()))
    idx = torch.cat([torch.nonzero(y == k)[:per_class, 0] for k in range(K)])
    cols = [images[name][idx].view(K, per_class, *images[name].shape[1:]) for name in images]
    data.save_grid(torch.cat(cols, 1).flatten(0, 1), per_class * len(cols), path)


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = distributed.init(resolve_device(args.device))
    if rank == 0:
        print(f"train_refiner: {vars(args)}")
        make_out_dir(args.out)
    seed_everything(args.seed)
    if args.resume and not os.path.isfile(os.path.join(args.out, "ckpt.pt")):  # say so before the slow parts
        die(f"--resume: no checkpoint at {os.path.join(args.out, 'ckpt.pt')} (--out {args.out})")
    start = time.perf_counter()
    teacher, tckpt, teacher_path = get_teacher(args, device)
    args.teacher = teacher_path
    teacher_fp = fingerprint(teacher)
    ds = tckpt["data"]
    K, size = len(ds["classes"]), ds["image_size"]
    try:  # rank 0 trains and caches the classifiers; the other ranks then read them
        pair_filter = distributed.main_first(lambda: load_filter(ds["dataset"], ds["data_dir"], size, device))
        judge = load_judge(ds["dataset"], ds["data_dir"], size, device) if rank == 0 else None
    except data.DataError as e:
        die(str(e))
    folder = pairs_dir(args, teacher_path, teacher_fp)
    print(f"guided pairs: {folder}")
    make_pairs(teacher, pair_filter, args, folder, K, size, rank, world)
    distributed.finish()  # the rest runs in one process
    if rank > 0:
        return
    train_pairs, val = split_pairs(read_pairs(args, folder, pair_filter), args)

    refiner = Refiner(teacher, args.lora_rank, args.lora_alpha).to(device)
    n_train = sum(p.numel() for p in refiner.parameters() if p.requires_grad)
    how = f"LoRA rank {args.lora_rank} on {len(lora_layers(refiner))} layers" if args.lora_rank else "full fine-tuning"
    print(f"refiner: {how}, "
          f"{n_train / 1e6:.3f}M trainable parameters; MSD over {args.msd_steps} steps")
    refiner = train(refiner, teacher, train_pairs, val, args, device, teacher_fp).merge()
    if args.stop_at is not None and args.stop_at < args.steps:
        print(f"stopped at step {args.stop_at} (--stop-at); --resume continues")
        return

    rows, differences, images, y = evaluate_regimes(teacher, refiner, judge, args, K, size)
    print_table(rows, f"{args.eval_n} held-out noises ({args.bank} bank), {args.eval_steps} DDIM steps; 95% "
                      f"bootstrap intervals over the noises\n{judge_line(judge, pair_filter)}")
    for name, diff in differences.items():
        print_difference(*name.split(" - "), diff)
    write_json({"regimes": rows, "differences": differences, "judge": judge.info(), "filter": pair_filter.info(),
                "bank": args.bank, "teacher": teacher_path, "args": vars(args)},
               os.path.join(args.out, "metrics.json"))
    write_regime_grid(images, y, K, os.path.join(args.out, "regimes.png"))
    print(f"wrote {args.out}/metrics.json, {args.out}/regimes.png (columns: {', '.join(images)}); "
          f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
    distributed.finish()
