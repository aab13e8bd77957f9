"""The scripts end to end on tiny settings: teacher -> pairs -> refiner -> table -> sampler."""
import json
import os

import numpy as np
import torch
from PIL import Image

import evaluate
import sample
import train_refiner
import train_teacher
from conftest import tiny_model


def make_folder(root, per_class=20, size=12):
    """Two classes of real image files: a bright square or a bright disk on a dark background."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for name in ("disk", "square"):
        os.makedirs(root / name)
        for i in range(per_class):
            cx, cy, r = rng.uniform(4, size - 4, 2).tolist() + [rng.uniform(2, 3.5)]
            mask = (np.hypot(xx - cx, yy - cy) <= r) if name == "disk" else \
                (np.maximum(abs(xx - cx), abs(yy - cy)) <= r)
            img = np.where(mask[..., None], rng.uniform(150, 255, 3), rng.uniform(0, 80, 3)).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i:02d}.png")
    return str(root)


def tiny_teacher(root, monkeypatch):
    """A 4-step teacher on a tiny image folder, with the evaluator's classifier (20 steps) trained and cached
    next to the data, so that subprocesses reuse it. Returns the path of the teacher checkpoint."""
    monkeypatch.setattr(evaluate, "CLASSIFIER_STEPS", 20)
    folder = make_folder(root / "images")
    train_teacher.main(["--dataset", "folder", "--data-dir", folder, "--image-size", "8", "--steps", "4",
                        "--batch-size", "8", "--grid-every", "1000", "--out", str(root / "t"), "--device", "cpu"])
    evaluate.load_or_train_classifier("folder", folder, 8)
    return str(root / "t" / "ckpt.pt")


def test_train_refiner_end_to_end(tmp_path, monkeypatch):
    teacher = tiny_teacher(tmp_path, monkeypatch)
    out = tmp_path / "r"
    train_refiner.main(["--teacher", teacher, "--pairs", "24", "--guide-steps", "3", "--msd-steps", "2",
                        "--steps", "4", "--val-every", "2", "--batch-size", "4", "--filter", "0",
                        "--val-frac", "0.2", "--eval-n", "8", "--eval-steps", "2", "--out", str(out),
                        "--device", "cpu"])
    rows = {r["name"]: r for r in json.load(open(out / "metrics.json"))["regimes"]}
    assert list(rows) == ["unguided", "cfg", "cfg_top", "refined"]
    assert rows["cfg"]["w"] == 3.0 and rows["cfg_top"]["w"] == 4.0  # midpoint and top of --w-range
    # forwards are counted, not assumed: N unguided, 2N with CFG, 1 + N refined
    assert [rows[n]["nfe_per_image"] for n in rows] == [2.0, 4.0, 4.0, 3.0]
    assert all(0 <= r["class_acc"] <= 1 and r["fd_cls"] >= 0 for r in rows.values())
    assert os.path.isfile(out / "regimes.png")

    sample.main(["--teacher", teacher, "--refiner", str(out / "ckpt.pt"), "--per-label", "3", "--steps", "2",
                 "--out", str(tmp_path / "s" / "refined"), "--device", "cpu"])
    npz = np.load(tmp_path / "s" / "refined.npz")
    assert npz["images"].shape == (6, 3, 8, 8) and npz["labels"].tolist() == [0, 0, 0, 1, 1, 1]


class SureEvaluator:
    def confidence(self, images, labels):
        return torch.ones(len(labels))


def test_pair_shards_resume_identically(tmp_path, monkeypatch):
    monkeypatch.setattr(train_refiner, "SHARD", 10)
    teacher = tiny_model("unet")
    args = train_refiner.parse_args(["--pairs", "30", "--guide-steps", "3"])
    folder = str(tmp_path / "pairs")
    first = train_refiner.load_pairs(teacher, SureEvaluator(), args, folder, 4, 8)
    assert sorted(os.listdir(folder)) == ["shard_00000.pt", "shard_00001.pt", "shard_00002.pt"]
    # an interrupted run: shard 1 never finished, only its temporary file is left
    os.remove(os.path.join(folder, "shard_00001.pt"))
    open(os.path.join(folder, "shard_00001.pt.tmp"), "wb").write(b"half a shard")
    again = train_refiner.load_pairs(teacher, SureEvaluator(), args, folder, 4, 8)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert first["x0_guide"].dtype == torch.uint8 and len(first["y"]) == 30
