"""Both teachers: shapes, zero-initialised outputs, the null label, the PAG switch, preset sizes."""
import pytest
import torch

from models import build_model, model_config
from conftest import tiny_model

ARCHS = ["dit", "unet"]


@pytest.mark.parametrize("arch", ARCHS)
def test_output_shape_equals_input_shape(arch):
    model = tiny_model(arch)
    x = torch.randn(3, 3, 8, 8)
    assert model(x, torch.tensor([0, 500, 999]), torch.tensor([0, 1, 4])).shape == x.shape


@pytest.mark.parametrize("preset", ["dit-tiny", "unet-tiny"])
def test_initial_output_is_exactly_zero(preset):
    model = build_model(model_config(preset, 10))
    x = torch.randn(2, 3, 16, 16)
    assert torch.count_nonzero(model(x, torch.tensor([3, 999]), torch.tensor([1, 10]))) == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_null_label_is_accepted_and_differs_from_a_class(arch):
    model = tiny_model(arch)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([500, 500])
    null = torch.full((2,), model.num_classes)
    assert not torch.allclose(model(x, t, null), model(x, t, torch.zeros(2, dtype=torch.long)))
    with pytest.raises(IndexError):
        model(x, t, null + 1)


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_attention_switch_changes_the_output(arch):
    model = tiny_model(arch)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([500, 500]), torch.tensor([0, 1])
    assert not torch.allclose(model(x, t, y), model(x, t, y, identity_attn=True), atol=1e-6)


def test_identity_attention_returns_the_values():
    from dit import Attention
    attn = Attention(8, 2)
    x = torch.randn(1, 5, 8)
    v = attn.qkv(x)[..., 16:]
    assert torch.allclose(attn(x, identity_attn=True), attn.proj(v), atol=1e-6)


# (min, max) parameters in millions; the CIFAR ones are "roughly DiT-S/2 and DDPM-CIFAR size"
PRESET_SIZES = {"dit-tiny": (0.5, 3), "unet-tiny": (0.3, 1.5), "dit-cifar": (30, 40),
                "unet-cifar": (30, 40), "dit-imagenet64": (40, 80), "unet-imagenet64": (60, 130)}


@pytest.mark.parametrize("preset", sorted(PRESET_SIZES))
def test_preset_parameter_counts(preset):
    lo, hi = PRESET_SIZES[preset]
    n = sum(p.numel() for p in build_model(
        model_config(preset, 10 if "imagenet" not in preset else 1000)).parameters())
    assert lo * 1e6 <= n <= hi * 1e6, f"{preset}: {n / 1e6:.2f}M"


@pytest.mark.parametrize("arch", ARCHS)
def test_config_rebuilds_the_same_model(arch):
    model = tiny_model(arch)
    again = build_model(model.config.__dict__ if hasattr(model.config, "__dict__")
                        else model.config)
    again.load_state_dict(model.state_dict())
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1])
    assert torch.equal(model(x, t, y), again.eval()(x, t, y))


def test_image_size_not_divisible_by_patch_is_a_clear_error():
    with pytest.raises(ValueError, match="patch"):
        build_model(model_config("dit-tiny", 10, image_size=18))
