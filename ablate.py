"""The paper's ablations (§4 of the paper, arXiv 2412.03895) on the embedded default, as one table; and,
beyond the paper, NoiseRefine on pairs made with other guidances.

    python ablate.py                   # every ablation row over three seeds: 30 minutes on a 2-core CPU (pairs cached)
    python ablate.py --rows n5 lora    # some rows
    python ablate.py --table guidance  # the guidance table: each guidance, from Gaussian and from refined noise

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
    npnet               Golden Noise / NPNet (Zhou et al. 2024, arXiv 2411.09502): the same network trained by
                        regression onto re-denoised noises instead of by MSD (train_npnet says where it differs)
    golden              NPNet's target itself: every held-out noise re-denoised (redenoise, w = 3), then sampled
                        unguided; no training: what the regression could at best learn
    inverted            the same regression onto a full guidance-free noise: x0_guide inverted by unguided DDIM
                        (the paper's §3.1), on NoiseRefine's own training pairs; MSD replaced by a noise-space loss

The guidance table (--table guidance): Gaussian noise with each guidance at the middle of its scale range,
and NoiseRefine trained on pairs made with that guidance, sampled unguided:

    cfg, noiserefine            CFG (the paper's; the rows above)
    pag, nr_pag                 CFG + PAG (scale 2), the paper's Pick-a-Pic recipe
    auto, nr_auto               autoguidance: the teacher guided by its own early checkpoint (Karras et al. 2024)
    interval, nr_interval       CFG only where sigma_t is in pairs.INTERVAL (Kynkaanniemi et al. 2024)

Writes --out/ablate.json (the guidance table: guidance.json) and the same .csv; a finished row and seed is cached in
--out/<row>/seed<k>/ and reused when its settings are unchanged.
"""
import copy
import csv
import dataclasses
import functools
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
from diffusion import (BATCH, STEPS, T, ddim_coeffs, ddim_invert, ddim_step, ddim_timesteps, ddim_unstep, guided_eps,
                       q_sample, sample_many)
from evaluate import INTERVALS, ForwardCounter, Measured, judge_line, load_filter, load_judge, print_difference, run_regime, seeds_interval
from models import build_model
from noiserefine import Refiner, Training, add_lora, cosine_lr, fit, load_refiner, lora_layers, prod_a
from safety import BadInput, write_atomic

ROWS = ["gaussian", "cfg", "noiserefine", "n5", "nofilter", "lora", "scratch", "gaussian_prior", "distill",
        "eps_scaled", "refined_cfg", "npnet", "golden", "inverted"]
GUIDED = {"cfg": "cfg", "pag": "cfg+pag", "auto": "autoguidance", "interval": "interval"}  # Gaussian + a guidance
ON_PAIRS = {"nr_pag": "cfg+pag", "nr_auto": "autoguidance", "nr_interval": "interval"}  # NoiseRefine on its pairs
TABLES = {"ablations": ROWS, "guidance": ["gaussian", "cfg", "noiserefine", "pag", "nr_pag", "auto", "nr_auto",
                                          "interval", "nr_interval"]}
UNTRAINED = {"gaussian", "golden", *GUIDED}  # rows with nothing random: one seed
ALL_ROWS = ROWS + [r for r in TABLES["guidance"] if r not in ROWS]
TRAINED = {"noiserefine": {}, "n5": {"msd_steps": 5}, "nofilter": {"filter": 0.0},  # each row's change
           "lora": {"lora_rank": 8, "lr": 1e-3}, "scratch": {}, "gaussian_prior": {"lr": 1e-2}, "distill": {"lr": 1e-3},
           "eps_scaled": {"adam_eps": 1e-8 * prod_a(10) ** 2}, "npnet": {}, "inverted": {},
           "nr_pag": {}, "nr_auto": {}, "nr_interval": {}}


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
# Golden Noise / NPNet: the nearest peer, a noise-to-noise map trained by regression
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def redenoise(teacher, x_T, y, w, steps=STEPS):
    """Golden Noise's "re-denoise sampling" (Zhou et al. 2024, arXiv 2411.09502): one guided DDIM step from
    x_T (t = 999 to the next of the N' trailing steps), then one DDIM inversion step back to t = 999 with the
    conditional eps alone (their inversion CFG scale 1 is no guidance): x_T' = (x_t' - b_t eps_c(x_t')) / a_t.
    What the one guided step adds survives the round trip: x_T' ~ x_T + (b_t / a_t) w (eps_c - eps_u)."""
    t, t_next = ddim_timesteps(steps)[:2]
    a_t, b_t = ddim_coeffs(t, t_next)
    x_next = ddim_step(x_T, guided_eps(teacher, x_T, t, y, w), a_t, b_t)
    return ddim_unstep(x_next, guided_eps(teacher, x_next, t_next, y), a_t, b_t)


def golden_pairs(teacher, pair_filter, source, device, path):
    """(x_T, c, x_T') on the NoiseRefine pairs' own x_T, c and w, kept where the guided sample from x_T' gets
    more of the filter's confidence than the guided sample from x_T (which is x0_guide, already made and
    scored: the paper compares human-preference scores of the two images). Cached at path, with its cost."""
    if os.path.isfile(path):
        return torch.load(path, weights_only=True)
    start, x_T, y, w = time.perf_counter(), source["x_T"], source["y"], source["w"]
    golden, conf = [], []
    for i in tqdm(range(0, len(y), BATCH), desc="re-denoise pairs"):
        xb, yb, wb = x_T[i:i + BATCH].to(device), y[i:i + BATCH].to(device), w[i:i + BATCH].to(device)
        golden.append(redenoise(teacher, xb, yb, wb).cpu())
        image = data.to_uint8(sample_many(teacher, golden[-1], yb.cpu(), STEPS, wb.cpu()))
        conf.append(pair_filter.confidence(data.to_float(image), yb.cpu()))
    golden, conf = torch.cat(golden), torch.cat(conf)
    keep = conf > source["conf"]
    if not keep.any():
        raise BadInput(f"npnet: no re-denoised noise of the {len(y)} pairs gave a better guided sample than x_T")
    result = {"x_T": x_T[keep], "y": y[keep], "x_T_golden": golden[keep], "kept": int(keep.sum()), "of": len(y),
              "seconds": time.perf_counter() - start,
              "forwards_per_pair": 3 + 2 * STEPS}  # the step and inversion, then the guided sample from x_T'
    save_atomic(result, path)
    return result


def train_npnet(teacher, golden, t, device):
    """NPNet's training, on the same network as the refiner: g(x_T, c) = x_T + f(x_T, T, c), a copy of the
    teacher with a zero head, fitted by plain regression, ||g(x_T, c) - x_T'||^2, for the same steps and
    batch as every trained row. Where it differs from Golden Noise: their NPNet is its own network (a
    singular-value branch and a residual branch, fed a text embedding), their pairs come from SDXL with CFG
    5.5 and an HPSv2 filter, and they sample *with* CFG from the golden noise; here it is this teacher, the
    pairs' CFG scale and filter, and unguided sampling, so that the row answers this table's question."""
    return train_regression(teacher, golden["x_T"], golden["y"], golden["x_T_golden"], t, device, "npnet")


@torch.no_grad()
def inverted_targets(teacher, train_pairs, device, path):
    """The inverted row's target for every training pair: x0_guide run back to t = 999 by unguided DDIM
    inversion (diffusion.ddim_invert, N' steps): a guidance-free noise of the paper's §3.1, found by
    inversion instead of learned through the sampler. Cached at path, with its cost."""
    if os.path.isfile(path):
        return torch.load(path, weights_only=True)  # its name holds what decides it (teacher, pairs, filter)
    start, y, target = time.perf_counter(), train_pairs["y"], []
    for i in tqdm(range(0, len(y), BATCH), desc="inverted targets"):
        x0 = data.to_float(train_pairs["x0_guide"][i:i + BATCH]).to(device)
        target.append(ddim_invert(teacher, x0, y[i:i + BATCH].to(device), STEPS).cpu())
    result = {"target": torch.cat(target), "seconds": time.perf_counter() - start, "forwards_per_pair": STEPS}
    save_atomic(result, path)
    return result


def train_regression(teacher, x_T, y, target, t, device, desc):
    """g(x_T, c) = x_T + f(x_T, T, c) (the refiner's network, from the teacher with a zero head) fitted by
    ||g(x_T, c) - target||^2 in noise space: the loss the paper's Proposition 1 argues against."""
    g = Refiner(teacher, 0).to(device)
    params = [p for p in g.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=0.0, eps=t.adam_eps, foreach=True)
    gen = torch.Generator().manual_seed(t.seed)
    g.train()
    for step in tqdm(range(t.steps), desc=desc):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, t.steps, t.lr)
        idx = torch.randint(len(y), (t.batch_size,), generator=gen)
        loss = ((g(x_T[idx].to(device), y[idx].to(device)) - target[idx].to(device)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return g.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# The table: every trained row over several seeds, scored by the judge on the test bank
# ----------------------------------------------------------------------------------------------

# The paper's claims, each a (row, baseline) difference printed with its interval and verdict.
COMPARISONS = [("noiserefine", "cfg"), ("n5", "noiserefine"), ("nofilter", "noiserefine"),
               ("noiserefine", "scratch"), ("lora", "scratch"), ("lora", "noiserefine"),
               ("noiserefine", "gaussian_prior"),
               ("distill", "cfg"), ("noiserefine", "distill"), ("eps_scaled", "noiserefine"),
               ("refined_cfg", "noiserefine"), ("npnet", "gaussian"), ("noiserefine", "npnet"), ("npnet", "golden"),
               ("golden", "gaussian"), ("noiserefine", "inverted"),
               # the guidance table: refined against Gaussian noise with the same guidance, and each against CFG
               ("nr_pag", "pag"), ("nr_auto", "auto"), ("nr_interval", "interval"),
               ("pag", "cfg"), ("auto", "cfg"), ("interval", "cfg"),
               ("nr_pag", "noiserefine"), ("nr_auto", "noiserefine"), ("nr_interval", "noiserefine")]


def build_parser():
    d = Training()
    p = cli.Parser(__doc__)
    p.add_argument("--table", default="ablations", choices=list(TABLES), help="which table: the paper's "
                   "ablations (--out/ablate.json), or the guidance table (--out/guidance.json)")
    p.add_argument("--rows", nargs="+", default=None, choices=ALL_ROWS, help="which rows (default: the table's)")
    p.add_argument("--teacher", type=cli.checkpoint_file, default=None, help="teacher checkpoint (default: "
                   f"{teachers.DEFAULT_TEACHER}, the shipped teacher's copy, trained first if there is none)")
    p.add_argument("--steps", type=cli.integer(1), default=400, help="training steps of every trained row")
    p.add_argument("--lr", type=cli.number(0, 1, lo_open=True), default=d.lr, help="peak learning rate of every "
                   "trained row (the tables in docs/ablations.md and docs/guidance.md: 3e-4)")
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
    p.add_argument("--out", type=cli.folder, default="runs/ablate", help="output folder")
    p.add_argument("--device", type=cli.device, default="auto", help="auto, cpu, cuda, cuda:1, ...")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    args.rows = args.rows or TABLES[args.table]
    if len(set(args.seeds)) != len(args.seeds):
        die(f"--seeds must differ from each other, got {args.seeds}")
    return args


def row_training(row, args, seed):
    """A trained row's settings: the refiner's defaults, the shared budget, the row's change."""
    change = {k: v for k, v in TRAINED[row].items() if k not in ("filter", "lora_rank")}  # those are not training's
    return dataclasses.replace(Training(), steps=args.steps, batch_size=args.batch_size, val_every=args.steps,
                               seed=seed, **{"lr": args.lr, **change})  # a row's own lr wins


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
    model, refiner, w, seconds, guided = teacher, None, 0.0, 0.0, {}
    x_T, y = ctx["bank"]
    if row in GUIDED:  # Gaussian noise with a guidance, at the middle of its pairs' scale range
        s = pairs.for_guidance(GUIDED[row])
        w = sum(s.w_range) / 2
        guided = dict(guidance=ctx["guidance"](GUIDED[row]), pag=s.pag)
    elif row == "golden":  # NPNet's target itself: each held-out noise re-denoised, its forwards counted
        counter, start = ForwardCounter(teacher), time.perf_counter()
        x_T = torch.cat([redenoise(teacher, x_T[i:i + BATCH].to(device), y[i:i + BATCH].to(device),
                                   pairs.DISPLAY_W).cpu() for i in range(0, len(y), BATCH)])
        counter.remove()
        golden_cost = (counter.images / len(y), (time.perf_counter() - start) / len(y))
    elif row == "refined_cfg":  # the noiserefine row's refiner of this seed, as its training wrote it
        refiner = load_refiner(os.path.join(row_dir("noiserefine", args, seed), "ckpt.pt"), teacher, device)
        w = args.small_w
    elif row in TRAINED:
        t = row_training(row, args, seed)
        source = ctx["pairs_of"](ON_PAIRS.get(row, "cfg"))
        train_pairs, val = pairs.split_pairs(source, TRAINED[row].get("filter", args.filter), pairs.VAL_FRAC,
                                             t.batch_size)
        golden = ctx["golden"]() if row == "npnet" else None  # made (once) before the training clock starts
        inverted = ctx["inverted"](train_pairs) if row == "inverted" else None
        seed_everything(seed)
        start = time.perf_counter()
        if row == "distill":
            model = train_distilled(teacher, train_pairs, t, device)
        elif row == "npnet":
            refiner = train_npnet(teacher, golden, t, device)
        elif row == "inverted":
            if len(inverted["target"]) != len(train_pairs["y"]):
                raise BadInput(f"inverted targets: {len(inverted['target'])} cached for {len(train_pairs['y'])} "
                               f"training pairs; delete {args.out}/inverted to remake them")
            refiner = train_regression(teacher, train_pairs["x_T"], train_pairs["y"], inverted["target"], t, device,
                                       "inverted")
        else:
            ckpt = os.path.join(row_dir(row, args, seed), "ckpt.pt")
            meta = {"teacher_fingerprint": ctx["fingerprints"]["teacher"], "teacher": os.path.abspath(args.teacher),
                    "args": vars(args)}
            refiner = fit(make_refiner(row, ctx).to(device), teacher, train_pairs, val, t, device, ckpt, meta).merge()
        seconds = time.perf_counter() - start
    metrics, _, measured = run_regime(model, ctx["judge"], x_T, y, row, w, refiner=refiner, intervals=False, **guided)
    if row == "golden":  # the re-denoise step is part of this regime's cost
        metrics["nfe_per_image"] += golden_cost[0]
        metrics["sec_per_image"] += golden_cost[1]
        metrics["sec_per_image_range"] = [t + golden_cost[1] for t in metrics["sec_per_image_range"]]
    return metrics, measured, seconds


CACHE_VERSION = 2  # bump when a row's training or scoring changes in a way its settings do not show
GOLDEN_VERSION = 1  # the same for the npnet, golden and inverted rows' derived pairs and targets


def settings(row, seed, args, ctx):
    """Everything a cached row depends on: a change to any of them reruns the row."""
    training = dataclasses.asdict(row_training(row, args, seed)) if row in TRAINED else None
    if training and training["amp"] == "none":
        del training["amp"]  # rows cached before --amp existed stay valid (they ran in fp32)
    extra = {}  # what only the newer rows depend on (older rows' settings, and so their caches, stay as they were)
    name = GUIDED.get(row) or ON_PAIRS.get(row)
    if name and name != "cfg":
        extra = {"guidance": name, "pairs_dir": os.path.basename(ctx["pairs_dir"](name)),
                 "w_range": list(pairs.GUIDANCE_W[name])}
    if row in ("npnet", "inverted", "golden"):
        extra = {"golden": GOLDEN_VERSION}
    return {"version": CACHE_VERSION, "row": row, "seed": seed, "pairs": args.pairs, "filter": args.filter,
            **ctx["fingerprints"], "bank": args.bank, "eval_n": args.eval_n, "small_w": args.small_w,
            "change": TRAINED.get(row), "training": training, **extra}


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


def table_name(args):
    return "ablate" if args.table == "ablations" else args.table  # ablate.json: the name it always had


def npnet_cost(golden):
    """What the npnet row's pairs cost, beside the NoiseRefine pairs' 2N' forwards per pair."""
    info = {k: golden[k] for k in ("kept", "of", "seconds", "forwards_per_pair")}
    print(f"npnet pairs: kept {info['kept']} of {info['of']} (the guided sample from x_T' beat x0_guide's filter "
          f"confidence); {info['forwards_per_pair']} forwards per pair on top of the {2 * STEPS} of x0_guide, "
          f"{info['seconds']:.0f} s")
    return info


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
    teacher, tckpt, args.teacher = teachers.get_or_train(args.teacher, device)
    ds = tckpt["data"]
    K, size = len(ds["classes"]), ds["image_size"]
    pair_filter = load_filter(ds["dataset"], ds["data_dir"], size, device)
    judge = load_judge(ds["dataset"], ds["data_dir"], size, device)
    fp = fingerprint(teacher)
    guidance = functools.cache(lambda name: teachers.guidance(name, args.teacher, device))  # (Guidance, weak fp)

    def pairs_dir(name):  # the default refiner's pairs (seed 0), made with the guidance `name`
        return pairs.cache_dir(pairs.for_guidance(name, count=args.pairs), args.teacher, fp, guidance(name)[1])

    @functools.cache
    def pairs_of(name):
        return pairs.load_pairs(teacher, pair_filter, pairs.for_guidance(name, count=args.pairs), pairs_dir(name), K,
                                size, guidance(name)[0])

    # the derived caches are named by everything that decides them: the pairs (their folder's name holds the
    # teacher and the pairs' settings), the filter that scored them, the split, and this code's version
    derived = f"{os.path.basename(pairs_dir('cfg'))}_{pair_filter.fingerprint()}_v{GOLDEN_VERSION}"
    inverted = lambda train: inverted_targets(teacher, train, device, os.path.join(  # noqa: E731
        args.out, "inverted", f"targets_{derived}_{args.filter}_{pairs.VAL_FRAC}.pt"))
    golden = functools.cache(lambda: golden_pairs(teacher, pair_filter, pairs_of("cfg"), device,
                                                  os.path.join(args.out, "npnet", f"golden_{derived}.pt")))
    ctx = {"teacher": teacher, "judge": judge, "pairs_of": pairs_of, "pairs_dir": pairs_dir, "golden": golden,
           "inverted": inverted,
           "guidance": lambda name: guidance(name)[0], "device": device, "K": K, "size": size,
           "config": tckpt["config"], "bank": noises.bank(args.bank, args.eval_n, K, (3, size, size)),
           "fingerprints": {"teacher": fp, "judge": judge.trained.fingerprint(), "pair_filter": pair_filter.fingerprint()}}
    order = sorted(args.rows, key=(TABLES[args.table] + ALL_ROWS).index)
    if "refined_cfg" in order and "noiserefine" not in order:
        order.insert(order.index("refined_cfg"), "noiserefine")
    results = {}
    for row in order:
        seeds = [0] if row in UNTRAINED else args.seeds  # no training: nothing random to vary
        results[row] = []
        for seed in seeds:
            print(f"\n== {row}, seed {seed}")
            results[row].append(get_row(row, seed, ctx, args))
    rows = [summarise(row, results[row], judge) for row in order]
    print(f"\n{args.table}: {args.eval_n} held-out noises ({args.bank} bank), {STEPS} DDIM steps; trained rows: "
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
               "bank": args.bank, "args": vars(args), **({"npnet_pairs": npnet_cost(golden())} if "npnet" in results
                                                         else {})}, os.path.join(args.out, f"{table_name(args)}.json"))
    keys = ["name", "seeds", "class_acc", "fd_cls", "is_cls", "precision", "recall", "diversity", "nfe_per_image",
            "train_seconds"]
    write_atomic(os.path.join(args.out, f"{table_name(args)}.csv"),
                 lambda f: csv.writer(f).writerows([keys] + [[r[k] for k in keys] for r in rows]), mode="w")
    print(f"wrote {args.out}/{table_name(args)}.json and {args.out}/{table_name(args)}.csv")


if __name__ == "__main__":
    main()
