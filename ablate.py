"""The paper's ablations (§4 of the paper, arXiv 2412.03895) on the embedded default, as one table.

    python ablate.py                 # every row over three seeds: 25 minutes on a 2-core CPU (pairs cached)
    python ablate.py --rows n5 lora  # some rows

Same teacher, same guided pairs (the cache `train_refiner.py` made), same training budget (--steps at
batch 32), same held-out noises (the test bank), scored by the judge; every trained row is trained with
each of --seeds, and the table gives the mean, the spread over seeds and a 95% interval. Rows:

    gaussian, cfg       Gaussian noise unguided, and with CFG (w = 3): no training
    noiserefine         the default refiner: N = 10 MSD steps, quality filter on, whole copy fine-tuned
    n5                  N = 5 MSD steps (paper: FID 13.74 at N = 5 vs 13.36 at N = 10)
    nofilter            every pair, no quality filter (paper Tab. 3: 15.27 without vs 13.55 with)
    lora                pretrained copy + LoRA rank 8 (the paper's refiner)
    scratch             the same network from a random initialisation (paper Tab. 5: 37.87 vs 13.74)
    gaussian_prior      an MLP giving a Gaussian mean and diagonal std per class (PAHI, paper Tab. 7: 217.3)
    distill             guidance distillation: LoRA on the teacher trained to output the CFG eps directly,
                        then sampled unguided from Gaussian noise (the competing approach, paper Fig. 11)
    eps_scaled          the former default: the MSD loss divided by prod(a_t)^2 before AdamW, which equals AdamW's
                        eps times prod(a_t)^2 (eps then dominates sqrt(v) for most weights early in training)
    refined_cfg         the default refiner's noise with a small CFG (w = 0.5): no training

Writes --out/ablate.json and --out/ablate.csv; a finished row and seed is cached in
--out/<row>/seed<k>/ and reused when its settings are unchanged.
"""
import copy
import csv
import dataclasses
import json
import os
import statistics
import time

import torch
import torch.nn as nn
from tqdm import tqdm

import data
import noises
import pairs
import teacher as teachers
from checkpoint import fingerprint, save_atomic, save_json
import cli
from cli import die, entry_point, print_table, resolve_device, seed_everything
from diffusion import STEPS, T, guided_eps, q_sample
from evaluate import INTERVALS, Measured, judge_line, load_filter, load_judge, print_difference, run_regime, seeds_interval
from models import build_model
from noiserefine import Refiner, Training, add_lora, cosine_lr, fit, load_refiner, lora_layers, prod_a
from safety import write_atomic

ROWS = ["gaussian", "cfg", "noiserefine", "n5", "nofilter", "lora", "scratch", "gaussian_prior", "distill",
        "eps_scaled", "refined_cfg"]
TRAINED = {"noiserefine": {}, "n5": {"msd_steps": 5}, "nofilter": {"filter": 0.0},  # each row's change
           "lora": {"lora_rank": 8, "lr": 1e-3}, "scratch": {}, "gaussian_prior": {"lr": 1e-2}, "distill": {"lr": 1e-3},
           "eps_scaled": {"adam_eps": 1e-8 * prod_a(10) ** 2}}


class GaussianPrior(nn.Module):
    """x_hat_T = mu_c + sigma_c * x_T, with (mu_c, log sigma_c) = MLP(class embedding): a per-class Gaussian
    (the paper's PAHI baseline). Its last layer starts at zero, so it starts as the identity, like g_phi."""
    rank, alpha = 0, 0  # what noiserefine.fit writes into the checkpoint of any refiner

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


# ----------------------------------------------------------------------------------------------
# Guidance distillation: the competing approach
# ----------------------------------------------------------------------------------------------


def train_distilled(teacher, train_pairs, t, device):
    """A LoRA (rank 8) on a copy of the teacher, trained so that its conditional eps equals the teacher's CFG
    eps, eps_c + w (eps_c - eps_u), on noised guided images x_t = q_sample(x0_guide, t, eps) with the pair's
    own w; sampled afterwards with one forward per step and no guidance."""
    student = copy.deepcopy(teacher).requires_grad_(False)
    add_lora(student, 8, 8)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(t.seed)
    student.train()
    for step in tqdm(range(t.steps), desc="distill"):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, t.steps, t.lr)
        idx = torch.randint(len(train_pairs["y"]), (t.batch_size,), generator=gen)
        x0, y = data.to_float(train_pairs["x0_guide"][idx]).to(device), train_pairs["y"][idx].to(device)
        w = train_pairs["w"][idx].to(device)
        ts = torch.randint(0, T, (t.batch_size,), generator=gen).to(device)
        x_t = q_sample(x0, ts, torch.randn(x0.shape, generator=gen).to(device))
        with torch.no_grad():  # the target: the teacher's CFG eps, SG
            target = guided_eps(teacher, x_t, ts, y, w)
        loss = ((student(x_t, ts, y) - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for layer in lora_layers(student):
        layer.merge()
    return student.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# The table: every trained row over several seeds, scored by the judge on the test bank
# ----------------------------------------------------------------------------------------------

# The paper's claims, each a (row, baseline) difference printed with its interval and verdict.
COMPARISONS = [("noiserefine", "cfg"), ("n5", "noiserefine"), ("nofilter", "noiserefine"),
               ("noiserefine", "scratch"), ("lora", "scratch"), ("lora", "noiserefine"),
               ("noiserefine", "gaussian_prior"),
               ("distill", "cfg"), ("noiserefine", "distill"), ("eps_scaled", "noiserefine"),
               ("refined_cfg", "noiserefine")]


def build_parser():
    d = Training()
    p = cli.Parser(__doc__)
    p.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS, help="which rows")
    p.add_argument("--teacher", type=cli.checkpoint_file, default=teachers.DEFAULT_TEACHER, help="teacher checkpoint")
    p.add_argument("--steps", type=cli.integer(1), default=400, help="training steps of every trained row")
    p.add_argument("--pairs", type=cli.integer(1, 10 ** 8), default=pairs.PairSettings().count, help="the pairs "
                   "budget (the default refiner's)")
    p.add_argument("--batch-size", type=cli.integer(1, 65536), default=d.batch_size, help="batch of every trained row")
    p.add_argument("--filter", type=cli.number(0, 1, hi_open=True), default=pairs.FILTER, help="the quality filter "
                   "of every row but nofilter")
    p.add_argument("--small-w", type=cli.number(0, 100), default=0.5, help="CFG scale of the refined_cfg row")
    p.add_argument("--eval-n", type=cli.integer(10, 10 ** 7), default=1000, help="held-out noises per row")
    p.add_argument("--bank", default="test", choices=noises.BANKS, help="held-out noises (dev: for choosing)")
    p.add_argument("--seeds", type=cli.SEED, nargs="+", default=[0, 1, 2],
                   help="training seeds of every trained row (the pairs and the noises stay the same)")
    p.add_argument("--out", type=cli.path, default="runs/ablate", help="output folder")
    p.add_argument("--device", type=cli.device, default="auto", help="auto, cpu, cuda, cuda:1, ...")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        die(f"--seeds must differ from each other, got {args.seeds}")
    return args


def row_training(row, args, seed):
    """A trained row's settings: the refiner's defaults, the shared budget, the row's change."""
    change = {k: v for k, v in TRAINED[row].items() if k not in ("filter", "lora_rank")}  # those are not training's
    return dataclasses.replace(Training(), steps=args.steps, batch_size=args.batch_size, val_every=args.steps,
                               seed=seed, **change)


def row_dir(row, args, seed):
    return os.path.join(args.out, row, f"seed{seed}")


def make_refiner(row, ctx):
    if row == "scratch":
        return Refiner(build_model(ctx["config"]), 0)  # same architecture, random weights, all trained
    if row == "gaussian_prior":
        return GaussianPrior(ctx["K"], ctx["size"])
    return Refiner(ctx["teacher"], TRAINED[row].get("lora_rank", 0))


def run_row(row, seed, ctx, args):
    """Train what the row needs with this seed (timed), then sample the held-out noises.
    Returns (table row, what the judge measured, training seconds)."""
    teacher, device = ctx["teacher"], ctx["device"]
    model, refiner, w, seconds = teacher, None, 0.0, 0.0
    if row == "cfg":
        w = pairs.DISPLAY_W
    elif row == "refined_cfg":  # the noiserefine row's refiner of this seed, as its training wrote it
        refiner = load_refiner(os.path.join(row_dir("noiserefine", args, seed), "ckpt.pt"), teacher, device)
        w = args.small_w
    elif row in TRAINED:
        t = row_training(row, args, seed)
        train_pairs, val = pairs.split_pairs(ctx["pairs"], TRAINED[row].get("filter", args.filter), pairs.VAL_FRAC,
                                             t.batch_size)
        seed_everything(seed)
        start = time.perf_counter()
        if row == "distill":
            model = train_distilled(teacher, train_pairs, t, device)
        else:
            ckpt = os.path.join(row_dir(row, args, seed), "ckpt.pt")
            meta = {"teacher_fingerprint": ctx["fingerprints"]["teacher"], "teacher": args.teacher, "args": vars(args)}
            refiner = fit(make_refiner(row, ctx).to(device), teacher, train_pairs, val, t, device, ckpt, meta).merge()
        seconds = time.perf_counter() - start
    x_T, y = ctx["bank"]
    metrics, _, measured = run_regime(model, ctx["judge"], x_T, y, row, w, refiner=refiner, intervals=False)
    return metrics, measured, seconds


CACHE_VERSION = 2  # bump when a row's training or scoring changes in a way its settings do not show


def settings(row, seed, args, ctx):
    """Everything a cached row depends on: a change to any of them reruns the row."""
    training = dataclasses.asdict(row_training(row, args, seed)) if row in TRAINED else None
    if training and training["amp"] == "none":
        del training["amp"]  # rows cached before --amp existed stay valid (they ran in fp32)
    return {"version": CACHE_VERSION, "row": row, "seed": seed, "pairs": args.pairs, "filter": args.filter,
            **ctx["fingerprints"], "bank": args.bank, "eval_n": args.eval_n, "small_w": args.small_w,
            "change": TRAINED.get(row), "training": training}


def get_row(row, seed, ctx, args):
    """(table row, measured, seconds) of one row and seed, from its cache when its settings are unchanged."""
    folder = row_dir(row, args, seed)
    path = os.path.join(folder, "metrics.json")
    if os.path.isfile(path) and os.path.isfile(os.path.join(folder, "measured.pt")):
        saved = json.load(open(path))
        if saved["settings"] == settings(row, seed, args, ctx):
            m = torch.load(os.path.join(folder, "measured.pt"), weights_only=True)
            return saved["row"], Measured(**m), saved["train_seconds"]
    metrics, measured, seconds = run_row(row, seed, ctx, args)
    os.makedirs(folder, exist_ok=True)
    save_atomic({"feats": measured.feats, "probs": measured.probs, "labels": measured.labels},
                os.path.join(folder, "measured.pt"))  # not the bootstrap cache: it depends on the resample count
    save_json({"settings": settings(row, seed, args, ctx), "row": metrics, "train_seconds": seconds}, path)
    return metrics, measured, seconds


def summarise(row, results, judge):
    """One table row over seeds: mean scores, min-max over seeds, and 95% intervals over noises and seeds."""
    metrics = [m for m, _, _ in results]
    runs = [r for _, r, _ in results]
    mean = {k: statistics.mean(m[k] for m in metrics) for k in ("class_acc", "fd_cls", "is_cls", "precision",
                                                                 "recall", "diversity", "nfe_per_image")}
    mean["train_seconds"] = statistics.mean(s for _, _, s in results)
    for key in ("class_acc", "fd_cls"):
        mean[f"{key}_seeds"] = [min(m[key] for m in metrics), max(m[key] for m in metrics)]
        mean[f"{key}_ci"] = seeds_interval(judge, runs, key=key)[1:]
    return {"name": row, "seeds": len(results), **mean}


def print_rows(rows):
    cells = []
    for r in rows:
        a, a_seeds, fd, fd_seeds = r["class_acc_ci"], r["class_acc_seeds"], r["fd_cls_ci"], r["fd_cls_seeds"]
        cells.append([r["name"], r["seeds"], f"{r['class_acc']:.3f} [{a[0]:.3f}, {a[1]:.3f}] ({a_seeds[0]:.3f}-{a_seeds[1]:.3f})",
                      f"{r['fd_cls']:.2f} [{fd[0]:.2f}, {fd[1]:.2f}] ({fd_seeds[0]:.2f}-{fd_seeds[1]:.2f})",
                      f"{r['is_cls']:.2f}", f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['diversity']:.3f}",
                      f"{r['nfe_per_image']:.1f}", f"{r['train_seconds']:.0f}"])
    print_table(["row", "seeds", "class_acc [95% CI] (seed min-max)", "FD_cls [95% CI] (seed min-max)", "IS_cls",
                 "precision", "recall", "diversity", "NFE/img", "train s"], cells)


@entry_point
def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    seed_everything(0)
    teacher, tckpt, _ = teachers.get_or_train(args.teacher, 0, device)
    ds = tckpt["data"]
    K, size = len(ds["classes"]), ds["image_size"]
    pair_filter = load_filter(ds["dataset"], ds["data_dir"], size, device)
    judge = load_judge(ds["dataset"], ds["data_dir"], size, device)
    fp = fingerprint(teacher)
    settings_ = pairs.PairSettings(count=args.pairs)  # the default refiner's pairs (seed 0)
    shared = pairs.load_pairs(teacher, pair_filter, settings_, pairs.cache_dir(settings_, args.teacher, fp), K, size)
    ctx = {"teacher": teacher, "judge": judge, "pairs": shared, "device": device, "K": K, "size": size,
           "config": tckpt["config"], "bank": noises.bank(args.bank, args.eval_n, K, (3, size, size)),
           "fingerprints": {"teacher": fp, "judge": judge.trained.fingerprint(), "pair_filter": pair_filter.fingerprint()}}
    order = sorted(args.rows, key=ROWS.index)
    if "refined_cfg" in order and "noiserefine" not in order:
        order.insert(order.index("refined_cfg"), "noiserefine")
    results = {}
    for row in order:
        seeds = [0] if row in ("gaussian", "cfg") else args.seeds  # no training: nothing random to vary
        results[row] = []
        for seed in seeds:
            print(f"\n== {row}, seed {seed}")
            results[row].append(get_row(row, seed, ctx, args))
    rows = [summarise(row, results[row], judge) for row in order]
    print(f"\nablations: {args.eval_n} held-out noises ({args.bank} bank), {STEPS} DDIM steps; trained rows: "
          f"{args.steps} steps at batch {args.batch_size} on the same {args.pairs} pairs, seeds {args.seeds}; "
          f"95% intervals from a bootstrap over noises and seeds\n{judge_line(judge, pair_filter)}")
    print_rows(rows)
    comparisons = {}
    for a, b in COMPARISONS:
        if a in results and b in results:
            runs = ([r for _, r, _ in results[a]], [r for _, r, _ in results[b]])
            comparisons[f"{a} - {b}"] = {key: seeds_interval(judge, *runs, key=key) for key in INTERVALS}
            print_difference(a, b, comparisons[f"{a} - {b}"])
    save_json({"rows": rows, "comparisons": comparisons, "judge": judge.info(), "filter": pair_filter.info(),
               "bank": args.bank, "args": vars(args)}, os.path.join(args.out, "ablate.json"))
    keys = ["name", "seeds", "class_acc", "fd_cls", "is_cls", "precision", "recall", "diversity", "nfe_per_image",
            "train_seconds"]
    write_atomic(os.path.join(args.out, "ablate.csv"),
                 lambda f: csv.writer(f).writerows([keys] + [[r[k] for k in keys] for r in rows]), mode="w")
    print(f"wrote {args.out}/ablate.json and {args.out}/ablate.csv")


if __name__ == "__main__":
    main()
