"""The paper's ablations (§4 of the paper, arXiv 2412.03895) on the embedded default, as one
table; and, beyond the paper, NoiseRefine on pairs made with other guidances.

    python ablate.py                   # every row, 3 seeds: 30 min on a 2-core CPU, pairs cached
    python ablate.py --rows n5 lora    # some rows
    python ablate.py --table guidance  # each guidance, from Gaussian and from refined noise

Same teacher, same guided pairs (the cache `train_refiner.py` made), same training budget
(--steps at batch 32), same held-out noises (the test bank), scored by the judge; every trained
row is trained with each of --seeds, and the table gives the mean, the spread over seeds and a
95% interval. The guidance table holds Gaussian noise with each guidance at the middle of its
scale range, and NoiseRefine trained on pairs made with that guidance, sampled unguided. Each row
is one function below, registered by @row; its docstring says what it is (--help lists them).

Writes --out/ablate.json (the guidance table: guidance.json) and the same .csv; a finished row
and seed is cached in --out/<row>/seed<k>/ and reused when its settings are unchanged.
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
from diffusion import (BATCH, DISPLAY_W, STEPS, T, ddim_coeffs, ddim_invert, ddim_step,
                       ddim_timesteps, ddim_unstep, guided_eps, q_sample, sample_many)
from metrics import (INTERVALS, ForwardCounter, Measured, judge_line, load_filter, load_judge,
                      print_difference, run_regime, seeds_interval)
from models import build_model
from noiserefine import (Refiner, RefinerSettings, add_lora, cosine_lr, fit, load_refiner,
                         lora_layers, prod_a)
from safety import BadInput, write_atomic

CACHE_VERSION = 2  # bump when a row's training or scoring changes in a way its settings do not show
GOLDEN_VERSION = 1  # the same for the Golden Noise code: re-denoising, its pairs, inverted targets


class GaussianPrior(nn.Module):
    """x_hat_T = mu_c + sigma_c * x_T, with (mu_c, log sigma_c) = MLP(class embedding): a
    per-class Gaussian (the paper's PAHI baseline). Its last layer starts at zero, so it starts as
    the identity, like g_phi."""
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
    """A LoRA (rank 8) on a copy of the teacher, trained so that its conditional eps equals the
    teacher's CFG eps, eps_c + w (eps_c - eps_u), on noised guided images
    x_t = q_sample(x0_guide, t, eps) with the pair's own w; sampled afterwards with one forward per
    step and no guidance."""
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
        x0 = data.to_float(train_pairs["x0_guide"][idx]).to(device)
        y, w = train_pairs["y"][idx].to(device), train_pairs["w"][idx].to(device)
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
    """Golden Noise's "re-denoise sampling" (Zhou et al. 2024, arXiv 2411.09502): one guided DDIM
    step from x_T (t = 999 to the next of the N' trailing steps), then one DDIM inversion step back
    to t = 999 with the conditional eps alone (their inversion CFG scale 1 is no guidance):
    x_T' = (x_t' - b_t eps_c(x_t')) / a_t. What the one guided step adds survives the round trip:
    x_T' ~ x_T + (b_t / a_t) w (eps_c - eps_u)."""
    t, t_next = ddim_timesteps(steps)[:2]
    a_t, b_t = ddim_coeffs(t, t_next)
    x_next = ddim_step(x_T, guided_eps(teacher, x_T, t, y, w), a_t, b_t)
    return ddim_unstep(x_next, guided_eps(teacher, x_next, t_next, y), a_t, b_t)


def golden_pairs(teacher, pair_filter, source, device, path):
    """(x_T, c, x_T') on the NoiseRefine pairs' own x_T, c and w, kept where the guided sample from
    x_T' gets more of the filter's confidence than the guided sample from x_T (which is x0_guide,
    already made and scored: the paper compares human-preference scores of the two images). Cached
    at path, with its cost."""
    if os.path.isfile(path):
        return torch.load(path, weights_only=True)
    start, x_T, y, w = time.perf_counter(), source["x_T"], source["y"], source["w"]
    golden, conf = [], []
    for i in tqdm(range(0, len(y), BATCH), desc="re-denoise pairs"):
        xb, yb = x_T[i:i + BATCH].to(device), y[i:i + BATCH].to(device)
        wb = w[i:i + BATCH].to(device)
        golden.append(redenoise(teacher, xb, yb, wb).cpu())
        image = data.to_uint8(sample_many(teacher, golden[-1], yb.cpu(), STEPS, wb.cpu()))
        conf.append(pair_filter.confidence(data.to_float(image), yb.cpu()))
    golden, conf = torch.cat(golden), torch.cat(conf)
    keep = conf > source["conf"]
    if not keep.any():
        raise BadInput(f"npnet: no re-denoised noise of the {len(y)} pairs gave a better guided "
                       "sample than x_T")
    result = {"x_T": x_T[keep], "y": y[keep], "x_T_golden": golden[keep], "kept": int(keep.sum()),
              "of": len(y), "seconds": time.perf_counter() - start,
              "forwards_per_pair": 3 + 2 * STEPS}  # step and inversion, guided sample from x_T'
    save_atomic(result, path)
    return result


def train_npnet(teacher, golden, t, device):
    """NPNet's training, on the same network as the refiner: g(x_T, c) = x_T + f(x_T, T, c), a copy
    of the teacher with a zero head, fitted by plain regression, ||g(x_T, c) - x_T'||^2, for the
    same steps and batch as every trained row. Where it differs from Golden Noise: their NPNet is
    its own network (a singular-value branch and a residual branch, fed a text embedding), their
    pairs come from SDXL with CFG 5.5 and an HPSv2 filter, and they sample *with* CFG from the
    golden noise; here it is this teacher, the pairs' CFG scale and filter, and unguided sampling,
    so that the row answers this table's question."""
    return train_regression(teacher, golden["x_T"], golden["y"], golden["x_T_golden"], t, device,
                            "npnet")


@torch.no_grad()
def inverted_targets(teacher, train_pairs, device, path):
    """The inverted row's target for every training pair: x0_guide run back to t = 999 by unguided
    DDIM inversion (diffusion.ddim_invert, N' steps): a guidance-free noise of the paper's §3.1,
    found by inversion instead of learned through the sampler. Cached at path, with its cost."""
    if os.path.isfile(path):  # its name holds what decides it (teacher, pairs, filter)
        return torch.load(path, weights_only=True)
    start, y, target = time.perf_counter(), train_pairs["y"], []
    for i in tqdm(range(0, len(y), BATCH), desc="inverted targets"):
        x0 = data.to_float(train_pairs["x0_guide"][i:i + BATCH]).to(device)
        target.append(ddim_invert(teacher, x0, y[i:i + BATCH].to(device), STEPS).cpu())
    result = {"target": torch.cat(target), "seconds": time.perf_counter() - start,
              "forwards_per_pair": STEPS}
    save_atomic(result, path)
    return result


def train_regression(teacher, x_T, y, target, t, device, desc):
    """g(x_T, c) = x_T + f(x_T, T, c) (the refiner's network, from the teacher with a zero head)
    fitted by ||g(x_T, c) - target||^2 in noise space: the loss the paper's Proposition 1 argues
    against."""
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
# Rows: one function each, listed by @row. A row function gets its Row, a seed, the shared ctx
# (context() below) and the flags; it returns (scores, what the judge measured, training seconds).
# ----------------------------------------------------------------------------------------------

ALL_ROWS = {}  # name: Row, in the order the tables show them; @row fills it


@dataclasses.dataclass(frozen=True)
class Row:
    """A row as @row lists it. change: a trained row's change to the shared settings ({}: none;
    None: it trains nothing). guidance: the diffusion.GUIDANCES name of its pairs or of its
    sampling (None: neither). needs: the trained row whose refiner of the same seed it samples.
    compare: the differences (a, b), a - b, printed with their intervals and verdicts. version:
    bump it when the row's own code changes in a way its settings do not show."""
    name: str
    run: object  # the row function
    tables: tuple
    change: dict = None
    guidance: str = "cfg"
    needs: str = None
    compare: tuple = ()
    version: int = 0

    @property
    def seeded(self):
        """Whether a training seed reaches it (its own, or the row's it needs)."""
        return self.change is not None or self.needs is not None


def row(*tables, **fields):
    """Lists the function below as a row of `tables`, under the function's name (fields: Row's)."""
    def register(run):
        ALL_ROWS[run.__name__] = Row(run.__name__, run, tables, **fields)
        return run
    return register


def score(r, ctx, seconds=0.0, model=None, x_T=None, **regime):
    """What a row function returns: the held-out noises (or x_T in their place) sampled by model
    (default: the teacher) in the regime (w, refiner, guidance, pag of metrics.run_regimes) and
    judged, beside the row's training seconds."""
    bank, y = ctx["bank"]
    metrics, _, measured = run_regime(ctx["teacher"] if model is None else model, ctx["judge"],
                                      bank if x_T is None else x_T, y, r.name, intervals=False,
                                      **regime)
    return metrics, measured, seconds


def guided(r, ctx):
    """Gaussian noise with the row's guidance, at the middle of its pairs' scale range."""
    s = pairs.for_guidance(r.guidance)
    return score(r, ctx, w=sum(s.w_range) / 2, guidance=ctx["guidance"](r.guidance), pag=s.pag)


def row_training(r, seed, args):
    """A trained row's settings: the refiner's defaults, the shared budget, the row's change."""
    # the pairs' filter and the network's rank are the row's, not the training's
    change = {k: v for k, v in r.change.items() if k not in ("filter", "lora_rank")}
    return dataclasses.replace(RefinerSettings(), steps=args.steps, batch_size=args.batch_size,
                               val_every=args.steps, seed=seed,
                               **{"lr": args.lr, **change})  # a row's own lr wins


def row_dir(name, args, seed):
    return os.path.join(args.out, name, f"seed{seed}")


def row_pairs(r, seed, ctx, args):
    """(settings, training pairs, validation pairs) of a trained row: the pairs of its guidance,
    through the quality filter (--filter, or the row's own)."""
    t = row_training(r, seed, args)
    train, val = pairs.split_pairs(ctx["pairs_of"](r.guidance), r.change.get("filter", args.filter),
                                   pairs.VAL_FRAC, t.batch_size)
    return t, train, val


def timed_training(seed, train):
    """(train(), its seconds) from seed_everything(seed): every trained row's random draws start
    there, and its clock leaves out the pairs and caches made before."""
    seed_everything(seed)
    start = time.perf_counter()
    trained = train()
    return trained, time.perf_counter() - start


def make_refiner(r, ctx):
    """g_phi as the paper builds it: a copy of the teacher with a zero head, trained whole or (with
    the row's lora_rank) through LoRA."""
    return Refiner(ctx["teacher"], r.change.get("lora_rank", 0))


def msd_row(r, seed, ctx, args, network):
    """network() (built after seeding: its initial weights are the seed's) trained with L_MSD on the
    row's pairs, as train_refiner.py trains g_phi; its noise sampled unguided."""
    t, train, val = row_pairs(r, seed, ctx, args)
    ckpt = os.path.join(row_dir(r.name, args, seed), "ckpt.pt")
    meta = {"teacher_fingerprint": ctx["fingerprints"]["teacher"],
            "teacher": os.path.abspath(args.teacher), "args": vars(args)}
    teacher, device = ctx["teacher"], ctx["device"]
    refiner, seconds = timed_training(seed, lambda: fit(network().to(device), teacher, train, val,
                                                        t, device, ckpt, meta).merge())
    return score(r, ctx, seconds, refiner=refiner)


# ----------------------------------------------------------------------------------------------
# The rows of both tables, the ablations, then the guidance table's own
# ----------------------------------------------------------------------------------------------


@row("ablations", "guidance", guidance=None)
def gaussian(r, seed, ctx, args):
    """Gaussian noise, unguided: no training."""
    return score(r, ctx)


@row("ablations", "guidance")
def cfg(r, seed, ctx, args):
    """Gaussian noise with CFG (w = 3), the paper's guidance."""
    return guided(r, ctx)


@row("ablations", "guidance", change={}, compare=[("noiserefine", "cfg")])
def noiserefine(r, seed, ctx, args):
    """The default refiner: N = 10 MSD steps, quality filter on, whole copy fine-tuned."""
    return msd_row(r, seed, ctx, args, lambda: make_refiner(r, ctx))


@row("ablations", change={"msd_steps": 5}, compare=[("n5", "noiserefine")])
def n5(r, seed, ctx, args):
    """N = 5 MSD steps (paper: FID 13.74 at N = 5 vs 13.36 at N = 10)."""
    return msd_row(r, seed, ctx, args, lambda: make_refiner(r, ctx))


@row("ablations", change={"filter": 0.0}, compare=[("nofilter", "noiserefine")])
def nofilter(r, seed, ctx, args):
    """Every pair, no quality filter (paper Tab. 3: 15.27 without vs 13.55 with)."""
    return msd_row(r, seed, ctx, args, lambda: make_refiner(r, ctx))


@row("ablations", change={"lora_rank": 8, "lr": 1e-3}, compare=[("lora", "noiserefine")])
def lora(r, seed, ctx, args):
    """The pretrained copy with LoRA rank 8: the paper's refiner."""
    return msd_row(r, seed, ctx, args, lambda: make_refiner(r, ctx))


@row("ablations", change={}, compare=[("noiserefine", "scratch"), ("lora", "scratch")])
def scratch(r, seed, ctx, args):
    """The same network from a random initialisation (paper Tab. 5: 37.87 vs 13.74).
    All of it is trained, as none of it is the teacher's."""
    return msd_row(r, seed, ctx, args, lambda: Refiner(build_model(ctx["config"]), 0))


@row("ablations", change={"lr": 1e-2}, compare=[("noiserefine", "gaussian_prior")])
def gaussian_prior(r, seed, ctx, args):
    """A per-class Gaussian from an MLP, the paper's PAHI baseline (Tab. 7: FID 217.3).
    x_hat_T = mu_c + sigma_c x_T, a mean and a diagonal std per class (GaussianPrior), trained with
    L_MSD as the refiner is."""
    return msd_row(r, seed, ctx, args, lambda: GaussianPrior(ctx["K"], ctx["size"]))


@row("ablations", change={"lr": 1e-3}, compare=[("distill", "cfg"), ("noiserefine", "distill")])
def distill(r, seed, ctx, args):
    """Guidance distillation, the competing approach (paper Fig. 11).
    LoRA on the teacher trained to output the CFG eps directly (train_distilled), then sampled
    unguided from Gaussian noise."""
    t, train, _ = row_pairs(r, seed, ctx, args)
    student, seconds = timed_training(seed, lambda: train_distilled(ctx["teacher"], train, t,
                                                                    ctx["device"]))
    return score(r, ctx, seconds, model=student)


@row("ablations", change={"adam_eps": 1e-8 * prod_a(10) ** 2},
     compare=[("eps_scaled", "noiserefine")])
def eps_scaled(r, seed, ctx, args):
    """L_MSD / prod(a_t)^2 before AdamW: this repository's former default.
    Run as its equivalent, AdamW's eps times prod(a_t)^2; eps then dominates sqrt(v) for most
    weights early in training."""
    return msd_row(r, seed, ctx, args, lambda: make_refiner(r, ctx))


@row("ablations", needs="noiserefine", compare=[("refined_cfg", "noiserefine")])
def refined_cfg(r, seed, ctx, args):
    """The noiserefine refiner's noise with a small CFG (--small-w, 0.5): no training.
    The refiner of the same seed, as the noiserefine row's training wrote it."""
    path = os.path.join(row_dir(r.needs, args, seed), "ckpt.pt")
    return score(r, ctx, refiner=load_refiner(path, ctx["teacher"], ctx["device"]), w=args.small_w)


@row("ablations", change={}, version=GOLDEN_VERSION,
     compare=[("npnet", "gaussian"), ("noiserefine", "npnet"), ("npnet", "golden")])
def npnet(r, seed, ctx, args):
    """Golden Noise / NPNet (Zhou et al. 2024, arXiv 2411.09502): regression, not MSD.
    The same network trained by regression onto re-denoised noises (golden_pairs); train_npnet
    says where it differs from theirs."""
    t, _, _ = row_pairs(r, seed, ctx, args)  # its own pairs, but every row's budget and split check
    golden_set = ctx["golden_pairs"]()  # made (once) before the training clock starts
    refiner, seconds = timed_training(seed, lambda: train_npnet(ctx["teacher"], golden_set, t,
                                                                ctx["device"]))
    return score(r, ctx, seconds, refiner=refiner)


@row("ablations", version=GOLDEN_VERSION, compare=[("golden", "gaussian")])
def golden(r, seed, ctx, args):
    """NPNet's target itself: each held-out noise re-denoised (w = 3), sampled unguided.
    No training: what the regression could at best learn. The re-denoising is part of this
    regime's cost: its forwards are counted, its time added to every timing round's."""
    teacher, device = ctx["teacher"], ctx["device"]
    x_T, y = ctx["bank"]
    counter, start = ForwardCounter(teacher), time.perf_counter()
    x_T = torch.cat([redenoise(teacher, x_T[i:i + BATCH].to(device), y[i:i + BATCH].to(device),
                               DISPLAY_W).cpu() for i in range(0, len(y), BATCH)])
    counter.remove()
    forwards, seconds = counter.images / len(y), (time.perf_counter() - start) / len(y)
    metrics, measured, _ = score(r, ctx, x_T=x_T)
    metrics["nfe_per_image"] += forwards
    metrics["sec_per_image"] += seconds
    metrics["sec_per_image_range"] = [s + seconds for s in metrics["sec_per_image_range"]]
    return metrics, measured, 0.0


@row("ablations", change={}, version=GOLDEN_VERSION, compare=[("noiserefine", "inverted")])
def inverted(r, seed, ctx, args):
    """Regression onto x0_guide inverted by unguided DDIM, a guidance-free noise (§3.1).
    The inversion runs on NoiseRefine's own training pairs (inverted_targets); MSD is replaced by a
    noise-space loss."""
    t, train, _ = row_pairs(r, seed, ctx, args)
    target = ctx["inverted_targets"](train)["target"]
    if len(target) != len(train["y"]):
        raise BadInput(f"inverted targets: {len(target)} cached for {len(train['y'])} training "
                       f"pairs; delete {args.out}/inverted to remake them")
    refiner, seconds = timed_training(seed, lambda: train_regression(
        ctx["teacher"], train["x_T"], train["y"], target, t, ctx["device"], "inverted"))
    return score(r, ctx, seconds, refiner=refiner)


@row("guidance", guidance="cfg+pag", compare=[("pag", "cfg")])
def pag(r, seed, ctx, args):
    """Gaussian noise with CFG + PAG (scale 2), the paper's Pick-a-Pic recipe."""
    return guided(r, ctx)


@row("guidance", change={}, guidance="cfg+pag",
     compare=[("nr_pag", "pag"), ("nr_pag", "noiserefine")])
def nr_pag(r, seed, ctx, args):
    """NoiseRefine trained on pairs made with CFG + PAG, sampled unguided."""
    return msd_row(r, seed, ctx, args, lambda: make_refiner(r, ctx))


@row("guidance", guidance="autoguidance", compare=[("auto", "cfg")])
def auto(r, seed, ctx, args):
    """Gaussian noise with autoguidance (Karras et al. 2024).
    The teacher guided by its own early checkpoint."""
    return guided(r, ctx)


@row("guidance", change={}, guidance="autoguidance",
     compare=[("nr_auto", "auto"), ("nr_auto", "noiserefine")])
def nr_auto(r, seed, ctx, args):
    """NoiseRefine trained on pairs made with autoguidance, sampled unguided."""
    return msd_row(r, seed, ctx, args, lambda: make_refiner(r, ctx))


@row("guidance", guidance="interval", compare=[("interval", "cfg")])
def interval(r, seed, ctx, args):
    """Gaussian noise with CFG on a sigma interval only (Kynkaanniemi et al. 2024).
    CFG where sigma_t is in diffusion.INTERVAL, no guidance elsewhere."""
    return guided(r, ctx)


@row("guidance", change={}, guidance="interval",
     compare=[("nr_interval", "interval"), ("nr_interval", "noiserefine")])
def nr_interval(r, seed, ctx, args):
    """NoiseRefine trained on pairs made with the guidance interval, sampled unguided."""
    return msd_row(r, seed, ctx, args, lambda: make_refiner(r, ctx))


# What the rows' listing decides: each table's rows, which rows train, which need one seed, and
# the paper's claims, each a (row, baseline) difference printed with its interval and verdict.
TABLES = {table: [name for name, r in ALL_ROWS.items() if table in r.tables]
          for table in ("ablations", "guidance")}
ROWS = TABLES["ablations"]
TRAINED = {name: r.change for name, r in ALL_ROWS.items() if r.change is not None}
UNTRAINED = {name for name, r in ALL_ROWS.items() if not r.seeded}  # nothing random: one seed
COMPARISONS = [pair for r in ALL_ROWS.values() for pair in r.compare]


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------


def row_lists():
    """For --help: each table's rows, each with the first line of its function's docstring."""
    return "".join(f"\n--table {table}:\n" + "\n".join(
        f"    {name:<15}{ALL_ROWS[name].run.__doc__.splitlines()[0]}" for name in names) + "\n"
        for table, names in TABLES.items())


def build_parser():
    d = RefinerSettings()
    p = cli.Parser(__doc__ + row_lists())
    p.add_argument("--table", default="ablations", choices=list(TABLES),
                   help="which table: the paper's ablations (--out/ablate.json), or the guidance "
                   "table (--out/guidance.json)")
    p.add_argument("--rows", nargs="+", default=None, choices=list(ALL_ROWS),
                   help="which rows (default: the table's)")
    p.add_argument("--teacher", type=cli.checkpoint_file, default=None,
                   help=f"teacher checkpoint (default: {teachers.DEFAULT_TEACHER}, the shipped "
                   "teacher's copy)")
    p.add_argument("--steps", type=cli.integer(1), default=400,
                   help="training steps of every trained row")
    p.add_argument("--lr", type=cli.number(0, 1, lo_open=True), default=d.lr,
                   help="peak learning rate of every trained row (the tables in docs/ablations.md "
                   "and docs/guidance.md: 3e-4)")
    p.add_argument("--pairs", type=cli.integer(1, 10 ** 8), default=pairs.PairSettings().count,
                   help="the pairs budget (the default refiner's)")
    p.add_argument("--batch-size", type=cli.integer(1, 65536), default=d.batch_size,
                   help="batch of every trained row")
    p.add_argument("--filter", type=cli.number(0, 1, hi_open=True), default=pairs.FILTER,
                   help="the quality filter of every row but nofilter")
    p.add_argument("--small-w", type=cli.number(0, 100), default=0.5,
                   help="CFG scale of the refined_cfg row")
    p.add_argument("--eval-n", type=cli.integer(10, 10 ** 7), default=1000,
                   help="held-out noises per row")
    p.add_argument("--bank", default="test", choices=noises.BANKS,
                   help="held-out noises (dev: for choosing)")
    p.add_argument("--seeds", type=cli.SEED, nargs="+", default=[0, 1, 2], help="training seeds of "
                   "every trained row (the pairs and the noises stay the same)")
    p.add_argument("--out", type=cli.folder, default="runs/ablate", help="output folder")
    p.add_argument("--device", type=cli.device, default="auto", help="auto, cpu, cuda, cuda:1, ...")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    args.rows = args.rows or TABLES[args.table]
    if len(set(args.seeds)) != len(args.seeds):
        die(f"--seeds must differ from each other, got {args.seeds}")
    return args


# ----------------------------------------------------------------------------------------------
# The table: every row and seed, from its cache when its settings are unchanged
# ----------------------------------------------------------------------------------------------


def pairs_dir(guidance, args, ctx):
    """The folder of the pairs made with `guidance` (the default refiner's, seed 0): its name holds
    the teacher, the pairs' settings and, for autoguidance, the weak model."""
    # autoguidance is the one guidance with a network of its own
    weak = ctx["weak_fingerprint"]() if guidance == "autoguidance" else None
    return pairs.cache_dir(pairs.for_guidance(guidance, count=args.pairs), args.teacher,
                           ctx["fingerprints"]["teacher"], weak)


def settings(name, seed, args, ctx):
    """Everything a cached row depends on: a change to any of them reruns the row."""
    r = ALL_ROWS[name]
    training = None if r.change is None else dataclasses.asdict(row_training(r, seed, args))
    folder = None if r.guidance is None else os.path.basename(pairs_dir(r.guidance, args, ctx))
    return {"version": [CACHE_VERSION, r.version], "row": name, "seed": seed, "pairs": args.pairs,
            "filter": args.filter, **ctx["fingerprints"], "bank": args.bank, "eval_n": args.eval_n,
            "small_w": args.small_w, "change": r.change, "training": training,
            "guidance": r.guidance, "pairs_dir": folder,
            "needs": None if r.needs is None else settings(r.needs, seed, args, ctx)}


def get_row(name, seed, ctx, args):
    """(scores, measured, seconds) of one row and seed, from its cache when its settings are
    unchanged."""
    folder = row_dir(name, args, seed)
    path = os.path.join(folder, "metrics.json")
    if os.path.isfile(path) and os.path.isfile(os.path.join(folder, "measured.pt")):
        saved = json.load(open(path))
        if saved["settings"] == settings(name, seed, args, ctx):
            m = torch.load(os.path.join(folder, "measured.pt"), weights_only=True)
            return saved["row"], Measured(**m), saved["train_seconds"]
    r = ALL_ROWS[name]
    metrics, measured, seconds = r.run(r, seed, ctx, args)
    os.makedirs(folder, exist_ok=True)
    # not the bootstrap cache: it depends on the resample count
    save_atomic({"feats": measured.feats, "probs": measured.probs, "labels": measured.labels},
                os.path.join(folder, "measured.pt"))
    save_json({"settings": settings(name, seed, args, ctx), "row": metrics,
               "train_seconds": seconds}, path)
    return metrics, measured, seconds


def run_order(args):
    """The rows asked for, in table order, each after the row it needs."""
    order = sorted(args.rows, key=(TABLES[args.table] + list(ALL_ROWS)).index)
    for name in list(order):
        need = ALL_ROWS[name].needs
        if need is not None and need not in order:
            order.insert(order.index(name), need)
    return order


def summarise(name, results, judge):
    """One table row over seeds: mean scores, min-max over seeds, and 95% intervals over noises and
    seeds."""
    metrics = [m for m, _, _ in results]
    runs = [r for _, r, _ in results]
    keys = ("class_acc", "fd_cls", "is_cls", "precision", "recall", "diversity", "nfe_per_image")
    mean = {k: statistics.mean(m[k] for m in metrics) for k in keys}
    mean["train_seconds"] = statistics.mean(s for _, _, s in results)
    for key in ("class_acc", "fd_cls"):
        mean[f"{key}_seeds"] = [min(m[key] for m in metrics), max(m[key] for m in metrics)]
        mean[f"{key}_ci"] = seeds_interval(judge, runs, key=key)[1:]
    return {"name": name, "seeds": len(results), **mean}


def table_name(args):
    """The output files' name: ablate.json and .csv for the ablations, guidance.* for the other."""
    return "ablate" if args.table == "ablations" else args.table


def npnet_cost(golden_set):
    """What the npnet row's pairs cost, beside the NoiseRefine pairs' 2N' forwards per pair."""
    info = {k: golden_set[k] for k in ("kept", "of", "seconds", "forwards_per_pair")}
    print(f"npnet pairs: kept {info['kept']} of {info['of']} (the guided sample from x_T' beat "
          f"x0_guide's filter confidence); {info['forwards_per_pair']} forwards per pair on top of "
          f"the {2 * STEPS} of x0_guide, {info['seconds']:.0f} s")
    return info


def print_rows(rows):
    cells = []
    for r in rows:
        a, a_seeds = r["class_acc_ci"], r["class_acc_seeds"]
        fd, fd_seeds = r["fd_cls_ci"], r["fd_cls_seeds"]
        cells.append([r["name"], r["seeds"],
                      f"{r['class_acc']:.3f} [{a[0]:.3f}, {a[1]:.3f}] "
                      f"({a_seeds[0]:.3f}-{a_seeds[1]:.3f})",
                      f"{r['fd_cls']:.2f} [{fd[0]:.2f}, {fd[1]:.2f}] "
                      f"({fd_seeds[0]:.2f}-{fd_seeds[1]:.2f})",
                      f"{r['is_cls']:.2f}", f"{r['precision']:.3f}", f"{r['recall']:.3f}",
                      f"{r['diversity']:.3f}", f"{r['nfe_per_image']:.1f}",
                      f"{r['train_seconds']:.0f}"])
    print_table(["row", "seeds", "class_acc [95% CI] (seed min-max)",
                 "FD_cls [95% CI] (seed min-max)", "IS_cls", "precision", "recall", "diversity",
                 "NFE/img", "train s"], cells)


def context(args):
    """What every row reads (ctx): the teacher, the judge, the filter, the held-out noises, and the
    pairs and the Golden Noise caches, each made when a row first asks for it."""
    device = resolve_device(args.device)
    seed_everything(0)
    teacher, tckpt, args.teacher = teachers.pretrained(args.teacher, device)
    ds = tckpt["data"]
    K, size = len(ds["classes"]), ds["image_size"]
    pair_filter = load_filter(ds["dataset"], ds["data_dir"], size, device)
    judge = load_judge(ds["dataset"], ds["data_dir"], size, device)
    fp = fingerprint(teacher)
    # (Guidance, the weak model's fingerprint) of a guidance name, the weak model loaded once
    guidance = functools.cache(lambda name: teachers.guidance(name, args.teacher, device))
    ctx = {"teacher": teacher, "judge": judge, "pair_filter": pair_filter, "device": device,
           "K": K, "size": size, "config": tckpt["config"],
           "guidance": lambda name: guidance(name)[0],
           "weak_fingerprint": lambda: guidance("autoguidance")[1],
           "bank": noises.bank(args.bank, args.eval_n, K, (3, size, size)),
           "fingerprints": {"teacher": fp, "judge": judge.trained.fingerprint(),
                            "pair_filter": pair_filter.fingerprint()}}
    ctx["pairs_of"] = functools.cache(lambda name: pairs.load_pairs(
        teacher, pair_filter, pairs.for_guidance(name, count=args.pairs),
        pairs_dir(name, args, ctx), K, size, guidance(name)[0]))
    # the derived caches are named by everything that decides them: the pairs (their folder's name
    # holds the teacher and the pairs' settings), the filter that scored them, the split, and this
    # code's version
    derived = (f"{os.path.basename(pairs_dir('cfg', args, ctx))}_{pair_filter.fingerprint()}"
               f"_v{GOLDEN_VERSION}")
    ctx["golden_pairs"] = functools.cache(lambda: golden_pairs(
        teacher, pair_filter, ctx["pairs_of"]("cfg"), device,
        os.path.join(args.out, "npnet", f"golden_{derived}.pt")))
    ctx["inverted_targets"] = lambda train: inverted_targets(teacher, train, device, os.path.join(
        args.out, "inverted", f"targets_{derived}_{args.filter}_{pairs.VAL_FRAC}.pt"))
    return ctx


@entry_point
def main(argv=None):
    args = parse_args(argv)
    ctx = context(args)
    judge, pair_filter = ctx["judge"], ctx["pair_filter"]
    order = run_order(args)
    results = {}
    for name in order:
        results[name] = []
        for seed in args.seeds if ALL_ROWS[name].seeded else [0]:
            print(f"\n== {name}, seed {seed}")
            results[name].append(get_row(name, seed, ctx, args))
    rows = [summarise(name, results[name], judge) for name in order]
    print(f"\n{args.table}: {args.eval_n} held-out noises ({args.bank} bank), {STEPS} DDIM steps; "
          f"trained rows: {args.steps} steps at batch {args.batch_size} on the same {args.pairs} "
          f"pairs, seeds {args.seeds}; 95% intervals from a bootstrap over noises and seeds\n"
          f"{judge_line(judge, pair_filter)}")
    print_rows(rows)
    comparisons = {}
    for a, b in COMPARISONS:
        if a in results and b in results:
            runs = ([r for _, r, _ in results[a]], [r for _, r, _ in results[b]])
            comparisons[f"{a} - {b}"] = {key: seeds_interval(judge, *runs, key=key)
                                         for key in INTERVALS}
            print_difference(a, b, comparisons[f"{a} - {b}"])
    report = {"rows": rows, "comparisons": comparisons, "judge": judge.info(),
              "filter": pair_filter.info(), "bank": args.bank, "args": vars(args)}
    if "npnet" in results:
        report["npnet_pairs"] = npnet_cost(ctx["golden_pairs"]())
    save_json(report, os.path.join(args.out, f"{table_name(args)}.json"))
    keys = ["name", "seeds", "class_acc", "fd_cls", "is_cls", "precision", "recall", "diversity",
            "nfe_per_image", "train_seconds"]
    write_atomic(os.path.join(args.out, f"{table_name(args)}.csv"),
                 lambda f: csv.writer(f).writerows([keys] + [[r[k] for k in keys] for r in rows]),
                 mode="w")
    print(f"wrote {args.out}/{table_name(args)}.json and {args.out}/{table_name(args)}.csv")


if __name__ == "__main__":
    main()
