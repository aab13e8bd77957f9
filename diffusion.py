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
BATCH = 125  # sampling batch: CFG's doubled forward (250) costs a 2-core CPU 12% less per image than at 500,
# and the images are bit for bit the same (docs/speed.md); a GPU user may pass more

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


def training_loss(model, x0, y, null_class, cond_drop=0.1, generator=None, part=slice(None)):
    """Eps-prediction loss with condition dropout: a label becomes the null class with prob. cond_drop,
    so that the same network also gives eps_u for CFG.

    t, eps and the dropout are drawn for the whole batch, and only the rows `part` are computed: each of
    K processes takes its K-th of one global batch and together they compute what one process would."""
    B, dev = x0.shape[0], generator.device if generator is not None else x0.device
    t = torch.randint(0, T, (B,), generator=generator, device=dev)[part].to(x0.device)
    eps = torch.randn(x0.shape, generator=generator, device=dev)[part].to(x0.device)
    drop = (torch.rand(B, generator=generator, device=dev) < cond_drop)[part].to(x0.device)
    x0, y = x0[part], y[part]
    y = torch.where(drop, torch.full_like(y, null_class), y)
    return ((model(q_sample(x0, t, eps), t, y) - eps) ** 2).mean()


# ----------------------------------------------------------------------------------------------
# DDIM (eta = 0) as the paper's affine map  x_{t-1} = a_t x_t + b_t eps   (eq. 1)
# ----------------------------------------------------------------------------------------------

def ddim_timesteps(steps):
    """Trailing spacing: 999, 999 - T/N, ..., T/N - 1, so the first step sees the refiner's t = 999."""
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


def predict_x0(x_t, t, eps):
    """x0 predicted from x_t and eps (the paper's Fig. 10 shows it over the steps)."""
    ab = abar(t)
    return (x_t - math.sqrt(1 - ab) * eps) / math.sqrt(ab)


# ----------------------------------------------------------------------------------------------
# Guided eps (CFG, eq. 26; PAG, eq. 27-28)
# ----------------------------------------------------------------------------------------------

def timestep_batch(t, x):
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


def guided_eps(model, x, t, y, w=0.0, pag=0.0):
    """eps_c + w (eps_c - eps_u) + pag (eps_c - eps_perturbed).

    t: int, or a (B,) tensor of per-sample timesteps; w: float, or a (B,) tensor of per-sample scales.
    w = 0 and pag = 0 run one conditional forward; otherwise conditional and unconditional share one
    batched forward (batch 2B).
    """
    # BEGIN SOLUTION
    tt = t if torch.is_tensor(t) else timestep_batch(t, x)  # one t for the batch, or one per sample
    guided = torch.is_tensor(w) or w != 0
    if not guided and pag == 0:
        return model(x, tt, y).to(x.dtype)  # bf16 under autocast: the sampler still sums in x's fp32
    if guided:
        null = torch.full_like(y, model.num_classes)
        eps_c, eps_u = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, null])).to(x.dtype).chunk(2)
        w = w.view(-1, 1, 1, 1) if torch.is_tensor(w) else w
        eps = eps_c + w * (eps_c - eps_u)  # fp32: eps_c - eps_u is small next to either term
    else:
        eps_c = eps = model(x, tt, y).to(x.dtype)
    if pag != 0:  # perturbed-attention guidance: self-attention map replaced by the identity
        eps = eps + pag * (eps_c - model(x, tt, y, identity_attn=True).to(x.dtype))
    return eps
    # END SOLUTION


# ----------------------------------------------------------------------------------------------
# Sampling: one loop, three update rules on the same timesteps (DDIM is the paper's; the others are
# for its Fig. 29, refined noise under other solvers). Each rule takes the current x_t, its eps and x0
# prediction, and returns x at t_prev plus what it carries to the next step.
# Notation: alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t).
# ----------------------------------------------------------------------------------------------


def ddim_update(x, eps, x0, t, t_prev, carry):
    """DDIM, eq. (1): x_{t-1} = a_t x_t + b_t eps."""
    return ddim_step(x, eps, *ddim_coeffs(t, t_prev)), None


def euler_update(x, eps, x0, t, t_prev, carry):
    """Euler on the probability-flow ODE in EDM's variables (Karras et al. 2022, arXiv 2206.00364):
    x_bar = x / alpha_t, s = sigma_t / alpha_t, d x_bar / d s = eps. One Euler step in s:
    x_bar' = x_bar + (s' - s) eps. For an eps-prediction model this *is* DDIM (EDM, Sec. 3): the test
    checks it; the analysis shows it."""
    ab, ab_prev = abar(t), abar(t_prev)
    s, s_prev = math.sqrt((1 - ab) / ab), math.sqrt((1 - ab_prev) / ab_prev)
    return math.sqrt(ab_prev) * (x / math.sqrt(ab) + (s_prev - s) * eps), None


def dpm2m_update(x, eps, x0, t, t_prev, carry):
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Alg. 2), multistep in data prediction x0:
    x' = (sigma' / sigma) x - alpha' (e^{-h} - 1) D, h = lambda' - lambda, with D = x0 on the first step and
    D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev (r = h_prev / h) after it. The last step (sigma' = 0) returns D = x0."""
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
def sample(model, x_T, y, steps=20, w=0.0, pag=0.0, return_x0=False, sampler="ddim"):
    """Sample from x_T with labels y on the trailing timesteps. With return_x0, also the predicted x0 of
    every step. sampler: ddim (the paper's; eq. 1), euler or dpm2m (DPM-Solver++(2M))."""
    update = SAMPLERS[sampler]
    ts = ddim_timesteps(steps)
    x, x0_pred, carry = x_T, [], None
    for t, t_prev in zip(ts, ts[1:] + [-1]):
        eps = guided_eps(model, x, t, y, w, pag)
        x0 = predict_x0(x, t, eps)
        if return_x0:
            x0_pred.append(x0)
        x, carry = update(x, eps, x0, t, t_prev, carry)
    return (x, x0_pred) if return_x0 else x


@torch.no_grad()
def sample_many(model, x_T, y, steps=20, w=0.0, pag=0.0, batch_size=BATCH, refiner=None, desc=None, sampler="ddim"):
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
        out.append(sample(model, x, c, steps, w_i, pag, sampler=sampler).cpu())
    return torch.cat(out)
