"""The GPU paths, run here on the CPU: bf16 autocast, torch.compile, channels-last, Inception FID's
plumbing, and tensors that follow the model's device. gpu_check.sh runs the tests marked `device`
again with --device cuda, so the code a GPU user runs is the code CI runs, differing only in the
device.

Catching a CPU tensor that meets a GPU tensor, without a GPU: the library's tensor code runs on the
`meta` device here (shapes without data), where a tensor made on the CPU by mistake raises exactly
as it would next to a CUDA tensor. Covered this way: guided_eps (CFG with a scalar and a per-sample
w, PAG), every sampler in diffusion.sample with return_x0, q_sample, training_loss with a CPU
generator, the refiner (full and LoRA), msd_loss and full_loss with their backward. Scripts
(analyze.py, evaluate.py, sample.py, train_refiner.py, ablate.py) read numbers back (.item()), which
meta cannot; they run with --device in the tests marked `device` (test_analyze, test_pipeline,
below), i.e. on a GPU only under gpu_check.sh.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import evaluate
import metrics
import fid
import train_refiner
import train_teacher
from accel import autocast
from checkpoint import load_checkpoint
from conftest import tiny_model
from diffusion import SAMPLERS, guided_eps, q_sample, sample, training_loss
from noiserefine import Refiner, full_loss, msd_loss
from test_pipeline import TINY_RUN, tiny_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def strict_device(device):
    """Where a stray CPU tensor raises: meta stands in for a GPU on a CPU-only machine."""
    return "meta" if device == "cpu" else device


@pytest.mark.device
@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_the_library_makes_its_tensors_on_the_models_device(arch, device):
    dev = strict_device(device)
    teacher = tiny_model(arch).to(dev)
    x, y = torch.randn(4, 3, 8, 8, device=dev), torch.tensor([0, 1, 2, 3], device=dev)
    for w, pag in [(0.0, 0.0), (3.0, 0.0), (torch.full((4,), 2.0, device=dev), 0.0), (2.0, 1.0)]:
        assert guided_eps(teacher, x, 999, y, w, pag).device.type == torch.device(dev).type
    for name in SAMPLERS:
        final, x0s = sample(teacher, x, y, 3, 2.0, sampler=name, return_x0=True)
        assert final.device.type == torch.device(dev).type and len(x0s) == 3
    assert (q_sample(x, torch.tensor([5, 6, 7, 8], device=dev), x).device.type
            == torch.device(dev).type)
    training_loss(teacher.train(), x, y, 4, 0.5, torch.Generator().manual_seed(0)).backward()
    for rank in (0, 2):
        refiner = Refiner(teacher.eval(), rank).to(dev)
        for loss in (msd_loss, full_loss):
            loss(teacher, refiner(x, y), y, x, 2).backward()


def test_meta_would_catch_a_cpu_tensor():
    """The premise of the test above: a CPU tensor meeting a meta tensor raises."""
    with pytest.raises(RuntimeError):
        torch.zeros(3, device="meta") + torch.ones(3)


@pytest.mark.device
@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_a_bf16_teacher_step_matches_fp32(arch, device):
    """Autocast changes the rounding, not the step: the loss within 1% and the gradient within 5%
    (relative norm of the difference; measured: 1e-4 / 1.2e-2 for the UNet, 1e-5 / 3e-3 for the DiT
    on the CPU)."""
    model = tiny_model(arch).train().to(device)
    x0, y = (torch.randn(16, 3, 8, 8, device=device).clamp(-1, 1),
             torch.randint(4, (16,), device=device))
    results = []
    for amp in ("none", "bf16"):
        model.zero_grad()
        with autocast(device, amp):
            loss = training_loss(model, x0, y, 4, 0.1, torch.Generator(device).manual_seed(0))
        loss.backward()
        results.append((loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (loss32, grad32), (loss16, grad16) = results
    assert abs(loss16 - loss32) <= 0.01 * loss32
    assert (grad16 - grad32).norm() <= 0.05 * grad32.norm()
    assert loss16 != loss32 or not torch.equal(grad16, grad32)  # bf16 did run: the rounding differs


@pytest.mark.device
def test_under_bf16_the_eps_the_chain_and_the_msd_loss_stay_fp32(device):
    teacher = tiny_model("unet").to(device)
    x_T, y = torch.randn(8, 3, 8, 8, device=device), torch.randint(4, (8,), device=device)
    with autocast(device, "bf16"):
        # autocast is on
        assert teacher(x_T, torch.full((8,), 999, device=device), y).dtype == torch.bfloat16
        assert guided_eps(teacher, x_T, 999, y, 3.0).dtype == torch.float32
        assert sample(teacher, x_T, y, 3, 3.0).dtype == torch.float32
        refiner = Refiner(teacher, 0).to(device)
        x_hat = refiner(x_T, y)
        loss = msd_loss(teacher, x_hat, y, torch.zeros_like(x_T), 2)
    assert x_hat.dtype == torch.float32 and loss.dtype == torch.float32


@pytest.mark.device
def test_train_teacher_with_bf16_compile_and_channels_last_then_the_refiner_with_bf16(
        tmp_path, monkeypatch, device):
    """The issue's two commands (at a tiny size): every speed flag at once, then a refiner under
    bf16. The compiled channels-last teacher follows the plain bf16 one: the same losses within
    2%."""
    monkeypatch.setattr(metrics, "CLASSIFIER_STEPS", 20)
    common = ["--steps", "4", "--batch-size", "8", "--amp", "bf16", "--data-dir",
              str(tmp_path / "data"), "--grid-every", "1000", "--device", device]
    train_teacher.main([*common, "--compile", "--channels-last", "--out", str(tmp_path / "fast")])
    train_teacher.main([*common, "--out", str(tmp_path / "plain")])
    fast, plain = (load_checkpoint(str(tmp_path / n / "ckpt.pt"), "teacher")
                   for n in ("fast", "plain"))
    assert fast["step"] == 4 and fast["args"]["amp"] == "bf16" and fast["args"]["compile"]
    assert fast["losses"] == pytest.approx(plain["losses"], rel=0.02)
    # a plain state dict, loadable anywhere
    assert all(not k.startswith("_orig_mod") for k in fast["model"])
    out = tmp_path / "refiner"
    train_refiner.main(["--teacher", str(tmp_path / "fast" / "ckpt.pt"), "--pairs", "64",
                        "--steps", "2", "--batch-size", "8", "--filter", "0", "--eval-n", "20",
                        "--eval-steps", "2", "--amp", "bf16", "--out", str(out),
                        "--device", device])
    report = json.load(open(out / "metrics.json"))
    assert report["args"]["amp"] == "bf16" and len(report["regimes"]) == 4


def stand_in_features(images):
    """A fixed random projection of the pixels: what the tests use instead of Inception's
    weights."""
    gen = torch.Generator().manual_seed(0)
    projection = torch.randn(images[0].numel(), 16, generator=gen, dtype=torch.float64)
    return images.flatten(1).double() @ projection


stand_in_features.name = "stand-in"


def test_fid_plumbing_with_a_stand_in_feature_extractor(tmp_path, monkeypatch):
    monkeypatch.setattr(fid, "inception", lambda device: stand_in_features)
    teacher = tiny_teacher(tmp_path, monkeypatch)
    out = tmp_path / "r"
    train_refiner.main(["--teacher", teacher, *TINY_RUN, "--fid", "--out", str(out)])
    report = json.load(open(out / "metrics.json"))
    assert set(report["fid"]) == {"unguided", "cfg", "cfg_top", "refined"}
    assert all(r["n"] == 8 and r["fid"] >= 0 and r["reference_n"] == 36
               for r in report["fid"].values())
    assert report["fid"]["refined"]["fid_to_cfg"] >= 0
    # another guidance: the refined samples are compared with that guidance's own samples
    train_refiner.main(["--teacher", teacher, *TINY_RUN, "--fid", "--guidance", "interval", "--out",
                        str(tmp_path / "i")])
    assert (json.load(open(tmp_path / "i" / "metrics.json"))["fid"]["refined"]["fid_to_interval"]
            >= 0)
    cached = [f for f in os.listdir(tmp_path / "images") if f.startswith("fid_stats_")]
    assert len(cached) == 1  # the training set's statistics, cached beside the data
    scorer = fid.FID(stand_in_features)  # against its own statistics, a set is at distance 0
    images = torch.rand(50, 3, 8, 8) * 2 - 1
    mu, cov = scorer.stats(images)
    assert scorer.table({"a": images}, (mu, cov, 50))["a"]["fid"] == pytest.approx(0, abs=1e-6)


def test_fid_without_pytorch_fid_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "pytorch_fid", None)
    torch.save({}, tmp_path / "any.pt")  # a checkpoint file: --fid is checked before it is read
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--teacher", str(tmp_path / "any.pt"), "--fid", "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs the optional package pytorch-fid" in err[0]


def test_gpu_check_without_cuda_says_so_in_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: gpu_check.sh would run")
    result = subprocess.run(["bash", os.path.join(ROOT, "gpu_check.sh"), str(tmp_path / "gpu")],
                            cwd=ROOT, capture_output=True, text=True,
                            env=dict(os.environ, PYTHON=sys.executable))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "CUDA" in result.stderr
    assert not os.path.exists(tmp_path / "gpu")  # nothing written
