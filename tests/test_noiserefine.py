"""The loss math of NoiseRefine, for students to read: refiner, L_MSD and its closed-form gradient,
stop-gradient, Proposition 2, LoRA."""
import math

import pytest
import torch
import torch.nn as nn

from conftest import tiny_model
from diffusion import ddim_schedule, sample
from noiserefine import LoRA, Refiner, add_lora, full_loss, lora_layers, msd_loss, prod_a

ARCHS = ["dit", "unet"]


def batch(n=3, size=8, num_classes=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, size, size, generator=g),
            torch.randint(num_classes, (n,), generator=g),
            torch.randn(n, 3, size, size, generator=g).clamp(-1, 1))


# ----------------------------------------------------------------------------------------------
# The refiner g_phi
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("rank", [4, 0])
def test_refiner_is_exactly_the_identity_at_initialisation(arch, rank):
    teacher = tiny_model(arch)
    x_T, y, _ = batch()
    assert torch.equal(Refiner(teacher, rank)(x_T, y), x_T)


@pytest.mark.parametrize("arch", ARCHS)
def test_refiner_costs_one_forward_and_uses_the_class(arch):
    teacher = tiny_model(arch)
    refiner = Refiner(teacher, 4)
    with torch.no_grad():
        refiner.net.output_layer().weight.normal_(0, 0.1)
    calls = []
    refiner.net.register_forward_hook(lambda *a: calls.append(1))
    x_T, _, _ = batch(2)
    a, b = refiner(x_T, torch.tensor([0, 0])), refiner(x_T, torch.tensor([1, 1]))
    assert len(calls) == 2 and not torch.allclose(a, b)


# ----------------------------------------------------------------------------------------------
# L_MSD and its gradient
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_msd_gradient_equals_the_closed_form(arch):
    """dL_MSD/dx_hat_T = (prod_t a_t) * 2 (x_hat_0 - x0_guide) / numel."""
    teacher = tiny_model(arch).double()
    x_T, y, x0_guide = (t.double() if t.is_floating_point() else t for t in batch())
    x_hat_T = x_T.clone().requires_grad_(True)
    loss = msd_loss(teacher, x_hat_T, y, x0_guide, steps=10)
    loss.backward()
    x_hat_0 = sample(teacher, x_T, y, steps=10)  # the same chain, unguided
    expected = prod_a(10) * 2 * (x_hat_0 - x0_guide) / x0_guide.numel()
    assert torch.allclose(x_hat_T.grad, expected, rtol=1e-9, atol=1e-12)
    assert math.isclose(loss.item(), ((x_hat_0 - x0_guide) ** 2).mean().item(), rel_tol=1e-12)


def test_prod_a_is_one_over_sqrt_abar_999():
    from diffusion import ABAR
    assert math.isclose(prod_a(10), 1 / math.sqrt(ABAR[999].item()), rel_tol=1e-12)
    assert math.isclose(prod_a(10), math.prod(a for _, a, _ in ddim_schedule(10)))


class Nonlinear(nn.Module):
    """eps(x) = tanh(W x) + x^2 / 4, with a parameter so we can see whether it gets a gradient."""
    num_classes = 1

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.7, dtype=torch.float64))

    def forward(self, x, t, y, identity_attn=False):
        return torch.tanh(self.scale * x.flip(-1)) + x ** 2 / 4


def test_stop_gradient_really_stops():
    teacher = Nonlinear()
    x_T, y, x0_guide = (t.double() if t.is_floating_point() else t for t in batch())
    x_hat_T = x_T.clone().requires_grad_(True)
    msd_loss(teacher, x_hat_T, y, x0_guide, steps=5).backward()
    assert teacher.scale.grad is None  # no graph was built through the teacher
    with torch.no_grad():
        x_hat_0 = sample(teacher, x_T, y, steps=5)
    formula = prod_a(5) * 2 * (x_hat_0 - x0_guide) / x0_guide.numel()
    assert torch.allclose(x_hat_T.grad, formula, rtol=1e-9)


def test_the_full_loss_does_backpropagate_through_the_teacher():
    teacher = Nonlinear()
    x_T, y, x0_guide = (t.double() if t.is_floating_point() else t for t in batch())
    with torch.no_grad():
        # L_MSD's
        formula = prod_a(5) * 2 * (sample(teacher, x_T, y, steps=5) - x0_guide) / x0_guide.numel()
    x_full = x_T.clone().requires_grad_(True)
    full_loss(teacher, x_full, y, x0_guide, steps=5).backward()
    assert teacher.scale.grad is not None
    assert not torch.allclose(x_full.grad, formula, rtol=1e-3)


class Linear(nn.Module):
    """eps(x) = c x: its Jacobian is exactly c times the identity."""
    num_classes = 1

    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x, t, y, identity_attn=False):
        return self.c * x


@pytest.mark.parametrize("c", [0.3, 1.0, 0.9])
def test_proposition_2_full_gradient_is_k_times_msd(c):
    """For eps = c x: x_{t-1} = (a_t + b_t c) x_t, so grad_full = prod(a_t + b_t c) * 2 r / numel
    = k * grad_MSD with k = prod_t (1 + b_t c / a_t)."""
    x_T, y, x0_guide = (t.double() if t.is_floating_point() else t for t in batch())
    grads = []
    for loss_fn in (msd_loss, full_loss):
        x = x_T.clone().requires_grad_(True)
        loss_fn(Linear(c), x, y, x0_guide, steps=10).backward()
        grads.append(x.grad)
    k = math.prod(1 + b / a * c for _, a, b in ddim_schedule(10))
    assert torch.allclose(grads[1], k * grads[0], rtol=1e-9)
    if c < 1:  # b_t < 0 on this schedule: for 0 < c <= 1, k lies in (0, 1) as Proposition 2 says
        assert 0 < k < 1


# ----------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layer", [nn.Linear(6, 5), nn.Conv2d(3, 4, 3, stride=2, padding=1)])
def test_lora_merged_and_unmerged_agree(layer):
    lora = LoRA(layer, rank=2, alpha=4)
    x = torch.randn(2, 6) if isinstance(layer, nn.Linear) else torch.randn(2, 3, 7, 7)
    base_out = layer(x)
    assert torch.equal(lora(x), base_out)  # up = 0 at start
    nn.init.normal_(lora.up.weight)
    unmerged = lora(x)
    assert not torch.allclose(unmerged, base_out)
    lora.merge()
    assert torch.allclose(lora(x), unmerged, atol=1e-5)
    lora.unmerge()
    assert torch.allclose(lora.base(x), base_out, atol=1e-5)


def test_lora_forward_is_the_base_plus_the_scaled_low_rank_update():
    """LoRA (Hu et al.): h = W x + b + (alpha / r) B A x, with A = down (r x in), B = up (out x
    r)."""
    layer = nn.Linear(6, 5)
    lora = LoRA(layer, rank=2, alpha=6)
    nn.init.normal_(lora.up.weight)
    x = torch.randn(3, 6)
    A, B = lora.down.weight, lora.up.weight
    expected = x @ layer.weight.T + layer.bias + 3.0 * x @ A.T @ B.T
    assert torch.allclose(lora(x), expected, atol=1e-5)
    assert torch.allclose(lora.delta_weight(), 3.0 * B @ A, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_adapters_and_trainable_parameters(arch):
    teacher = tiny_model(arch)
    n_layers = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in teacher.modules())
    refiner = Refiner(teacher, rank=4)
    head = refiner.net.output_layer()
    assert len(lora_layers(refiner)) == n_layers - 1  # every linear and conv but the fresh head
    trainable = {n for n, p in refiner.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".down." in n or ".up." in n} | \
        {n for n, p in refiner.named_parameters() if p is head.weight or p is head.bias}
    assert any(p is head.weight for p in refiner.parameters() if p.requires_grad)
    assert set(refiner.trainable_state()) == trainable


def test_add_lora_counts_and_skips():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(),
                        nn.Sequential(nn.Conv2d(1, 1, 1), nn.Linear(4, 2)))
    assert add_lora(net, 2, 2, skip=[net[2][1]]) == 2
    assert (isinstance(net[0], LoRA) and isinstance(net[2][0], LoRA)
            and isinstance(net[2][1], nn.Linear))


# ----------------------------------------------------------------------------------------------
# Training: the teacher never changes, and the held-out loss goes down
# ----------------------------------------------------------------------------------------------

def test_msd_training_reduces_held_out_loss_and_leaves_the_teacher_alone():
    teacher = tiny_model("unet", num_classes=2)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    g = torch.Generator().manual_seed(0)

    def pairs(n):  # a target the refiner can reach: the teacher's own image from a shifted noise
        x_T, y = torch.randn(n, 3, 8, 8, generator=g), torch.randint(2, (n,), generator=g)
        shift = (2.0 * y - 1).view(-1, 1, 1, 1) * 0.5
        return x_T, y, sample(teacher, x_T + shift, y, steps=4)

    train, held_out = pairs(256), pairs(64)
    refiner = Refiner(teacher, rank=4)
    opt = torch.optim.Adam([p for p in refiner.parameters() if p.requires_grad], lr=3e-3)
    scale = prod_a(4) ** 2

    def held_out_loss():
        with torch.no_grad():
            return msd_loss(teacher, refiner(held_out[0], held_out[1]), held_out[1],
                            held_out[2], 4).item()

    start = held_out_loss()
    for step in range(200):
        idx = torch.randint(256, (32,), generator=g)
        x_T, y, x0_guide = (t[idx] for t in train)
        loss = msd_loss(teacher, refiner(x_T, y), y, x0_guide, 4) / scale
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert held_out_loss() < 0.5 * start
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
