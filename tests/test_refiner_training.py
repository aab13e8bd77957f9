"""The refiner's training loop: the model that is scored is the one that was chosen.

The best-validation snapshot must not move with later steps; a run stopped and resumed must end on
the same weights as a straight one also when the best validation step came early; and the refiner
trains in train mode and is validated and sampled in eval mode, whatever mode it was built in."""
import pytest
import torch

import data
import noiserefine
from conftest import tiny_model
from noiserefine import Refiner, RefinerSettings


def fake_pairs(n, num_classes=4, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x_T": torch.randn(n, 3, size, size, generator=g),
            "y": torch.randint(num_classes, (n,), generator=g),
            "x0_guide": data.to_uint8(torch.rand(n, 3, size, size, generator=g) * 2 - 1)}


SHORT = RefinerSettings(steps=12, val_every=2, batch_size=4, msd_steps=2, lr=1e-2)


def test_the_best_snapshot_does_not_move_when_the_model_trains():
    refiner = Refiner(tiny_model("unet"), 0)
    snapshot = refiner.trainable_state()
    before = {k: v.clone() for k, v in snapshot.items()}
    opt = torch.optim.AdamW([p for p in refiner.parameters() if p.requires_grad], lr=1e-2)
    pairs = fake_pairs(4)
    refiner(pairs["x_T"], pairs["y"]).pow(2).mean().backward()
    opt.step()
    assert all(torch.equal(snapshot[k], before[k]) for k in snapshot)  # the snapshot stayed
    live = refiner.trainable_state()
    # the model moved
    assert sum(not torch.equal(live[k], before[k]) for k in live) > 0.5 * len(live)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_resume_equals_a_straight_run_when_the_best_validation_step_is_an_early_one(
        tmp_path, monkeypatch, dropout):
    """Also with dropout in the teacher's preset (the CIFAR and ImageNet ones have it): the refiner
    trains in train mode, so its dropout draws random numbers, and a resumed run must draw the same
    ones."""
    # validation "loss": how far the fresh head has moved from zero plus 1 (the identity scores
    # 1 + 0.1), so the first validation after step 0 is the best
    def head_moved(refiner, *args):
        norm = float(refiner.net.output_layer().weight.detach().norm())
        return 1.1 if norm == 0 else 1 + norm
    monkeypatch.setattr(noiserefine, "validation_loss", head_moved)
    teacher = tiny_model("unet", dropout=dropout)
    train, val = fake_pairs(64), fake_pairs(8, seed=1)

    def run(out, **kwargs):
        refiner = noiserefine.fit(Refiner(teacher, 0), teacher, train, val, SHORT, "cpu",
                                  str(out / "ckpt.pt"), {"teacher_fingerprint": "fp"}, **kwargs)
        return refiner.trainable_state(), torch.load(out / "ckpt.pt", weights_only=True)

    straight, ckpt = run(tmp_path / "straight")
    assert ckpt["step"] == 12
    # best was early
    assert not all(torch.equal(ckpt["best"][k], ckpt["state"][k]) for k in ckpt["best"])
    # the chosen model is returned
    assert all(torch.equal(straight[k], ckpt["best"][k]) for k in straight)
    run(tmp_path / "split", stop_at=6)
    resumed, ckpt2 = run(tmp_path / "split", resume=True)
    assert ckpt2["step"] == 12 and ckpt2["best_val"] == ckpt["best_val"]
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert all(torch.equal(ckpt2["state"][k], ckpt["state"][k]) for k in ckpt["state"])


@pytest.mark.parametrize("built", ["copy of an eval-mode teacher", "fresh network in train mode"])
def test_the_refiner_trains_in_train_mode_and_is_validated_in_eval_mode(tmp_path, built):
    teacher = tiny_model("unet")  # eval mode, like a loaded teacher
    base = teacher if built.startswith("copy") else tiny_model("unet").train()
    refiner = Refiner(base, 0)
    modes = []
    refiner.net.register_forward_hook(lambda module, args, out: modes.append(module.training))
    train, val = fake_pairs(64), fake_pairs(8, seed=1)
    t = RefinerSettings(steps=2, val_every=1, batch_size=4, msd_steps=1)
    returned = noiserefine.fit(refiner, teacher, train, val, t, "cpu", str(tmp_path / "ckpt.pt"),
                               {"teacher_fingerprint": "fp"})
    # step 0 validation, then per step: one training forward and one validation forward
    assert modes == [False, True, False, True, False]
    assert not returned.training
