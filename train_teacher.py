"""Train a class-conditional teacher eps_theta(x_t, t, c) with condition dropout, so CFG works.

    python train_teacher.py                      # the CPU default: unet-tiny on the embedded shapes
    python train_teacher.py --dataset cifar10 --data-dir data --model unet-cifar --device cuda
    torchrun --standalone --nproc_per_node=4 train_teacher.py ...   # DDP: --batch-size is the global batch

Writes --out/ckpt.pt (atomically) and --out/samples_<step>.png: one row per class, unguided samples
on the left, CFG samples on the right. --resume continues exactly where the checkpoint stopped.
"""
import argparse
import copy
import math
import os
import time

import torch
from tqdm import tqdm

import data
import distributed
import noises
from checkpoint import (FORMAT, PRESET_NAMES, build_model, die, load_checkpoint, make_out_dir,
                        model_config, resolve_device, save_atomic, seed_everything)
from diffusion import sample, training_loss


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="shapes", choices=data.DATASETS)
    p.add_argument("--data-dir", default="data", help="where the data set (and the evaluator's cache) lives")
    p.add_argument("--download", action="store_true", help="cifar10: fetch the archive if missing")
    p.add_argument("--model", default="unet-tiny", choices=PRESET_NAMES)
    p.add_argument("--image-size", type=int, default=None, help="default: the preset's size")
    p.add_argument("--batch-size", type=int, default=128, help="global batch (split over torchrun's processes)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=int, default=200, help="linear warm-up steps, then cosine decay")
    p.add_argument("--steps", type=int, default=2500, help="total training steps")
    p.add_argument("--cond-drop", type=float, default=0.1, help="probability of the null label (for CFG)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the weights used for sampling")
    p.add_argument("--grid-every", type=int, default=1000, help="write a sample grid every K steps")
    p.add_argument("--grid-w", type=float, default=3.0, help="CFG scale of the grid's right half")
    p.add_argument("--save-every", type=int, default=500, help="write the checkpoint every K steps")
    p.add_argument("--out", default="runs/teacher", help="output folder")
    p.add_argument("--resume", action="store_true", help="continue from --out/ckpt.pt")
    p.add_argument("--stop-at", type=int, default=None, help="stop after this step as if interrupted (tests)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    args = p.parse_args(argv)
    if args.steps < 1:
        die(f"--steps must be >= 1, got {args.steps}")
    if args.batch_size < 1 or args.lr <= 0 or not 0 <= args.cond_drop < 1 or not 0 <= args.ema < 1:
        die("--batch-size must be >= 1, --lr > 0, --cond-drop and --ema in [0, 1)")
    return args


def lr_at(step, args):
    """Linear warm-up, then cosine decay to 10% of the peak: short CPU runs end on small steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def update_ema(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


@torch.no_grad()
def write_grid(ema, classes, image_size, w, path, per_side=8, seed=0):
    """One row per class (at most 10): per_side unguided samples, then per_side CFG samples."""
    K = min(len(classes), 10)
    device = next(ema.parameters()).device
    gen = noises.generator("grid", seed)  # its own stream: no picture shows a training pair's x_T
    x_T = torch.randn(K * per_side, 3, image_size, image_size, generator=gen).to(device)
    y = torch.arange(K).repeat_interleave(per_side).to(device)
    unguided = sample(ema, x_T, y, 20, 0.0).view(K, per_side, 3, image_size, image_size)
    guided = sample(ema, x_T, y, 20, w).view(K, per_side, 3, image_size, image_size)
    data.save_grid(torch.cat([unguided, guided], 1).flatten(0, 1).cpu(), 2 * per_side, path)


def load_data(args):
    try:
        return data.load_dataset(args.dataset, args.data_dir, args.image_size, "train", args.download)
    except data.DataError as e:
        die(str(e))


def setup(args, device):
    """Fresh or resumed (model, ema, optimiser, generator, step, checkpoint metadata)."""
    path = os.path.join(args.out, "ckpt.pt")
    ckpt, meta = None, None
    if args.resume:
        if not os.path.isfile(path):
            die(f"--resume: no checkpoint at {path} (--out {args.out})")
        ckpt = load_checkpoint(path, "teacher", flag="--resume")
        config, meta = ckpt["config"], ckpt["data"]
        args.dataset, args.data_dir, args.image_size = meta["dataset"], meta["data_dir"], meta["image_size"]
    train = load_data(args)
    if meta is None:
        try:
            config = model_config(args.model, len(train.classes), train.images.shape[-1])
            build_model(config)
        except ValueError as e:
            die(str(e))
        meta = {"dataset": args.dataset, "data_dir": args.data_dir, "image_size": train.images.shape[-1],
                "classes": train.classes}
    if args.batch_size > len(train):
        die(f"--batch-size {args.batch_size} is larger than the data set ({len(train)} images)")
    model = build_model(config).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    # fused AdamW: one kernel for all parameters on CUDA (CPU keeps the default, bit-identical to before)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=device.startswith("cuda") or None)
    gen = torch.Generator().manual_seed(args.seed)
    step, losses = 0, []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        gen.set_state(ckpt["rng"]["gen"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        step, losses = ckpt["step"], ckpt.get("losses", [])
    return model, ema, opt, gen, step, losses, config, meta, train


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = distributed.init(resolve_device(args.device))
    if args.batch_size % world:
        die(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    log = print if rank == 0 else (lambda *a, **k: None)
    log(f"train_teacher: {vars(args)}")
    seed_everything(args.seed)  # the same on every rank: same initial weights, same batches
    if rank == 0:
        make_out_dir(args.out)
    distributed.barrier()
    model, ema, opt, gen, step, losses, config, meta, train = setup(args, device)
    log(f"model {config['arch']} with {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
        f"{len(train)} training images of {meta['image_size']}px, {len(meta['classes'])} classes"
        + (f"; {world} processes, {args.batch_size // world} images each per step" if world > 1 else ""))
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model  # averages gradients
    net = torch.compile(net) if args.compile else net
    mine = slice(rank * args.batch_size // world, (rank + 1) * args.batch_size // world)  # this rank's rows
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))  # bf16 on GPUs
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # what autocast leaves in fp32
    null_class = len(meta["classes"])
    last = min(args.steps, args.stop_at or args.steps)

    def save():
        if rank > 0:
            return
        save_atomic({"kind": "teacher", "format": FORMAT, "config": config, "data": meta,
                     "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                     "step": step, "losses": losses, "args": vars(args),
                     "rng": {"gen": gen.get_state(), "torch": torch.get_rng_state()}},
                    os.path.join(args.out, "ckpt.pt"))

    bar = tqdm(range(step, last), initial=step, total=args.steps, desc="teacher", disable=rank > 0)
    start, first = time.perf_counter(), step
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        x0, y = train.batch(torch.randint(len(train), (args.batch_size,), generator=gen))  # the global batch
        with amp:
            loss = training_loss(net, x0.to(device), y.to(device), null_class, args.cond_drop, gen, mine)
        global_loss = distributed.mean_over_ranks(loss).item()  # the global batch's loss; every rank agrees
        if not math.isfinite(global_loss):
            die(f"loss is {global_loss} at step {step}; the last good checkpoint is kept in {args.out}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        update_ema(ema, model, min(args.ema, (1 + step) / (10 + step)))
        losses.append(global_loss)
        step += 1
        img_per_s = (step - first) * args.batch_size / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", img_s=f"{img_per_s:.0f}")
        if step % args.save_every == 0 or step == last:
            save()
        if rank == 0 and (step % args.grid_every == 0 or step == args.steps):
            write_grid(ema.eval(), meta["classes"], meta["image_size"], args.grid_w,
                       os.path.join(args.out, f"samples_{step:06d}.png"), seed=args.seed)
    log(f"done: step {step}, checkpoint {os.path.join(args.out, 'ckpt.pt')}, "
        f"{time.perf_counter() - start:.0f} s")
    distributed.barrier()  # no rank leaves before rank 0 has written the checkpoint


if __name__ == "__main__":
    main()
    distributed.finish()
