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
"""
import copy
import math

import torch
import torch.nn as nn

from diffusion import T, ddim_schedule, ddim_step, timestep_batch

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

    rank > 0: LoRA adapters on every other layer, base weights frozen (the paper's choice);
    rank = 0: the whole copy is fine-tuned.
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
            eps = teacher(x, timestep_batch(t, x), y)  # SG(eps_theta(x_t, t, c))
        x = ddim_step(x, eps, a_t, b_t)                # F_t(x) = a_t x + b_t SG(eps), eq. (4)
    return ((x - x0_guide) ** 2).mean()                # eq. (5)
    # END SOLUTION


def full_loss(teacher, x_hat_T, y, x0_guide, steps=10):
    """L_Denoise (eq. 2): the same unguided DDIM chain, backpropagated through every teacher call."""
    # BEGIN SOLUTION
    x = x_hat_T
    for t, a_t, b_t in ddim_schedule(steps):
        x = ddim_step(x, teacher(x, timestep_batch(t, x), y), a_t, b_t)
    return ((x - x0_guide) ** 2).mean()
    # END SOLUTION


def prod_a(steps):
    """prod_t a_t over N DDIM steps = sqrt(1 / abar_999) ~ 157: the MSD gradient's scale."""
    return math.prod(a_t for _, a_t, _ in ddim_schedule(steps))
