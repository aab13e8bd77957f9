"""The diffusion math: noising, the trailing DDIM schedule as an affine map, guided eps,
sampling."""
import math

import pytest
import torch

import diffusion
from diffusion import ABAR, ddim_schedule, ddim_timesteps, guided_eps, q_sample, sample


def test_schedule_is_linear_betas():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert torch.allclose(ABAR, torch.cumprod(1 - betas, 0))
    assert ABAR[-1] < 1e-4  # x_999 is almost pure noise


def test_q_sample_matches_its_equation():
    x0, eps = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    t = torch.tensor([0, 500, 999])
    out = q_sample(x0, t, eps)
    for i, ti in enumerate(t.tolist()):
        ab = ABAR[ti].item()
        assert torch.allclose(out[i], math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * eps[i], atol=1e-6)


def test_trailing_timesteps():
    assert ddim_timesteps(10) == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert ddim_timesteps(20)[:3] == [999, 949, 899] and ddim_timesteps(20)[-1] == 49
    assert ddim_timesteps(1000) == list(range(999, -1, -1))


def test_coefficients_agree_with_a_plain_ddim_update():
    """The a_t, b_t of the code against the textbook DDIM (eta = 0) update written out here."""
    x, eps = (torch.randn(2, 3, 4, 4, dtype=torch.float64),
              torch.randn(2, 3, 4, 4, dtype=torch.float64))
    ts = ddim_timesteps(7)
    for (t, a_t, b_t), t_prev in zip(ddim_schedule(7), ts[1:] + [-1]):
        ab, ab_prev = ABAR[t].item(), (ABAR[t_prev].item() if t_prev >= 0 else 1.0)
        x0_pred = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        plain = math.sqrt(ab_prev) * x0_pred + math.sqrt(1 - ab_prev) * eps
        assert torch.allclose(a_t * x + b_t * eps, plain, atol=1e-10)


def test_ddim_unstep_inverts_ddim_step():
    x, eps = (torch.randn(2, 3, 4, 4, dtype=torch.float64),
              torch.randn(2, 3, 4, 4, dtype=torch.float64))
    for t, a_t, b_t in ddim_schedule(5):
        assert torch.allclose(
            diffusion.ddim_unstep(diffusion.ddim_step(x, eps, a_t, b_t), eps, a_t, b_t), x)


class OracleEps(torch.nn.Module):
    """Returns the very noise used to make x_t from x0: the ideal denoiser for this one x0."""
    num_classes = 1

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y, identity_attn=False):
        ab = ABAR[t].view(-1, 1, 1, 1).to(x.dtype)
        return (x - ab.sqrt() * self.x0) / (1 - ab).sqrt()


def test_ddim_with_oracle_eps_follows_q_sample_and_lands_on_x0():
    x0 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    eps = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    model, y = OracleEps(x0), torch.zeros(2, dtype=torch.long)
    ts = ddim_timesteps(10)
    x = q_sample(x0, torch.full((2,), 999), eps)
    for (t, a_t, b_t), t_prev in zip(ddim_schedule(10), ts[1:] + [-1]):
        x = diffusion.ddim_step(x, model(x, torch.full((2,), t), y), a_t, b_t)
        expected = q_sample(x0, torch.full((2,), t_prev), eps) if t_prev >= 0 else x0
        assert torch.allclose(x, expected, atol=1e-8)


class Counting(torch.nn.Module):
    """eps_c = 1 + y, eps_u = 0 (null label), counting forwards and images."""
    num_classes = 3

    def __init__(self):
        super().__init__()
        self.calls, self.images = 0, 0

    def forward(self, x, t, y, identity_attn=False):
        self.calls += 1
        self.images += x.shape[0]
        value = torch.where(y == self.num_classes, torch.zeros_like(y), 1 + y).float()
        return torch.ones_like(x) * value.view(-1, 1, 1, 1) + (0.5 if identity_attn else 0.0)


def test_cfg_combination_formula():
    model, x, y = Counting(), torch.zeros(2, 1, 2, 2), torch.tensor([0, 2])
    eps = guided_eps(model, x, 999, y, w=2.0)
    # eps_c + w (eps_c - eps_u) = (1 + y) + 2 (1 + y - 0)
    assert torch.allclose(eps[:, 0, 0, 0], torch.tensor([3.0, 9.0]))
    assert model.calls == 1 and model.images == 4  # cond and uncond in one batched forward
    per_sample = guided_eps(model, x, 999, y, w=torch.tensor([0.0, 1.0]))
    assert torch.allclose(per_sample[:, 0, 0, 0], torch.tensor([1.0, 6.0]))


def test_pag_term():
    model, x, y = Counting(), torch.zeros(1, 1, 2, 2), torch.tensor([1])
    # eps_c + pag (eps_c - eps_perturbed) = 2 + 3 (2 - 2.5)
    assert torch.allclose(guided_eps(model, x, 999, y, w=0.0, pag=3.0), torch.full_like(x, 0.5))


class Constant(torch.nn.Module):
    """eps = value everywhere: a stand-in for autoguidance's weak model."""

    def __init__(self, value):
        super().__init__()
        self.value, self.images = value, 0

    def forward(self, x, t, y, identity_attn=False):
        self.images += x.shape[0]
        return torch.full_like(x, self.value)


def test_autoguidance_formula():
    """eps_good + w (eps_good - eps_weak), both conditional; equal to Karras et al.'s
    eps_weak + w' (eps_good - eps_weak) with w' = 1 + w; w = 0 runs the good model alone."""
    good, weak, x, y = Counting(), Constant(0.25), torch.zeros(2, 1, 2, 2), torch.tensor([0, 2])
    eps = diffusion.autoguided_eps(good, x, 999, y, w=2.0, weak=weak)
    # 1 + y: conditional, never the null label
    eps_good = torch.tensor([1.0, 3.0]).view(-1, 1, 1, 1)
    assert torch.allclose(eps, eps_good + 2.0 * (eps_good - 0.25))
    assert torch.allclose(eps, 0.25 + (1 + 2.0) * (eps_good - 0.25))
    assert good.images == 2 and weak.images == 2  # one conditional forward of each network
    assert torch.allclose(diffusion.autoguided_eps(good, x, 999, y, w=0.0, weak=weak),
                          eps_good.expand_as(x))
    assert weak.images == 2  # w = 0: the weak model is not run
    per_sample = diffusion.autoguided_eps(good, x, 999, y, w=torch.tensor([0.0, 1.0]), weak=weak)
    assert torch.allclose(per_sample[:, 0, 0, 0], torch.tensor([1.0, 3.0 + (3.0 - 0.25)]))


def test_guidance_interval_applies_cfg_only_inside_the_sigma_range():
    model, x, y = Counting(), torch.zeros(2, 1, 2, 2), torch.tensor([0, 2])
    ts = ddim_timesteps(20)
    interval = (diffusion.sigma(ts[15]), diffusion.sigma(ts[9]))  # (lo, hi]: steps 9..14 are inside
    inside = [t for t in ts if interval[0] < diffusion.sigma(t) <= interval[1]]
    assert inside == ts[9:15]
    cfg = guided_eps(Counting(), x, ts[9], y, w=2.0)
    assert torch.equal(diffusion.interval_eps(model, x, ts[9], y, 2.0, interval=interval), cfg)
    assert torch.equal(diffusion.interval_eps(model, x, ts[15], y, 2.0, interval=interval),
                       guided_eps(model, x, 0, y))
    assert torch.equal(diffusion.interval_eps(model, x, ts[0], y, 2.0, interval=interval),
                       guided_eps(model, x, 0, y))
    # a whole sample: 2 forwards per image inside the interval, 1 outside
    model = Counting()
    sample(model, x, y, 20, 2.0, guidance=diffusion.Guidance("interval", interval=interval))
    assert model.images == 2 * (20 + len(inside))


def test_sigma_is_the_noise_to_signal_ratio():
    for t in (0, 499, 999):
        ab = ABAR[t].item()
        assert math.isclose(diffusion.sigma(t), math.sqrt(1 - ab) / math.sqrt(ab), rel_tol=1e-12)


def test_guidance_object_dispatches_to_each_formula():
    x, y = torch.zeros(2, 1, 2, 2), torch.tensor([0, 2])
    weak = Constant(0.25)
    assert torch.equal(diffusion.CFG(Counting(), x, 999, y, 2.0, 1.0),
                       guided_eps(Counting(), x, 999, y, 2.0, 1.0))
    auto = diffusion.Guidance("autoguidance", weak=weak)
    assert torch.equal(auto(Counting(), x, 999, y, 2.0),
                       diffusion.autoguided_eps(Counting(), x, 999, y, 2.0, weak))
    assert auto.networks() == [weak] and diffusion.CFG.networks() == []
    with pytest.raises(ValueError):
        diffusion.Guidance("autoguidance")


def test_no_guidance_is_one_forward_per_sample():
    model = Counting()
    sample(model, torch.zeros(5, 1, 2, 2), torch.zeros(5, dtype=torch.long), steps=4, w=0.0)
    assert model.calls == 4 and model.images == 5 * 4
    model = Counting()
    sample(model, torch.zeros(5, 1, 2, 2), torch.zeros(5, dtype=torch.long), steps=4, w=1.5)
    assert model.images == 2 * 5 * 4


def test_sampling_is_reproducible(tiny_unet):
    x_T, y = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(4)
    a = sample(tiny_unet, x_T, y, 5, 2.0)
    b = sample(tiny_unet, x_T.clone(), y, 5, 2.0)
    assert torch.equal(a, b)


def test_predicted_x0_per_step(tiny_unet):
    x_T, y = torch.randn(2, 3, 8, 8), torch.arange(2)
    x, x0s = sample(tiny_unet, x_T, y, 5, return_x0=True)
    assert len(x0s) == 5 and torch.allclose(x0s[-1], x, atol=1e-5)  # the last step lands on its x0


@pytest.mark.parametrize("sampler", list(diffusion.SAMPLERS))
def test_every_sampler_follows_q_sample_with_the_oracle_eps(sampler):
    """With the ideal eps for one x0, every step of every sampler is on the forward process: x0 at
    the end."""
    x0 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    eps = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    x_T = q_sample(x0, torch.full((2,), 999), eps)
    out = sample(OracleEps(x0), x_T, torch.zeros(2, dtype=torch.long), 7, sampler=sampler)
    assert torch.allclose(out, x0, atol=1e-8)


class GaussianDataEps(torch.nn.Module):
    """The exact eps for data x0 ~ N(0, s^2 I): E[eps | x_t] = sigma_t x_t / (alpha_t^2
    s^2 + sigma_t^2). Its probability-flow ODE keeps x_t / sqrt(alpha_t^2 s^2 + sigma_t^2) fixed, a
    closed-form endpoint."""
    num_classes = 1

    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, x, t, y, identity_attn=False):
        ab = ABAR[t].view(-1, 1, 1, 1).to(x.dtype)
        return (1 - ab).sqrt() * x / (ab * self.s ** 2 + 1 - ab)


def test_samplers_against_the_closed_form_ode_solution():
    s = 0.5
    x_T = torch.randn(64, 3, 4, 4, dtype=torch.float64)
    exact = s * x_T / math.sqrt(float(ABAR[999]) * s ** 2 + 1 - float(ABAR[999]))
    y = torch.zeros(64, dtype=torch.long)

    def error(sampler, steps):
        return ((sample(GaussianDataEps(s), x_T, y, steps, sampler=sampler)
                 - exact).norm() / exact.norm()).item()
    # Euler in EDM's variables is DDIM for an eps-prediction model (Karras et al. 2022, Sec. 3)
    assert torch.allclose(sample(GaussianDataEps(s), x_T, y, 10, sampler="euler"),
                          sample(GaussianDataEps(s), x_T, y, 10, sampler="ddim"), atol=1e-10)
    # the second-order multistep solver is closer than the first-order one, and both converge
    for steps in (5, 10, 20):
        assert error("dpm2m", steps) < error("ddim", steps)
    assert error("ddim", 50) < error("ddim", 10) and error("dpm2m", 50) < 1e-2


def test_min_snr_weighting():
    """Min-SNR-gamma for eps-prediction: each sample's squared error weighted by min(SNR_t,
    gamma) / SNR_t."""
    class Zero(torch.nn.Module):
        def forward(self, x, t, y):
            return torch.zeros_like(x)

    x0, y = torch.randn(6, 3, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    loss = lambda **k: diffusion.training_loss(  # noqa: E731
        Zero(), x0, y, 3, 0.0, torch.Generator().manual_seed(5), **k)
    gen = torch.Generator().manual_seed(5)  # the same draws, written out
    t, eps = torch.randint(0, 1000, (6,), generator=gen), torch.randn(x0.shape, generator=gen)
    snr = ABAR[t] / (1 - ABAR[t])
    expected = ((eps ** 2).mean((1, 2, 3)) * snr.clamp(max=5.0) / snr).mean()
    assert loss(min_snr=5.0).item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss().item() == pytest.approx((eps ** 2).mean().item(), rel=1e-6)  # off: the plain loss
    # gamma above every SNR: no weight
    assert loss(min_snr=1e12).item() == pytest.approx(loss().item(), rel=1e-5)
