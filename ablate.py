"""The paper's ablations (§4 of ../shared/PAPER.md) on the embedded default, as one table.

    python ablate.py                 # every row: about 20 minutes on a 2-core CPU (pairs cached)
    python ablate.py --rows n5 lora  # some rows

Same teacher, same guided pairs (the cache `train_refiner.py` made), same training budget (--steps at
batch 32), same held-out noises. Rows:

    gaussian, cfg       Gaussian noise unguided, and with CFG (w = 3): no training
    noiserefine         the default refiner: N = 10 MSD steps, quality filter on, whole copy fine-tuned
    n5                  N = 5 MSD steps (paper: FID 13.74 at N = 5 vs 13.36 at N = 10)
    nofilter            every pair, no quality filter (paper Tab. 3: 15.27 without vs 13.55 with)
    lora                pretrained copy + LoRA rank 8 (the paper's refiner)
    scratch             the same network from a random initialisation (paper Tab. 5: 37.87 vs 13.74)
    gaussian_prior      an MLP giving a Gaussian mean and diagonal std per class (PAHI, paper Tab. 7: 217.3)
    distill             guidance distillation: LoRA on the teacher trained to output the CFG eps directly,
                        then sampled unguided from Gaussian noise (the competing approach, paper Fig. 11)
    refined_cfg         the default refiner's noise with a small CFG (w = 0.5): no training

Writes --out/ablate.json and --out/ablate.csv; a finished row is cached in --out/<row>/metrics.json and
reused when its settings are unchanged.
"""
import argparse
import copy
import csv
import json
import math
import os
import time

import torch
import torch.nn as nn
from tqdm import tqdm

import data
import train_refiner
from checkpoint import build_model, die, fingerprint, load_refiner, resolve_device, seed_everything
from diffusion import T, guided_eps, q_sample
from evaluate import load_or_train_classifier, noise_bank, run_regime
from noiserefine import Refiner, add_lora, lora_layers

ROWS = ["gaussian", "cfg", "noiserefine", "n5", "nofilter", "lora", "scratch", "gaussian_prior", "distill",
        "refined_cfg"]
TRAINED = {"noiserefine": [], "n5": ["--msd-steps", "5"], "nofilter": ["--filter", "0"],
           "lora": ["--lora-rank", "8", "--lr", "1e-3"], "scratch": [], "gaussian_prior": ["--lr", "1e-2"],
           "distill": ["--lr", "1e-3"]}


class GaussianPrior(nn.Module):
    """x_hat_T = mu_c + sigma_c * x_T, with (mu_c, log sigma_c) = MLP(class embedding): a per-class Gaussian
    (the paper's PAHI baseline). Its last layer starts at zero, so it starts as the identity, like g_phi."""
    rank, alpha = 0, 0  # what train_refiner.train writes into the checkpoint of any refiner

    def __init__(self, num_classes, size, hidden=256):
        super().__init__()
        self.shape = (3, size, size)
        self.mlp = nn.Sequential(nn.Embedding(num_classes, 64), nn.Linear(64, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2 * 3 * size * size))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x_T, y):
        mu, log_sigma = self.mlp(y).view(-1, 2, *self.shape).unbind(1)
        return mu + log_sigma.exp() * x_T

    def trainable_state(self):
        return {k: v.clone() for k, v in self.state_dict().items()}

    def merge(self):
        return self


def make_refiner(row, teacher, config, size, num_classes, rank):
    if row == "scratch":
        return Refiner(build_model(config), 0)  # same architecture, random weights, all trained
    if row == "gaussian_prior":
        return GaussianPrior(num_classes, size)
    return Refiner(teacher, rank)


# ----------------------------------------------------------------------------------------------
# Guidance distillation: the competing approach
# ----------------------------------------------------------------------------------------------


def train_distilled(teacher, pairs, args, device):
    """A LoRA (rank 8) on a copy of the teacher, trained so that its conditional eps equals the teacher's CFG
    eps, eps_c + w (eps_c - eps_u), on noised guided images x_t = q_sample(x0_guide, t, eps) with the pair's
    own w; sampled afterwards with one forward per step and no guidance."""
    student = copy.deepcopy(teacher).requires_grad_(False)
    add_lora(student, 8, 8)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    student.train()
    for step in tqdm(range(args.steps), desc="distill"):
        for g in opt.param_groups:
            g["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        idx = torch.randint(len(pairs["y"]), (args.batch_size,), generator=gen)
        x0, y, w = data.to_float(pairs["x0_guide"][idx]).to(device), pairs["y"][idx].to(device), pairs["w"][idx]
        t = torch.randint(0, T, (args.batch_size,), generator=gen).to(device)
        x_t = q_sample(x0, t, torch.randn(x0.shape, generator=gen).to(device))
        with torch.no_grad():  # the target: the teacher's CFG eps, SG
            target = guided_eps(teacher, x_t, t, y, w.to(device))
        loss = ((student(x_t, t, y) - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for layer in lora_layers(student):
        layer.merge()
    return student.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    p.add_argument("--teacher", default=train_refiner.DEFAULT_TEACHER)
    p.add_argument("--steps", type=int, default=400, help="training steps of every trained row (batch 32)")
    p.add_argument("--pairs", type=int, default=10000, help="the pairs budget (the default refiner's)")
    p.add_argument("--batch-size", type=int, default=32, help="batch of every trained row")
    p.add_argument("--filter", type=float, default=0.9, help="the quality filter of every row but nofilter")
    p.add_argument("--small-w", type=float, default=0.5, help="CFG scale of the refined_cfg row")
    p.add_argument("--eval-n", type=int, default=1000)
    p.add_argument("--out", default="runs/ablate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if args.steps < 1 or args.pairs < 1 or args.batch_size < 1 or args.eval_n < 10 or args.small_w < 0:
        die("--steps, --pairs and --batch-size must be >= 1, --eval-n >= 10, --small-w >= 0")
    return args


def row_args(row, args):
    """train_refiner's settings for a row: its defaults, the shared budget, the row's change."""
    return train_refiner.parse_args(["--teacher", args.teacher, "--steps", str(args.steps), "--pairs",
                                     str(args.pairs), "--seed", str(args.seed), "--val-every", str(args.steps),
                                     "--batch-size", str(args.batch_size), "--filter", str(args.filter),
                                     "--out", os.path.join(args.out, row), *TRAINED.get(row, [])])


def run_row(row, ctx, args):
    """Train what the row needs (timed), then sample the held-out noises. Returns the table row."""
    teacher, evaluator, pairs, device = ctx["teacher"], ctx["evaluator"], ctx["pairs"], ctx["device"]
    x_T, y = ctx["bank"]
    if row in ("gaussian", "cfg"):
        return run_regime(teacher, evaluator, x_T, y, row, 3.0 if row == "cfg" else 0.0)[0], 0.0
    if row == "refined_cfg":  # the noiserefine row's refiner, as its training wrote it
        refiner = load_refiner(os.path.join(args.out, "noiserefine", "ckpt.pt"), teacher, device)
        return run_regime(teacher, evaluator, x_T, y, row, args.small_w, refiner=refiner)[0], 0.0
    rargs = row_args(row, args)
    train_pairs, val = train_refiner.split_pairs(pairs, rargs)
    seed_everything(args.seed)
    start = time.perf_counter()
    if row == "distill":
        student = train_distilled(teacher, train_pairs, rargs, device)
        seconds = time.perf_counter() - start
        return run_regime(student, evaluator, x_T, y, row, 0.0)[0], seconds
    refiner = make_refiner(row, teacher, ctx["config"], ctx["size"], ctx["K"], rargs.lora_rank).to(device)
    refiner = train_refiner.train(refiner, teacher, train_pairs, val, rargs, device, ctx["fp"]).merge().eval()
    seconds = time.perf_counter() - start
    return run_regime(teacher, evaluator, x_T, y, row, 0.0, refiner=refiner)[0], seconds


def cached(row, args):
    path = os.path.join(args.out, row, "metrics.json")
    if os.path.isfile(path):
        saved = json.load(open(path))
        if saved["settings"] == settings(row, args):
            return saved["row"], saved["train_seconds"]
    return None


def settings(row, args):
    return {"row": row, "steps": args.steps, "pairs": args.pairs, "batch_size": args.batch_size,
            "filter": args.filter, "seed": args.seed,
            "teacher": args.teacher,
            "eval_n": args.eval_n, "small_w": args.small_w, "extra": TRAINED.get(row)}


def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    base = train_refiner.parse_args(["--teacher", args.teacher, "--pairs", str(args.pairs), "--seed",
                                     str(args.seed)])
    teacher, tckpt, path = train_refiner.get_teacher(base, device)
    ds = tckpt["data"]
    K, size = len(ds["classes"]), ds["image_size"]
    try:
        evaluator = load_or_train_classifier(ds["dataset"], ds["data_dir"], size, device)
    except data.DataError as e:
        die(str(e))
    fp = fingerprint(teacher)
    pairs = train_refiner.load_pairs(teacher, evaluator, base, train_refiner.pairs_dir(base, path, fp), K, size)
    ctx = {"teacher": teacher, "evaluator": evaluator, "pairs": pairs, "device": device, "fp": fp, "K": K,
           "size": size, "config": tckpt["config"],
           "bank": noise_bank(args.eval_n, K, (3, size, size))}
    rows = []
    order = sorted(args.rows, key=ROWS.index)
    if "refined_cfg" in order and "noiserefine" not in order:
        order.insert(order.index("refined_cfg"), "noiserefine")
    for row in order:
        print(f"\n== {row}")
        result = cached(row, args) or run_row(row, ctx, args)
        metrics, seconds = result
        os.makedirs(os.path.join(args.out, row), exist_ok=True)
        save_json({"settings": settings(row, args), "row": metrics, "train_seconds": seconds},
                  os.path.join(args.out, row, "metrics.json"))
        rows.append({**metrics, "name": row, "train_seconds": seconds})
        print_rows(rows[-1:])
    print(f"\nablations: {args.eval_n} held-out noises, 20 DDIM steps; trained rows: {args.steps} steps at batch "
          f"{args.batch_size} "
          f"on the same {args.pairs} pairs")
    print_rows(rows)
    save_json({"rows": rows, "args": vars(args)}, os.path.join(args.out, "ablate.json"))
    with open(os.path.join(args.out, "ablate.csv.tmp"), "w", newline="") as f:
        keys = ["name", "w", "class_acc", "fd_cls", "is_cls", "nfe_per_image", "sec_per_image", "train_seconds"]
        csv.writer(f).writerows([keys] + [[r[k] for k in keys] for r in rows])
    os.replace(os.path.join(args.out, "ablate.csv.tmp"), os.path.join(args.out, "ablate.csv"))
    print(f"wrote {args.out}/ablate.json and {args.out}/ablate.csv")


def save_json(obj, path):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def print_rows(rows):
    print(f"{'row':<15} {'w':>4} {'class_acc':>9} {'FD_cls':>7} {'IS_cls':>6} {'NFE/img':>7} {'train s':>8}")
    for r in rows:
        print(f"{r['name']:<15} {r['w']:>4.1f} {r['class_acc']:>9.3f} {r['fd_cls']:>7.2f} {r['is_cls']:>6.2f} "
              f"{r['nfe_per_image']:>7.1f} {r['train_seconds']:>8.0f}")


if __name__ == "__main__":
    main()
