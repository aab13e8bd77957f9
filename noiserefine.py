"""NoiseRefine: a one-shot refinement of the initial noise that replaces classifier-free guidance.

Paper: Ahn et al., "A Noise is Worth Diffusion Guidance", arXiv 2412.03895v1. Equation numbers are
those of v1; they move between versions. Names used here:

    x_T        Gaussian initial noise, N(0, I)
    c, y       the condition (a class label here)
    x0_guide   DenoiseGuide(x_T, c): the image that N' guided DDIM steps make from x_T (eq. 1-2)
    g_phi      the refiner: x_hat_T = g_phi(x_T, c) = x_T + f_phi(x_T, T, c)          (eq. 3)
    a_t, b_t   one DDIM step as an affine map, x_{t-1} = a_t x_t + b_t eps           (eq. 1; diffusion.py)
    SG         stop-gradient: the value flows forward, no gradient flows back
    F_t        F_t(x) = a_t x + b_t SG(eps_theta(x, t, c))                          (eq. 4)
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
from checkpoint import FORMAT, fingerprint, load_checkpoint, save_atomic
from diffusion import T, ddim_schedule, ddim_step, timestep_batch
from pairs import batch_of
from safety import BadInput, kept_checkpoint, on_interrupt

# ----------------------------------------------------------------------------------------------
# LoRA (Hu et al., arXiv 2106.09685), from scratch
# ----------------------------------------------------------------------------------------------


class LoRA(nn.Module):
    """base(x) + (alpha / r) up(down(x)) around a frozen nn.Linear or nn.Conv2d.

    `up` starts at zero, so an adapted layer starts exactly equal to its base layer. For a conv,
    `down` has the base's kernel, stride and padding and `up` is 1x1, so the update is a rank-r conv.
    """

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        else:
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
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
    """Wrap every nn.Linear and nn.Conv2d of `model` (attention, convolution, feed-forward and embedding
    MLPs) in LoRA, except the modules in `skip`. Returns the number of adapters added."""
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

    Why a fresh head: at t = 999 the teacher's own eps-output is already close to x_T (x_999 is almost
    pure noise), so x_T + eps_theta(x_T) would double the noise. Instead the copy's output layer is
    re-initialised to zero: f_phi = 0 and g_phi is exactly the identity at initialisation, and the
    adapted trunk learns only the (small, low-frequency) correction. One network forward per refinement.

    rank > 0: LoRA adapters on every other layer, base weights frozen (the paper's choice, for its large
    teachers); rank = 0: the whole copy is fine-tuned (train_refiner.py's default and every table's here:
    on the 0.67M-parameter teacher it did better, docs/ablations.md).
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
        """x_hat_T = g_phi(x_T, c) = x_T + f_phi(x_T, T, c), eq. (3): one forward of the copy at t = T - 1."""
        # BEGIN SOLUTION
        return x_T + self.net(x_T, timestep_batch(T - 1, x_T), y)  # x_hat_T = x_T + f_phi(x_T, T, c)
        # END SOLUTION

    def trainable_state(self):
        """A copy of what training changes (adapters and head, or everything for rank 0): what a checkpoint
        holds. Cloned: state_dict() shares storage with the live weights, so a snapshot kept without a
        copy (the best validation step's) would move with every later optimiser step."""
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
    """L_MSD = mean (F_1(...F_T(x_hat_T)) - x0_guide)^2, F_t(x) = a_t x + b_t SG(eps_theta(x, t, c)).

    Every eps is computed under no_grad (SG), so no graph is built through the N teacher calls: the
    gradient reaches x_hat_T only through the chain of a_t's,
        dL/dx_hat_T = (prod_t a_t) * 2 (x_hat_0 - x0_guide) / numel.
    Proposition 2: when d eps / d x is close to a multiple of the identity, the full gradient is a
    positive multiple k of this one, so MSD descends the same loss at the cost of N forwards, no backward.
    """
    # BEGIN SOLUTION
    x = x_hat_T
    for t, a_t, b_t in ddim_schedule(steps):
        with torch.no_grad():
            eps = teacher(x, timestep_batch(t, x), y).to(x.dtype)  # SG(eps_theta(x_t, t, c)); fp32 under --amp:
            # x_hat_0 - x0_guide is a small residual of the chain, below bf16's 3 digits of x
        x = ddim_step(x, eps, a_t, b_t)                # F_t(x) = a_t x + b_t SG(eps), eq. (4)
    return ((x - x0_guide) ** 2).mean()                # eq. (5)
    # END SOLUTION


def full_loss(teacher, x_hat_T, y, x0_guide, steps=10):
    """L_Denoise (eq. 2): the same unguided DDIM chain, backpropagated through every teacher call."""
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
class Training:
    """The refiner's training settings (train_refiner.py's flags default to these)."""
    steps: int = 1500       # with lr: chosen on the dev bank across seven teachers (docs/teachers.md)
    batch_size: int = 32
    lr: float = 1e-3
    adam_eps: float = 1e-8  # must stay small next to sqrt(v): see `fit`
    msd_steps: int = 10     # N: unguided DDIM steps inside L_MSD
    val_every: int = 200
    seed: int = 0
    amp: str = "none"       # "bf16": autocast the forwards (accel.py); the chain and the loss stay fp32


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


@torch.no_grad()
def eps_bound_share(opt):
    """Share of the trained weights with sqrt(v_hat) < 10 eps, where eps is at least a tenth of Adam's
    denominator. Where this share is not small, the loss scale changes the steps (a loss k times smaller
    moves those weights less)."""
    bound = total = 0
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p)
            if state:
                v_hat = state["exp_avg_sq"] / (1 - group["betas"][1] ** float(state["step"]))
                bound += int((v_hat.sqrt() < 10 * group["eps"]).sum())
                total += p.numel()
    return bound / max(total, 1)


def fit(refiner, teacher, train_pairs, val, t, device, ckpt_path, meta, resume=False, stop_at=None):
    """Train the refiner's trainable weights with L_MSD (settings t: Training); checkpoint to ckpt_path at
    every validation, with `meta` (the teacher's fingerprint and path, the run's flags). Returns the
    refiner, in eval mode, with the weights of the best validation loss: a cloned snapshot, so later steps
    do not move it. resume continues from ckpt_path; stop_at stops there as if interrupted (tests)."""
    params = [p for p in refiner.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=0.0, eps=t.adam_eps, foreach=True)  # as teacher.setup
    gen = torch.Generator().manual_seed(t.seed)  # the batches
    torch.manual_seed(t.seed)  # dropout, where a preset has it, draws from the global generator
    scale = prod_a(t.msd_steps) ** 2
    if resume:
        ckpt = load_refiner_ckpt(ckpt_path, meta["teacher_fingerprint"], "--resume")
        refiner.load_state_dict(ckpt["state"], strict=False)
        opt.load_state_dict(ckpt["opt"])
        gen.set_state(ckpt["gen"])
        torch.set_rng_state(ckpt["rng"])
        step, best, best_state = ckpt["step"], ckpt["best_val"], ckpt["best"]
        identity = ckpt.get("identity_val")
    else:  # the identity refiner is the first candidate for the best validation loss
        step, best = 0, validation_loss(refiner, teacher, val, t.msd_steps, device, t.amp)
        best_state, identity = refiner.trainable_state(), best
        tqdm.write(f"step 0 (identity refiner): validation L_MSD/prod(a)^2 {best / scale:.4e}")

    saved = step if resume else None  # the step of the checkpoint on disk
    kept = lambda: kept_checkpoint(saved, ckpt_path, t.val_every)  # noqa: E731
    def save():
        nonlocal saved
        save_atomic({"kind": "refiner", "format": FORMAT, **meta, "rank": refiner.rank, "alpha": refiner.alpha,
                     "state": refiner.trainable_state(), "best": best_state, "best_val": best,
                     "identity_val": identity,
                     "opt": opt.state_dict(), "gen": gen.get_state(), "rng": torch.get_rng_state(), "step": step},
                    ckpt_path)
        saved = step  # only once the file is whole

    # To first order x_hat_0 moves by prod(a_t) ~ 157 times a move of x_hat_T, so L_MSD / prod(a_t)^2 is
    # the squared size of the noise-space correction x_hat_T still lacks (~1e-6: the correction is small).
    # That is the number we print. We backpropagate L_MSD itself: Adam's steps ignore the loss scale only
    # while its eps is small next to sqrt(v), and with the loss divided by prod(a_t)^2 ~ 2.5e4 it was not
    # (see the "eps-bound" share the validation line prints, and ablate.py's row eps_scaled).
    last = min(t.steps, stop_at or t.steps)
    bar = tqdm(range(step, last), initial=step, total=t.steps, desc="refiner (MSD)")
    with on_interrupt(lambda: f"at step {step}; {kept()}"):
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = cosine_lr(step, t.steps, t.lr)
            x_T, y, x0_guide = batch_of(train_pairs, torch.randint(len(train_pairs["y"]), (t.batch_size,),
                                                                    generator=gen), device)
            refiner.train()
            with autocast(device, t.amp):
                loss = msd_loss(teacher, refiner(x_T, y), y, x0_guide, t.msd_steps)
            if not torch.isfinite(loss):
                raise BadInput(f"MSD loss is {loss.item()} at step {step}; {kept()}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.set_postfix(loss=f"{loss.item() / scale:.3e}", best_val=f"{best / scale:.3e}")
            if step % t.val_every == 0 or step == t.steps:
                val_loss = validation_loss(refiner, teacher, val, t.msd_steps, device, t.amp)
                if val_loss < best:
                    best, best_state = val_loss, refiner.trainable_state()
                save()
                tqdm.write(f"step {step}: validation L_MSD/prod(a)^2 {val_loss / scale:.4e} (best {best / scale:.4e}); "
                           f"eps-bound weights {eps_bound_share(opt):.2%}")
            elif step == last:
                save()
    refiner.load_state_dict(best_state, strict=False)
    return refiner.eval()


# ----------------------------------------------------------------------------------------------
# Loading a trained refiner
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def refine_many(refiner, x_T, y, batch_size=250):
    """x_hat_T = g_phi(x_T, c) over many noises in batches, on the refiner's device, returned on the CPU."""
    device = next(refiner.parameters()).device
    return torch.cat([refiner(x_T[i:i + batch_size].to(device), y[i:i + batch_size].to(device)).cpu()
                      for i in range(0, len(y), batch_size)])


def load_refiner_ckpt(path, teacher_fp, flag="--refiner"):
    """A refiner checkpoint, refused unless it was trained on the teacher with this fingerprint."""
    ckpt = load_checkpoint(path, "refiner", flag)
    if ckpt["teacher_fingerprint"] != teacher_fp:
        raise BadInput(f"{flag} {path} was trained on teacher {ckpt['teacher_fingerprint']}, but this teacher is "
                       f"{teacher_fp}; pass the teacher it was trained on (--teacher)")
    return ckpt


def load_refiner(path, teacher, device="cpu", flag="--refiner"):
    """A trained refiner (best validation weights, LoRA merged) for the given teacher."""
    ckpt = load_refiner_ckpt(path, fingerprint(teacher), flag)
    refiner = Refiner(teacher, ckpt["rank"], ckpt["alpha"])
    unexpected = refiner.load_state_dict(ckpt["best"], strict=False).unexpected_keys
    if unexpected:
        raise BadInput(f"{flag} {path}: weights do not fit this teacher ({unexpected[0]} ...)")
    return refiner.merge().to(device).eval()
