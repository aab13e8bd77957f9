"""The diffusion math, in the paper's notation: DDPM noising, DDIM as an affine map, guided eps.

Paper: Ahn et al., "A Noise is Worth Diffusion Guidance", arXiv 2412.03895v1 (equation numbers
are those of v1). Every sampler, the MSD loss and the evaluator take their coefficients from here.

Guidance convention, stated once: eps_cfg = eps_c + w (eps_c - eps_u); w = 0 is no guidance.
"""
import math

import torch
from tqdm import tqdm

T = 1000  # training timesteps; the refiner's input timestep is T - 1 = 999
STEPS = 20  # sampling steps of the guided targets (the paper's N') and of every table and picture
BATCH = 125  # sampling batch (CFG's doubled forward: 250): the images do not depend on it, only
# the speed does (docs/speed.md); a GPU user may pass more

# ----------------------------------------------------------------------------------------------
# Schedule (DDPM, linear betas)
# ----------------------------------------------------------------------------------------------

BETAS = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
ABAR = torch.cumprod(1.0 - BETAS, dim=0)  # abar_t = prod_{s<=t} (1 - beta_s), t = 0..T-1; float64


def abar(t):
    """abar_t as a python float; t = -1 means the clean image (abar = 1)."""
    return 1.0 if t < 0 else float(ABAR[t])


def q_sample(x0, t, eps):
    """Forward process x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.  t: (B,) int64."""
    ab = ABAR.to(x0.device)[t].float().view(-1, 1, 1, 1)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def training_loss(model, x0, y, null_class, cond_drop=0.1, generator=None, part=slice(None),
                  min_snr=0.0):
    """Eps-prediction loss with condition dropout: a label becomes the null class with prob.
    cond_drop, so that the same network also gives eps_u for CFG. min_snr = gamma > 0 weights each
    sample by min(SNR_t, gamma) / SNR_t, SNR_t = abar_t / (1 - abar_t) (Min-SNR, Hang et al. 2023,
    arXiv 2303.09556, for eps-prediction): the low-noise steps, whose eps is easy and whose
    gradients conflict with the rest, count less.

    t, eps and the dropout are drawn for the whole batch, and only the rows `part` are computed:
    each of K processes takes its K-th of one global batch and together they compute what one
    process would."""
    B, dev = x0.shape[0], generator.device if generator is not None else x0.device
    t = torch.randint(0, T, (B,), generator=generator, device=dev)[part].to(x0.device)
    eps = torch.randn(x0.shape, generator=generator, device=dev)[part].to(x0.device)
    drop = (torch.rand(B, generator=generator, device=dev) < cond_drop)[part].to(x0.device)
    x0, y = x0[part], y[part]
    y = torch.where(drop, torch.full_like(y, null_class), y)
    err = (model(q_sample(x0, t, eps), t, y) - eps) ** 2
    if min_snr <= 0:
        return err.mean()
    snr = (ABAR.to(x0.device)[t] / (1 - ABAR.to(x0.device)[t])).float()
    return (err.mean((1, 2, 3)) * snr.clamp(max=min_snr) / snr).mean()


# ----------------------------------------------------------------------------------------------
# DDIM (eta = 0) as the paper's affine map  x_{t-1} = a_t x_t + b_t eps   (eq. 1)
# ----------------------------------------------------------------------------------------------

def ddim_timesteps(steps):
    """Trailing spacing: 999, 999 - T/N, ..., T/N - 1, so the first step sees the refiner's
    t = 999."""
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..{T}, got {steps}")
    return [int(round(T - i * T / steps)) - 1 for i in range(steps)]


def ddim_coeffs(t, t_prev):
    """a_t = sqrt(abar_prev / abar_t),  b_t = sqrt(1 - abar_prev) - a_t sqrt(1 - abar_t)."""
    # BEGIN SOLUTION
    ab_t, ab_prev = abar(t), abar(t_prev)
    a_t = math.sqrt(ab_prev / ab_t)
    b_t = math.sqrt(1.0 - ab_prev) - a_t * math.sqrt(1.0 - ab_t)
    return a_t, b_t
    # END SOLUTION


def ddim_schedule(steps):
    """[(t, a_t, b_t), ...] for N trailing DDIM steps; the last step lands on x0 (abar = 1)."""
    ts = ddim_timesteps(steps)
    return [(t, *ddim_coeffs(t, t_prev)) for t, t_prev in zip(ts, ts[1:] + [-1])]


def ddim_step(x_t, eps, a_t, b_t):
    """One deterministic DDIM step, eq. (1): x_{t-1} = a_t x_t + b_t eps."""
    return a_t * x_t + b_t * eps


def ddim_unstep(x_prev, eps, a_t, b_t):
    """Eq. (1) solved for x_t: x_t = (x_{t-1} - b_t eps) / a_t, one step of DDIM inversion."""
    return (x_prev - b_t * eps) / a_t


@torch.no_grad()
def ddim_invert(model, x0, y, steps):
    """Run eq. (1) backwards without guidance: x_t = (x_{t-1} - b_t eps) / a_t, with eps the model's
    output at x_{t-1} given the timestep t (the usual approximation: the exact eps at x_t is unknown
    before x_t is)."""
    ts = ddim_timesteps(steps)
    x = x0
    for t, t_prev in reversed(list(zip(ts, ts[1:] + [-1]))):
        a_t, b_t = ddim_coeffs(t, t_prev)
        x = ddim_unstep(x, model(x, timestep_batch(t, x), y).to(x.dtype), a_t, b_t)
    return x


def predict_x0(x_t, t, eps):
    """x0 predicted from x_t and eps (the paper's Fig. 10 shows it over the steps)."""
    ab = abar(t)
    return (x_t - math.sqrt(1 - ab) * eps) / math.sqrt(ab)


# ----------------------------------------------------------------------------------------------
# Guided eps (CFG, eq. 26; PAG, eq. 27-28; beyond the paper: autoguidance, the guidance interval)
# ----------------------------------------------------------------------------------------------

def timestep_batch(t, x):
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


def guided_eps(model, x, t, y, w=0.0, pag=0.0):
    """eps_c + w (eps_c - eps_u) + pag (eps_c - eps_perturbed).

    t: int, or a (B,) tensor of per-sample timesteps; w: float, or a (B,) tensor of per-sample
    scales. w = 0 and pag = 0 run one conditional forward; otherwise conditional and unconditional
    share one batched forward (batch 2B).
    """
    # BEGIN SOLUTION
    tt = t if torch.is_tensor(t) else timestep_batch(t, x)  # one t for the batch, or one per sample
    guided = torch.is_tensor(w) or w != 0
    if not guided and pag == 0:
        # bf16 under autocast: the sampler still sums in x's fp32
        return model(x, tt, y).to(x.dtype)
    if guided:
        null = torch.full_like(y, model.num_classes)
        eps_c, eps_u = model(torch.cat([x, x]), torch.cat([tt, tt]),
                             torch.cat([y, null])).to(x.dtype).chunk(2)
        w = w.view(-1, 1, 1, 1) if torch.is_tensor(w) else w
        # in x's dtype; under bf16 autocast eps_c, eps_u were rounded already
        eps = eps_c + w * (eps_c - eps_u)
    else:
        eps_c = eps = model(x, tt, y).to(x.dtype)
    if pag != 0:  # perturbed-attention guidance: self-attention map replaced by the identity
        eps = eps + pag * (eps_c - model(x, tt, y, identity_attn=True).to(x.dtype))
    return eps
    # END SOLUTION


def sigma(t):
    """The noise level of x_t in data units, sigma_t = sqrt((1 - abar_t) / abar_t):
    x_t / sqrt(abar_t) = x0 + sigma_t eps (EDM's sigma; the guidance interval is stated in it)."""
    ab = abar(t)
    return math.sqrt((1 - ab) / ab)


def autoguided_eps(model, x, t, y, w=0.0, weak=None):
    """Autoguidance (Karras et al. 2024, arXiv 2406.02507), in this file's convention:
    eps_good + w (eps_good - eps_weak), both conditional, where eps_weak comes from a weaker version
    of the same model (here an early checkpoint of the teacher's training). It is the paper's
    eps_weak + w' (eps_good - eps_weak) with w' = 1 + w, so w = 0 is no guidance here too (one
    forward)."""
    tt = t if torch.is_tensor(t) else timestep_batch(t, x)
    eps_good = model(x, tt, y).to(x.dtype)
    if not torch.is_tensor(w) and w == 0:
        return eps_good
    w = w.view(-1, 1, 1, 1) if torch.is_tensor(w) else w
    return eps_good + w * (eps_good - weak(x, tt, y).to(x.dtype))  # two networks: two forwards of B


def interval_eps(model, x, t, y, w=0.0, pag=0.0, interval=(0.0, math.inf)):
    """Guidance interval (Kynkaanniemi et al. 2024, arXiv 2404.07724): guided_eps where
    sigma_lo < sigma_t <= sigma_hi, the conditional eps alone (one forward) everywhere else. t: an
    int."""
    lo, hi = interval
    inside = lo < sigma(t) <= hi
    return guided_eps(model, x, t, y, w, pag) if inside else guided_eps(model, x, t, y)


class Guidance:
    """Which guided eps the samplers use, called like guided_eps: CFG (+ PAG) by default;
    'autoguidance' with its weak model; 'interval' with its (sigma_lo, sigma_hi]. w keeps one
    meaning in all three: the weight of (eps_c - the other branch), 0 for none."""

    def __init__(self, kind="cfg", weak=None, interval=None):
        if kind == "autoguidance" and weak is None:
            raise ValueError("autoguidance needs its weak model")
        if kind == "interval" and interval is None:
            raise ValueError("the guidance interval needs (sigma_lo, sigma_hi)")
        self.kind, self.weak, self.interval = kind, weak, interval

    def __call__(self, model, x, t, y, w=0.0, pag=0.0):
        if self.kind == "autoguidance":
            if pag:
                raise ValueError("autoguidance takes no PAG term here")
            return autoguided_eps(model, x, t, y, w, self.weak)
        if self.kind == "interval":
            return interval_eps(model, x, t, y, w, pag, self.interval)
        return guided_eps(model, x, t, y, w, pag)

    def networks(self):
        """The networks besides the teacher that it runs (forwards are counted on each)."""
        return [self.weak] if self.weak is not None else []


CFG = Guidance()

# The named guidances of train_refiner.py --guidance, with the scale range their pairs draw w from
# and their PAG scale: the one table pairs.py, the scripts and ablate.py read (docs/guidance.md: how
# chosen).
GUIDANCES = {
    "cfg": {"w_range": (2.0, 4.0), "pag": 0.0},      # the paper's
    # the paper's PAG scale (CFG 3 + PAG 2, Pick-a-Pic)
    "cfg+pag": {"w_range": (2.0, 4.0), "pag": 2.0},
    "autoguidance": {"w_range": (1.0, 2.0), "pag": 0.0},
    "interval": {"w_range": (2.0, 4.0), "pag": 0.0},
}
INTERVAL = (0.3, 5.0)  # (sigma_lo, sigma_hi] of "interval", chosen on the dev bank
DISPLAY_W = sum(GUIDANCES["cfg"]["w_range"]) / 2  # the CFG scale every table and picture shows: 3


# ----------------------------------------------------------------------------------------------
# Sampling: one loop, three update rules on the same timesteps (DDIM is the paper's; the others are
# for its Fig. 29, refined noise under other solvers). Each rule takes the current x_t, its eps and
# x0 prediction, and returns x at t_prev plus what it carries to the next step.
# Notation: alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t).
# ----------------------------------------------------------------------------------------------


def ddim_update(x, eps, x0, t, t_prev, carry):
    """DDIM, eq. (1): x_{t-1} = a_t x_t + b_t eps."""
    return ddim_step(x, eps, *ddim_coeffs(t, t_prev)), None


def euler_update(x, eps, x0, t, t_prev, carry):
    """Euler on the probability-flow ODE in EDM's variables (Karras et al. 2022, arXiv 2206.00364):
    x_bar = x / alpha_t, s = sigma_t / alpha_t, d x_bar / d s = eps. One Euler step in s:
    x_bar' = x_bar + (s' - s) eps. For an eps-prediction model this *is* DDIM (EDM, Sec. 3): the
    test checks it; the analysis shows it."""
    ab, ab_prev = abar(t), abar(t_prev)
    s, s_prev = math.sqrt((1 - ab) / ab), math.sqrt((1 - ab_prev) / ab_prev)
    return math.sqrt(ab_prev) * (x / math.sqrt(ab) + (s_prev - s) * eps), None


def dpm2m_update(x, eps, x0, t, t_prev, carry):
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Alg. 2), multistep in data prediction x0:
    x' = (sigma' / sigma) x - alpha' (e^{-h} - 1) D, h = lambda' - lambda, with D = x0 on the first
    step and D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev (r = h_prev / h) after it. The last step
    (sigma' = 0) returns D = x0."""
    # BEGIN SOLUTION
    ab, ab_prev = abar(t), abar(t_prev)
    lam = 0.5 * math.log(ab / (1 - ab))
    if ab_prev == 1.0:  # the final step lands on the data: x0 itself (first order, as in Alg. 2)
        return x0, None
    lam_prev = 0.5 * math.log(ab_prev / (1 - ab_prev))
    h = lam_prev - lam
    D = x0
    if carry is not None:
        x0_before, h_before = carry
        r = h_before / h
        D = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_before
    x = math.sqrt((1 - ab_prev) / (1 - ab)) * x - math.sqrt(ab_prev) * math.expm1(-h) * D
    return x, (x0, h)
    # END SOLUTION


SAMPLERS = {"ddim": ddim_update, "euler": euler_update, "dpm2m": dpm2m_update}


@torch.no_grad()
def sample(model, x_T, y, steps=20, w=0.0, pag=0.0, return_x0=False, sampler="ddim", guidance=CFG):
    """Sample from x_T with labels y on the trailing timesteps. With return_x0, also the predicted
    x0 of every step. sampler: ddim (the paper's; eq. 1), euler or dpm2m (DPM-Solver++(2M));
    guidance: a Guidance."""
    update = SAMPLERS[sampler]
    ts = ddim_timesteps(steps)
    x, x0_pred, carry = x_T, [], None
    for t, t_prev in zip(ts, ts[1:] + [-1]):
        eps = guidance(model, x, t, y, w, pag)
        x0 = predict_x0(x, t, eps)
        if return_x0:
            x0_pred.append(x0)
        x, carry = update(x, eps, x0, t, t_prev, carry)
    return (x, x0_pred) if return_x0 else x


@torch.no_grad()
def sample_many(model, x_T, y, steps=20, w=0.0, pag=0.0, batch_size=BATCH, refiner=None, desc=None,
                sampler="ddim", guidance=CFG):
    """`sample` over many noises in batches, with a tqdm bar. With a refiner, x_T is refined first
    (x_hat_T = g_phi(x_T, c), one forward) and then sampled as given (w = 0 for NoiseRefine)."""
    device = next(model.parameters()).device
    out = []
    chunks = range(0, x_T.shape[0], batch_size)
    for i in tqdm(chunks, desc=desc, leave=False, disable=desc is None):
        x, c = x_T[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        if refiner is not None:
            x = refiner(x, c)
        w_i = w[i:i + batch_size].to(device) if torch.is_tensor(w) else w
        out.append(sample(model, x, c, steps, w_i, pag, sampler=sampler, guidance=guidance).cpu())
    return torch.cat(out)
