import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import build_model, model_config  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="where the tests marked `device` run (gpu_check.sh: cuda)")


def pytest_configure(config):
    config.addinivalue_line("markers",
                            "device: follows --device (gpu_check.sh runs these with --device cuda)")


@pytest.fixture(scope="session")
def device(request):
    """The device of the tests marked `device`: cpu here, cuda under gpu_check.sh."""
    return request.config.getoption("--device")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)


def tiny_model(arch, num_classes=4, image_size=8, seed=0, dropout=0.0):
    """A very small teacher of either architecture, with random (non-zero) output weights (the UNet
    with dropout, if asked)."""
    torch.manual_seed(seed)
    if arch == "dit":
        cfg = dict(model_config("dit-tiny", num_classes, image_size), patch=2, hidden=32, depth=2,
                   heads=2)
    else:
        cfg = dict(model_config("unet-tiny", num_classes, image_size), ch=8, mult=(1, 2), groups=4,
                   dropout=dropout)
    model = build_model(cfg)
    with torch.no_grad():  # zero-initialised outputs would make every test about eps = 0
        layer = model.output_layer()
        layer.weight.normal_(0, 0.05)
        layer.bias.normal_(0, 0.05)
        for m in model.modules():
            if hasattr(m, "adaLN"):
                m.adaLN[-1].weight.normal_(0, 0.05)
            if m.__class__.__name__ in ("ResBlock",):
                m.conv2.weight.normal_(0, 0.05)
            if m.__class__.__name__ == "AttnBlock":
                m.attn.proj.weight.normal_(0, 0.05)
    return model.eval()


@pytest.fixture
def tiny_unet():
    return tiny_model("unet")


@pytest.fixture
def tiny_dit():
    return tiny_model("dit")
