"""The teacher study's plumbing on tiny settings: every stage runs once, a re-run reuses the caches,
the other bank scores the same refiner without retraining it, and an edited recipe is refused in one
line."""
import importlib
import json
import time

import pytest
import torch

import metrics
import study

TINY_TEACHER = ["--steps", "6", "--batch-size", "16", "--warmup", "2", "--save-every", "6",
                "--grid-every", "6", "--weak-step", "3"]
TINY_REFINER = ["--pairs", "64", "--steps", "4", "--val-every", "2", "--filter", "0",
                "--eval-n", "40", "--eval-steps", "2", "--guide-steps", "2", "--msd-steps", "2"]


@pytest.fixture
def tiny_study(tmp_path, monkeypatch):
    # the shapes set is made under ./data; the shipped classifiers are found
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(study, "TEACHERS", {"tiny": TINY_TEACHER})
    monkeypatch.setattr(study, "ALL_TEACHERS", study.TEACHERS)
    monkeypatch.setattr(study, "RECIPES", {"default": TINY_REFINER})
    # tiny runs test the plumbing, not the intervals' width
    monkeypatch.setattr(metrics, "BOOTSTRAP", 100)
    calls = []

    def run_here(script, flags):  # in this process, so that the settings above hold; recorded
        calls.append((script, flags))
        start = time.perf_counter()
        importlib.import_module(script[:-3]).main(flags)
        return time.perf_counter() - start
    monkeypatch.setattr(study, "run", run_here)
    return tmp_path, calls


def test_study_runs_each_stage_once_reuses_it_and_refuses_an_edited_entry(
        tiny_study, monkeypatch, capsys):
    root, calls = tiny_study
    out = ["--out", str(root / "s"), "--device", "cpu"]
    study.main(out)
    assert [script for script, _ in calls] == ["train_teacher.py", "train_refiner.py"]
    table = json.load(open(root / "s" / "study_default_dev.json"))
    row = table["rows"][0]
    acc = row["class_acc"]
    assert row["teacher"] == "tiny" and set(acc) == {"unguided", "cfg", "cfg_top", "refined"}
    gap = acc["cfg"] - acc["unguided"]
    if gap:
        assert row["gap_closed_acc"] == pytest.approx((acc["refined"] - acc["unguided"]) / gap)
    diff = row["refined_minus_cfg"]["class_acc"]
    assert diff[0] == pytest.approx(acc["refined"] - acc["cfg"]) and diff[1] <= diff[0] <= diff[2]
    assert row["reaches_cfg"] == (diff[0] >= -0.01 and row["refined_minus_cfg"]["fd_cls"][0] <= 0)
    assert "reaches CFG on" in capsys.readouterr().out
    d = row["diagnostics"]
    # the kept step is never worse
    assert d["val_best"] <= d["val_identity"] and d["move_mean_abs"] >= 0

    calls.clear()
    study.main(out)  # everything cached: nothing runs
    assert calls == []
    refiner = root / "s" / "tiny" / "refiner-default"
    trained = torch.load(refiner / "ckpt.pt", weights_only=True)
    capsys.readouterr()
    # the same refiner, scored on the test bank
    study.main(out + ["--bank", "test", "--fd-reference"])
    assert len(calls) == 1 and calls[0][0] == "train_refiner.py" and "--resume" in calls[0][1]
    assert (torch.load(refiner / "ckpt.pt", weights_only=True)["state"].keys()
            == trained["state"].keys())
    # nothing retrained
    assert all(torch.equal(v, trained["best"][k]) for k, v in
               torch.load(refiner / "ckpt.pt", weights_only=True)["best"].items())
    assert json.load(open(refiner / "metrics_test.json"))["bank"] == "test"
    assert ((refiner / "measured_test.pt").is_file()
            and (root / "s" / "study_default_test.json").is_file())
    printed = capsys.readouterr().out
    assert ("real reference fixed: unguided [" in printed
            and "real reference resampled: unguided [" in printed)

    # an edited entry
    monkeypatch.setattr(study, "TEACHERS", {"tiny": TINY_TEACHER + ["--lr", "1e-3"]})
    monkeypatch.setattr(study, "ALL_TEACHERS", study.TEACHERS)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        study.main(out)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    # with what was trained on it
    assert len(err) == 1 and f"delete {root / 's' / 'tiny'} to redo it" in err[0]
