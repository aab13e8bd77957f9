"""NoiseRefine: a one-shot refinement of the initial noise that replaces classifier-free guidance.

Paper: Ahn et al., "A Noise is Worth Diffusion Guidance", arXiv 2412.03895v1. Equation numbers are
those of v1; they move between versions. Names used here:

    x_T        Gaussian initial noise, N(0, I)
    c, y       the condition (a class label here)
    x0_guide   DenoiseGuide(x_T, c): the image that N' guided DDIM steps make from x_T (eq. 1-2)
    g_phi      the refiner: x_hat_T = g_phi(x_T, c) = x_T + f_phi(x_T, T, c)  (eq. 3)
    a_t, b_t   one DDIM step as an affine map, x_{t-1} = a_t x_t + b_t eps    (eq. 1; diffusion.py)
    SG         stop-gradient: the value flows forward, no gradient flows back
    F_t        F_t(x) = a_t x + b_t SG(eps_theta(x, t, c))                    (eq. 4)
    MSD        multistep score distillation, L_MSD = ||F_1(...F_T(x_hat_T)) - x0_guide||^2  (eq. 5)

Inference: refine once (one forward), then sample with no guidance: N + 1 forwards instead of 2N.
The guided pairs (x_T, c, x0_guide) the refiner learns from are made in pairs.py.
"""
import copy
import dataclasses
import math

import torch
import torch.nn as nn
from tqdm import tqdm

from accel import autocast
from checkpoint import FORMAT, Keeper, fingerprint, load_checkpoint
from diffusion import T, ddim_schedule, ddim_step, timestep_batch
from pairs import batch_of
from safety import BadInput

# ----------------------------------------------------------------------------------------------
# LoRA (Hu et al., arXiv 2106.09685), from scratch
# ----------------------------------------------------------------------------------------------


class LoRA(nn.Module):
    """base(x) + (alpha / r) up(down(x)) around a frozen nn.Linear or nn.Conv2d.

    `up` starts at zero, so an adapted layer starts exactly equal to its base layer. For a conv,
    `down` has the base's kernel, stride and padding and `up` is 1x1, so the update is a rank-r
    conv.
    """

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        else:
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride,
                                  base.padding, bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.merged = False

    def delta_weight(self):
        """The update as a weight of the base layer's shape: scale * up @ down."""
        # BEGIN SOLUTION
        up, down = self.up.weight.flatten(1), self.down.weight  # up: (out, r)
        return self.scale * torch.einsum("or,r...->o...", up, down)
        # END SOLUTION

    @torch.no_grad()
    def merge(self):
        """Fold the update into the base weight: inference then costs what the base layer costs."""
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False

    def forward(self, x):
        """base(x) + scale * up(down(x)); once merged, the update already sits in base's weight."""
        # BEGIN SOLUTION
        out = self.base(x)
        return out if self.merged else out + self.scale * self.up(self.down(x))
        # END SOLUTION


def add_lora(model, rank, alpha, skip=()):
    """Wrap every nn.Linear and nn.Conv2d of `model` (attention, convolution, feed-forward and
    embedding MLPs) in LoRA, except the modules in `skip`. Returns the number of adapters added."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (nn.Linear, nn.Conv2d)) and not any(child is s for s in skip):
                setattr(module, name, LoRA(child, rank, alpha))
                count += 1
    return count


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRA)]


# ----------------------------------------------------------------------------------------------
# The refiner g_phi (eq. 3)
# ----------------------------------------------------------------------------------------------


class Refiner(nn.Module):
    """x_hat_T = g_phi(x_T, c) = x_T + f_phi(x_T, T, c), with f_phi a copy of the teacher network.

    Why a fresh head: at t = 999 the teacher's own eps-output is already close to x_T (x_999 is
    almost pure noise), so x_T + eps_theta(x_T) would double the noise. Instead the copy's output
    layer is re-initialised to zero: f_phi = 0 and g_phi is exactly the identity at initialisation,
    and the adapted trunk learns only the (small, low-frequency) correction. One network forward per
    refinement.

    rank > 0: LoRA adapters on every other layer, base weights frozen (the paper's choice, for its
    large teachers); rank = 0: the whole copy is fine-tuned (train_refiner.py's default and every
    table's here: on the 0.67M-parameter teacher it did better, docs/ablations.md).
    """

    def __init__(self, teacher, rank=8, alpha=None):
        super().__init__()
        self.rank, self.alpha = rank, alpha if alpha is not None else rank
        self.net = copy.deepcopy(teacher).requires_grad_(False)
        head = self.net.output_layer()
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        if rank > 0:
            add_lora(self.net, rank, self.alpha, skip=[head])
        else:
            self.net.requires_grad_(True)
        head.requires_grad_(True)

    def forward(self, x_T, y):
        """x_hat_T = g_phi(x_T, c) = x_T + f_phi(x_T, T, c), eq. (3): one forward of the copy at
        t = T - 1."""
        # BEGIN SOLUTION
        # x_hat_T = x_T + f_phi(x_T, T, c)
        return x_T + self.net(x_T, timestep_batch(T - 1, x_T), y)
        # END SOLUTION

    def trainable_state(self):
        """A copy of what training changes (adapters and head, or everything for rank 0): what a
        checkpoint holds. Cloned: state_dict() shares storage with the live weights, so a snapshot
        kept without a copy (the best validation step's) would move with every later optimiser
        step."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v.detach().clone() for k, v in self.state_dict().items() if k in names}

    def merge(self):
        for layer in lora_layers(self):
            layer.merge()
        return self


# ----------------------------------------------------------------------------------------------
# The losses: L_MSD (eq. 4-5) and the full-backprop L_Denoise (eq. 2)
# ----------------------------------------------------------------------------------------------


def msd_loss(teacher, x_hat_T, y, x0_guide, steps=10):
    """L_MSD = mean (F_1(...F_T(x_hat_T)) - x0_guide)^2,
    F_t(x) = a_t x + b_t SG(eps_theta(x, t, c)).

    Every eps is computed under no_grad (SG), so no graph is built through the N teacher calls: the
    gradient reaches x_hat_T only through the chain of a_t's,
        dL/dx_hat_T = (prod_t a_t) * 2 (x_hat_0 - x0_guide) / numel.
    Proposition 2: when d eps / d x is close to a multiple of the identity, the full gradient is a
    positive multiple k of this one, so MSD descends the same loss at the cost of N forwards, no
    backward. Under --amp the teacher runs in bf16 but the chain stays in x's fp32: x_hat_0 -
    x0_guide is a small residual, below bf16's three digits of x.
    """
    # BEGIN SOLUTION
    x = x_hat_T
    for t, a_t, b_t in ddim_schedule(steps):
        with torch.no_grad():
            eps = teacher(x, timestep_batch(t, x), y).to(x.dtype)  # SG(eps_theta(x_t, t, c))
        x = ddim_step(x, eps, a_t, b_t)                # F_t(x) = a_t x + b_t SG(eps), eq. (4)
    return ((x - x0_guide) ** 2).mean()                # eq. (5)
    # END SOLUTION


def full_loss(teacher, x_hat_T, y, x0_guide, steps=10):
    """L_Denoise (eq. 2): the same unguided DDIM chain, backpropagated through every teacher
    call."""
    # BEGIN SOLUTION
    x = x_hat_T
    for t, a_t, b_t in ddim_schedule(steps):
        x = ddim_step(x, teacher(x, timestep_batch(t, x), y).to(x.dtype), a_t, b_t)
    return ((x - x0_guide) ** 2).mean()
    # END SOLUTION


def prod_a(steps):
    """prod_t a_t over N DDIM steps = sqrt(1 / abar_999) ~ 157: the MSD gradient's scale."""
    return math.prod(a_t for _, a_t, _ in ddim_schedule(steps))


# ----------------------------------------------------------------------------------------------
# Training g_phi with L_MSD, keeping the weights of the best validation loss
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RefinerSettings:
    """The refiner's training settings (train_refiner.py's flags default to these)."""
    steps: int = 1500       # with lr: chosen on the dev bank across seven teachers
                            # (docs/teachers.md)
    batch_size: int = 32
    lr: float = 1e-3
    adam_eps: float = 1e-8  # must stay small next to sqrt(v): see `fit`
    msd_steps: int = 10     # N: unguided DDIM steps inside L_MSD
    val_every: int = 200
    seed: int = 0
    amp: str = "none"       # "bf16": autocast the forwards (accel.py); the chain and the loss
                            # stay fp32


@dataclasses.dataclass
class Progress:
    """Where a refiner's training stands, besides its weights and optimiser."""
    step: int
    best: float       # the best validation L_MSD so far
    best_state: dict  # the trainable weights at that step (a clone: later steps do not move it)
    identity: float   # the identity refiner's validation L_MSD, step 0


def cosine_lr(step, steps, lr):
    """Cosine decay from lr to 0 over `steps`: the last steps settle."""
    return lr * 0.5 * (1 + math.cos(math.pi * step / steps))


@torch.no_grad()
def validation_loss(refiner, teacher, val, msd_steps, device, amp="none"):
    """L_MSD over the validation pairs, with the refiner in eval mode (the mode sampling uses)."""
    refiner.eval()
    total = 0.0
    for i in range(0, len(val["y"]), 250):
        x_T, y, x0_guide = batch_of(val, slice(i, i + 250), device)
        with autocast(device, amp):
            total += msd_loss(teacher, refiner(x_T, y), y, x0_guide, msd_steps).item() * len(y)
    return total / len(val["y"])


def fit(refiner, teacher, train_pairs, val, s, device, ckpt_path, meta, resume=False, stop_at=None):
    """Train the refiner with L_MSD (settings s: RefinerSettings), validating and checkpointing to
    ckpt_path (with `meta`: the teacher's fingerprint and path, the run's flags) every s.val_every
    steps. Returns the refiner in eval mode with the weights of the best validation loss. resume
    continues from ckpt_path; stop_at stops there as if interrupted (tests)."""
    params = [p for p in refiner.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0, eps=s.adam_eps, foreach=True)
    gen = torch.Generator().manual_seed(s.seed)  # the batches
    torch.manual_seed(s.seed)  # dropout, where a preset has it, draws from the global generator
    run = (resumed(refiner, opt, gen, ckpt_path, meta) if resume
           else fresh(refiner, teacher, val, s, device))
    keeper = Keeper(ckpt_path, s.val_every, lambda: checkpoint(refiner, opt, gen, run, meta),
                    run.step if resume else None)
    scale, last = prod_a(s.msd_steps) ** 2, min(s.steps, stop_at or s.steps)  # scale: see validate
    bar = tqdm(range(run.step, last), initial=run.step, total=s.steps, desc="refiner (MSD)")
    with keeper.on_interrupt():
        for step in bar:
            idx = torch.randint(len(train_pairs["y"]), (s.batch_size,), generator=gen)
            loss = msd_step(refiner, teacher, batch_of(train_pairs, idx, device), opt, step, s,
                            device, keeper)
            run.step = keeper.step = step + 1
            bar.set_postfix(loss=f"{loss / scale:.3e}", best_val=f"{run.best / scale:.3e}")
            if run.step % s.val_every == 0 or run.step == s.steps:
                validate(refiner, teacher, val, s, device, run, opt)
            if run.step % s.val_every == 0 or run.step in (s.steps, last):
                keeper.save(run.step)
    refiner.load_state_dict(run.best_state, strict=False)
    return refiner.eval()


def msd_step(refiner, teacher, batch, opt, step, s, device, keeper):
    """One optimiser step on L_MSD over a batch of pairs (x_T, c, x0_guide); returns the loss.

    We backpropagate L_MSD itself, not L_MSD / prod(a_t)^2 (what we print): divided by ~2.5e4,
    Adam's eps was no longer small next to sqrt(v)."""
    for g in opt.param_groups:
        g["lr"] = cosine_lr(step, s.steps, s.lr)
    x_T, y, x0_guide = batch
    refiner.train()
    with autocast(device, s.amp):
        loss = msd_loss(teacher, refiner(x_T, y), y, x0_guide, s.msd_steps)
    value = loss.item()
    keeper.check(value, step, "MSD loss")  # before the weights move
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return value


def validate(refiner, teacher, val, s, device, run, opt):
    """The validation L_MSD; the best weights so far are kept in `run`.

    We print L_MSD / prod(a_t)^2: to first order x_hat_0 moves prod(a_t) ~ 157 times as far as
    x_hat_T, so this is the squared size of the correction x_hat_T still lacks."""
    val_loss = validation_loss(refiner, teacher, val, s.msd_steps, device, s.amp)
    if val_loss < run.best:
        run.best, run.best_state = val_loss, refiner.trainable_state()
    scale = prod_a(s.msd_steps) ** 2
    tqdm.write(f"step {run.step}: validation L_MSD/prod(a)^2 {val_loss / scale:.4e} "
               f"(best {run.best / scale:.4e}); eps-bound weights {eps_bound_share(opt):.2%}")


def fresh(refiner, teacher, val, s, device):
    """A new run: the identity refiner is the first candidate for the best validation loss."""
    best = validation_loss(refiner, teacher, val, s.msd_steps, device, s.amp)
    tqdm.write(f"step 0 (identity refiner): validation L_MSD/prod(a)^2 "
               f"{best / prod_a(s.msd_steps) ** 2:.4e}")
    return Progress(0, best, refiner.trainable_state(), best)


def resumed(refiner, opt, gen, ckpt_path, meta):
    """The run kept in ckpt_path: weights, optimiser and random state as they were."""
    ckpt = load_refiner_ckpt(ckpt_path, meta["teacher_fingerprint"], "--resume")
    refiner.load_state_dict(ckpt["state"], strict=False)
    opt.load_state_dict(ckpt["opt"])
    gen.set_state(ckpt["gen"])
    torch.set_rng_state(ckpt["rng"])
    return Progress(ckpt["step"], ckpt["best_val"], ckpt["best"], ckpt.get("identity_val"))


def checkpoint(refiner, opt, gen, run, meta):
    """The refiner's checkpoint: a plain dict (load_refiner reads it)."""
    return {"kind": "refiner", "format": FORMAT, **meta, "rank": refiner.rank,
            "alpha": refiner.alpha, "state": refiner.trainable_state(), "best": run.best_state,
            "best_val": run.best, "identity_val": run.identity, "opt": opt.state_dict(),
            "gen": gen.get_state(), "rng": torch.get_rng_state(), "step": run.step}


@torch.no_grad()
def eps_bound_share(opt):
    """Share of the trained weights with sqrt(v_hat) < 10 eps, where eps is at least a tenth of
    Adam's denominator. Where this share is not small, the loss scale changes the steps (a loss k
    times smaller moves those weights less)."""
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
# Loading a trained refiner
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def refine_many(refiner, x_T, y, batch_size=250):
    """x_hat_T = g_phi(x_T, c) over many noises in batches, on the refiner's device, returned on
    the CPU."""
    device = next(refiner.parameters()).device
    return torch.cat([refiner(x_T[i:i + batch_size].to(device),
                              y[i:i + batch_size].to(device)).cpu()
                      for i in range(0, len(y), batch_size)])


def load_refiner_ckpt(path, teacher_fp, flag="--refiner"):
    """A refiner checkpoint, refused unless it was trained on the teacher with this fingerprint."""
    ckpt = load_checkpoint(path, "refiner", flag)
    if ckpt["teacher_fingerprint"] != teacher_fp:
        raise BadInput(f"{flag} {path} was trained on teacher {ckpt['teacher_fingerprint']}, "
                       f"but this teacher is {teacher_fp}; "
                       "pass the teacher it was trained on (--teacher)")
    return ckpt


def load_refiner(path, teacher, device="cpu", flag="--refiner"):
    """A trained refiner (best validation weights, LoRA merged) for the given teacher."""
    ckpt = load_refiner_ckpt(path, fingerprint(teacher), flag)
    refiner = Refiner(teacher, ckpt["rank"], ckpt["alpha"])
    unexpected = refiner.load_state_dict(ckpt["best"], strict=False).unexpected_keys
    if unexpected:
        raise BadInput(f"{flag} {path}: weights do not fit this teacher ({unexpected[0]} ...)")
    return refiner.merge().to(device).eval()
