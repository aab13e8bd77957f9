"""No noise the repository shows or scores is a training pair's x_T: every source of Gaussian noise
(pair shards, the validation split, the dev and test banks, sample.py, the teacher's grid,
analyze.py, bench.py) is checked against the x_T of the pair shards, drawn by the same code the
scripts run."""
import types

import numpy as np
import pytest
import torch
import torch.nn as nn

import analyze
import bench
import noises
import pairs
import sample
import teacher_loop
from checkpoint import FORMAT, save_atomic
from conftest import tiny_model

K, SIZE, SHARDS = 10, 16, 10


def keys(x):
    """One key per noise: the bytes of its first 16 values (two Gaussian noises never share
    them)."""
    return {row.tobytes() for row in x.flatten(1)[:, :16].numpy()}


def pair_noises(seed, size=SIZE, num_classes=K, shards=SHARDS):
    # what `train_refiner.py --seed` draws
    settings = pairs.PairSettings(count=shards * pairs.SHARD, seed=seed)
    return torch.cat([pairs.pair_inputs(i, settings, num_classes, size)[0] for i in range(shards)])


@pytest.fixture(scope="module")
def pair_keys():
    """The x_T of the default 10,000 pairs at seeds 0 and 1 (what `python train_refiner.py`
    draws)."""
    return keys(torch.cat([pair_noises(0), pair_noises(1)]))


def test_pair_shards_never_repeat_a_noise_and_validation_is_not_training():
    x_T = pair_noises(0)
    assert len(keys(x_T)) == len(x_T)  # no two shards (or two pair_keys) share a noise
    n = len(x_T)
    train, val = pairs.split_pairs({"x_T": x_T, "y": torch.arange(n) % K, "conf": torch.ones(n)},
                                   pairs.FILTER, pairs.VAL_FRAC, 32)
    assert len(val["y"]) > 0 and not keys(train["x_T"]) & keys(val["x_T"])


@pytest.mark.parametrize("bank", noises.BANKS)
def test_the_held_out_banks_are_not_training_noises(pair_keys, bank):
    for index in (0, 1):  # the bank and the analyses' second noises
        x_T, y = noises.bank(bank, 1000, K, (3, SIZE, SIZE), index)
        assert not keys(x_T) & pair_keys
    # tuning never sees the reported noises
    assert not keys(noises.bank("dev", 1000, K, (3, SIZE, SIZE))[0]) & \
        keys(noises.bank("test", 1000, K, (3, SIZE, SIZE))[0])


def test_analyze_draws_from_the_dev_bank_and_its_own_stream(pair_keys):
    ctx = types.SimpleNamespace(n=1000, K=K, size=SIZE)
    assert torch.equal(analyze.bank(ctx)[0], noises.bank("dev", 1000, K, (3, SIZE, SIZE))[0])
    assert (not keys(analyze.bank(ctx)[0]) & pair_keys
            and not keys(analyze.bank(ctx, index=1)[0]) & pair_keys)
    jacobian_noise = torch.randn(1000, 3, SIZE, SIZE, generator=noises.generator("analysis"))
    assert not keys(jacobian_noise) & pair_keys


class Recorder(nn.Module):
    """A stand-in teacher that records the x it is first called with (the x_T of a sampling run)."""
    num_classes = K

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))
        self.seen = None

    def forward(self, x, t, y, identity_attn=False):
        if self.seen is None:  # the first call of an unguided run gets x_T itself
            self.seen = x.clone()
        return torch.zeros_like(x)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_teachers_grid_is_not_training_noise(pair_keys, seed, tmp_path):
    model = Recorder()
    teacher_loop.write_grid(model, [str(k) for k in range(K)], SIZE, 0.0,
                             str(tmp_path / "g.png"), seed=seed)
    assert model.seen.shape == (K * 8, 3, SIZE, SIZE)
    assert not keys(model.seen) & pair_keys


@pytest.mark.parametrize("seed", [0, 1])
def test_bench_inputs_are_not_training_noise(pair_keys, seed):
    model = types.SimpleNamespace(config=types.SimpleNamespace(image_size=SIZE))
    x, _ = bench.inputs(model, 256, "cpu", seed)
    assert not keys(x) & pair_keys


def test_sample_py_draws_no_training_noise(tmp_path):
    """sample.py with its default seed used to draw exactly the x_T of pair shard 0."""
    model = tiny_model("unet", num_classes=4)
    save_atomic({"kind": "teacher", "format": FORMAT, "config": model.config.__dict__,
                 "ema": model.state_dict(), "data": {"dataset": "shapes", "data_dir": "data",
                                                     "image_size": 8, "classes": list("abcd")}},
                str(tmp_path / "teacher.pt"))
    shown = set()
    for seed in (0, 1):
        sample.main(["--teacher", str(tmp_path / "teacher.pt"), "--per-label", "25", "--steps", "1",
                     "--seed", str(seed), "--out", str(tmp_path / f"s{seed}"), "--device", "cpu"])
        shown |= keys(torch.from_numpy(np.load(tmp_path / f"s{seed}.npz")["x_T"]))
    assert len(shown) == 200
    assert not shown & keys(torch.cat([pair_noises(0, 8, 4, 2), pair_noises(1, 8, 4, 2)]))


def test_streams_are_named_and_reproducible():
    a = torch.randn(5, generator=noises.generator("sample", 3, 1))
    assert torch.equal(a, torch.randn(5, generator=noises.generator("sample", 3, 1)))
    assert not torch.equal(a, torch.randn(5, generator=noises.generator("sample", 3, 2)))
    with pytest.raises(ValueError):
        noises.generator("typo")
