"""The scripts end to end on tiny settings: teacher -> pairs -> refiner -> table -> sampler."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import diffusion
import metrics
import pairs
import sample
import train_refiner
import train_teacher
from conftest import tiny_model
from safety import BadInput


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
            img = np.where(mask[..., None], rng.uniform(150, 255, 3),
                           rng.uniform(0, 80, 3)).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i:02d}.png")
    return str(root)


def tiny_teacher(root, monkeypatch):
    """A 4-step teacher on a tiny image folder, with the filter and the judge (20 steps each)
    trained and cached next to the data, so that subprocesses reuse them. Returns the path of the
    teacher checkpoint."""
    monkeypatch.setattr(metrics, "CLASSIFIER_STEPS", 20)
    # tiny runs test the plumbing, not the intervals' width
    monkeypatch.setattr(metrics, "BOOTSTRAP", 100)
    folder = make_folder(root / "images")
    train_teacher.main(["--dataset", "folder", "--data-dir", folder, "--image-size", "8",
                        "--steps", "4", "--batch-size", "8", "--grid-every", "1000", "--weak-step",
                        "2", "--out", str(root / "t"), "--device", "cpu"])
    metrics.load_filter("folder", folder, 8)
    metrics.load_judge("folder", folder, 8)
    return str(root / "t" / "ckpt.pt")


TINY_RUN = ["--pairs", "24", "--guide-steps", "3", "--msd-steps", "2", "--steps", "4",
            "--val-every", "2", "--batch-size", "4", "--filter", "0", "--val-frac", "0.2",
            "--eval-n", "8", "--eval-steps", "2", "--device", "cpu"]


@pytest.mark.device
def test_train_refiner_end_to_end(tmp_path, monkeypatch, device):
    teacher = tiny_teacher(tmp_path, monkeypatch)
    out = tmp_path / "r"
    train_refiner.main(["--teacher", teacher, *TINY_RUN, "--out", str(out), "--device", device])
    report = json.load(open(out / "metrics.json"))
    rows = {r["name"]: r for r in report["regimes"]}
    assert list(rows) == ["unguided", "cfg", "cfg_top", "refined"]
    assert rows["cfg"]["w"] == 3.0 and rows["cfg_top"]["w"] == 4.0  # midpoint and top of --w-range
    # forwards are counted, not assumed: N unguided, 2N with CFG, 1 + N refined
    assert [rows[n]["nfe_per_image"] for n in rows] == [2.0, 4.0, 4.0, 3.0]
    for r in rows.values():
        assert (0 <= r["class_acc"] <= 1 and r["fd_cls"] >= 0 and 0 <= r["precision"] <= 1
                and 0 <= r["recall"] <= 1)
        assert (r["diversity"] > 0
                and r["ci"]["class_acc"][0] <= r["class_acc"] <= r["ci"]["class_acc"][1])
    assert (report["bank"] == "test"
            and report["judge"]["train_half"] != report["filter"]["train_half"])
    assert report["judge"]["seed"] != report["filter"]["seed"]
    assert set(report["differences"]) == {"refined - unguided", "refined - cfg",
                                          "refined - cfg_top"}
    assert os.path.isfile(out / "regimes.png")

    sample.main(["--teacher", teacher, "--refiner", str(out / "ckpt.pt"), "--per-label", "3",
                 "--steps", "2", "--out", str(tmp_path / "s" / "refined"), "--device", device])
    npz = np.load(tmp_path / "s" / "refined.npz")
    assert npz["images"].shape == (6, 3, 8, 8) and npz["labels"].tolist() == [0, 0, 0, 1, 1, 1]


def test_a_refiner_finds_its_teacher_from_any_folder_and_out_takes_an_extension(
        tmp_path, monkeypatch):
    tiny_teacher(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    # the teacher given relative
    train_refiner.main(["--teacher", "t/ckpt.pt", *TINY_RUN, "--out", "r"])
    os.makedirs("elsewhere")
    monkeypatch.chdir("elsewhere")
    sample.main(["--refiner", str(tmp_path / "r" / "ckpt.pt"), "--per-label", "1", "--steps", "2",
                 "--out", "b.png", "--device", "cpu"])
    assert sorted(os.listdir(".")) == ["b.npz", "b.png"]


@pytest.mark.parametrize("guidance,nfe",
                         [("cfg+pag", 6.0), ("autoguidance", 4.0), ("interval", 3.0)])
def test_train_refiner_with_another_guidance(tmp_path, monkeypatch, guidance, nfe):
    """--guidance makes the pairs with that guidance, and the table compares the refined noise with
    Gaussian noise under that same guidance (forwards per image counted: with 2 steps, CFG + PAG
    runs 3 a step, autoguidance 2 (teacher and weak model), the interval 2 at sigma 1.9 (t = 499)
    and 1 at t = 999)."""
    teacher = tiny_teacher(tmp_path, monkeypatch)
    out = tmp_path / "r"
    train_refiner.main(["--teacher", teacher, *TINY_RUN, "--guidance", guidance,
                        "--interval", "1", "5", "--out", str(out)])
    report = json.load(open(out / "metrics.json"))
    rows = {r["name"]: r for r in report["regimes"]}
    assert list(rows) == ["unguided", guidance, f"{guidance}_top", "refined"]
    assert rows[guidance]["w"] == sum(diffusion.GUIDANCES[guidance]["w_range"]) / 2
    assert [r["nfe_per_image"] for r in rows.values()] == [2.0, nfe, nfe, 3.0]
    assert f"refined - {guidance}" in report["differences"]


def test_the_flags_describe_the_default_pairs(tmp_path, monkeypatch):
    """train_refiner's flags map onto PairSettings field by field: the defaults are the default
    pairs, and each guidance flag lands in its own field (a positional slip once made the seed the
    guidance's name)."""
    # elsewhere: after README command 1, runs/refiner here holds a refiner the default --out refuses
    monkeypatch.chdir(tmp_path)
    assert train_refiner.pair_settings(train_refiner.parse_args([])) == pairs.PairSettings()
    s = train_refiner.pair_settings(
        train_refiner.parse_args(["--guidance", "autoguidance", "--seed", "3"]))
    assert (s.guidance, s.seed, s.amp, s.w_range, s.pag) == (
        "autoguidance", 3, "none", diffusion.GUIDANCES["autoguidance"]["w_range"], 0)
    s = train_refiner.pair_settings(
        train_refiner.parse_args(["--guidance", "cfg+pag", "--interval", "1", "2"]))
    assert (s.guidance, s.pag, s.interval) == (
        "cfg", diffusion.GUIDANCES["cfg+pag"]["pag"], (1.0, 2.0))


def test_a_teacher_without_its_weak_step_is_refused_in_one_line(tmp_path, monkeypatch):
    """Autoguidance needs the early checkpoint the teacher's training kept; without it, one line
    saying how to get it (no re-run of the training behind the user's back)."""
    import teacher as teachers
    path = tiny_teacher(tmp_path, monkeypatch)  # 4 steps, keeps step 2
    teachers.get_weak(path, "cpu")
    os.remove(teachers.weak_path(path, 2))
    with pytest.raises(BadInput, match="--weak-step 2"):
        teachers.get_weak(path, "cpu")


def test_a_weak_step_not_kept_is_rebuilt_only_when_the_rerun_retraces_the_teacher(
        tmp_path, monkeypatch):
    """analyze.py guidance also guides with a step the training did not keep: rebuild_weak re-runs
    the training to it, accepted only if the re-run's losses equal the original's (then its weights
    equal the step the training would have kept itself)."""
    import teacher as teachers
    import teacher_loop
    path = tiny_teacher(tmp_path, monkeypatch)  # 4 steps, keeps step 2
    kept = torch.load(teachers.weak_path(path, 2), weights_only=True)
    os.remove(teachers.weak_path(path, 2))
    teacher_loop.rebuild_weak(path, 2, "cpu")
    rebuilt = torch.load(teachers.weak_path(path, 2), weights_only=True)
    assert all(torch.equal(kept["ema"][k], rebuilt["ema"][k]) for k in kept["ema"])
    os.remove(teachers.weak_path(path, 2))
    ckpt = torch.load(path, weights_only=True)
    ckpt["losses"][0] += 1e-3  # as if the first steps had been trained otherwise
    torch.save(ckpt, path)
    with pytest.raises(BadInput, match="did not retrace"):
        teacher_loop.rebuild_weak(path, 2, "cpu")
    assert not os.path.exists(teachers.weak_path(path, 2))
    assert not os.path.exists(teachers.weak_path(path, 2) + ".run")


def test_the_pair_cache_is_named_by_its_settings_and_refuses_pairs_of_others(tmp_path):
    """A reader can tell a cache by its name; the settings.json inside is compared when the folder
    is used again, so pairs of other settings are never mixed in (--pairs-dir included)."""
    s = pairs.PairSettings(count=10000)
    assert os.path.basename(pairs.cache_dir(s, "runs/teacher/ckpt.pt", "0123456789abcdef")) == \
        "pairs-cfg-w2-4-steps20-seed0-shard1000-teacher01234567"
    auto = pairs.PairSettings(count=10000, guidance="autoguidance")
    names = {pairs.cache_dir(x, "t/ckpt.pt", "fp", weak)
             for x, weak in [(s, None), (auto, "weak1"), (auto, "weak2")]}
    assert len(names) == 3  # another guidance, or another weak model, is another cache
    teacher = tiny_model("unet")
    pairs.check_cache(str(tmp_path), pairs.cache_settings(s, teacher, diffusion.CFG))
    pairs.check_cache(str(tmp_path), pairs.cache_settings(s, teacher, diffusion.CFG))  # the same
    other = pairs.PairSettings(count=10000, guide_steps=10)
    with pytest.raises(BadInput, match="another guide_steps"):
        pairs.check_cache(str(tmp_path), pairs.cache_settings(other, teacher, diffusion.CFG))


def test_the_table_does_not_depend_on_the_filter(tmp_path, monkeypatch):
    """With --filter 0 the filter keeps every pair, so a different filter network must leave every
    score unchanged: the scores come from the judge alone."""
    teacher = tiny_teacher(tmp_path, monkeypatch)
    train_refiner.main(["--teacher", teacher, *TINY_RUN, "--out", str(tmp_path / "a")])
    monkeypatch.setattr(metrics, "FILTER", metrics.Spec("filter", seed=7, width=8, half=0))
    train_refiner.main(["--teacher", teacher, *TINY_RUN, "--out", str(tmp_path / "b")])
    a, b = (json.load(open(tmp_path / r / "metrics.json")) for r in "ab")
    assert a["filter"]["width"] != b["filter"]["width"]
    untimed = [[{k: v for k, v in r.items() if not k.startswith("sec_per_image")}
                for r in x["regimes"]] for x in (a, b)]
    assert untimed[0] == untimed[1] and a["differences"] == b["differences"]


class SureEvaluator:
    """A stand-in filter: confident in every pair."""
    value, name = 1.0, "sure"

    def confidence(self, images, labels):
        return torch.full((len(labels),), self.value)

    def fingerprint(self):
        return self.name


class DoubtfulEvaluator(SureEvaluator):
    value, name = 0.25, "doubtful"


def test_pair_shards_resume_identically(tmp_path, monkeypatch):
    monkeypatch.setattr(pairs, "SHARD", 10)
    teacher = tiny_model("unet")
    args = pairs.PairSettings(count=30, guide_steps=3)
    folder = str(tmp_path / "pairs")
    first = pairs.load_pairs(teacher, SureEvaluator(), args, folder, 4, 8)
    assert sorted(os.listdir(folder)) == ["settings.json", "shard_00000.pt", "shard_00001.pt",
                                          "shard_00002.pt"]
    # an interrupted run: shard 1 never finished, only its temporary file is left
    os.remove(os.path.join(folder, "shard_00001.pt"))
    open(os.path.join(folder, "shard_00001.pt.tmp"), "wb").write(b"half a shard")
    again = pairs.load_pairs(teacher, SureEvaluator(), args, folder, 4, 8)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert first["x0_guide"].dtype == torch.uint8 and len(first["y"]) == 30
    # another filter: the cached confidences are stale, so they are recomputed (the pairs themselves
    # stay)
    doubted = pairs.load_pairs(teacher, DoubtfulEvaluator(), args, folder, 4, 8)
    assert torch.equal(doubted["conf"], torch.full((30,), 0.25))
    assert all(torch.equal(first[k], doubted[k]) for k in first if k != "conf")
    assert (torch.load(os.path.join(folder, "shard_00000.pt"), weights_only=True)["filter"]
            == "doubtful")


def test_quick_look_runs_every_stage_in_a_fresh_folder(tmp_path):
    """README's quick look, as a newcomer types it, from a folder with nothing in it: the shipped
    teacher copied, then pairs, refiner and table."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, os.path.join(root, "train_refiner.py"), "--quick",
                             "--device", "cpu"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "the default teacher: the shipped one" in result.stdout
    report = json.load(open(tmp_path / "runs" / "quick" / "refiner" / "metrics.json"))
    assert [r["name"] for r in report["regimes"]] == ["unguided", "cfg", "cfg_top", "refined"]
    assert report["args"]["quick"] and report["args"]["steps"] == train_refiner.QUICK["steps"]
    assert (tmp_path / "runs" / "teacher" / "ckpt.pt").exists()
    assert (tmp_path / "runs" / "quick" / "refiner" / "regimes.png").exists()
    # what the quick look shows: the refined noise without guidance is judged better than the
    # unguided noise
    diff = report["differences"]["refined - unguided"]["class_acc"]
    assert diff[1] > 0, diff
