"""The teacher shipped in teachers/ is the one today's default recipe names, it holds what sampling
needs and nothing to resume, it samples its classes, and a run with no teacher given starts from
it."""
import dataclasses
import os

import pytest
import torch

import data
import noises
import teacher
from checkpoint import load_checkpoint, load_teacher, save_atomic
from diffusion import sample_many
from metrics import load_judge
from models import model_config
from safety import BadInput

SETTINGS = teacher.TeacherSettings()


@pytest.fixture(scope="module")
def shipped():
    path = teacher.shipped_path(SETTINGS)
    assert os.path.isfile(path), ("no teacher in teachers/ named for today's TeacherSettings: run "
                                  "`python train_teacher.py --check-shipped` and commit "
                                  f"{os.path.basename(path)}")
    return path


def test_the_shipped_teacher_is_the_one_todays_recipe_and_code_name(shipped):
    ckpt = load_checkpoint(shipped, "teacher")
    assert ckpt["args"] == dataclasses.asdict(SETTINGS) and ckpt["step"] == SETTINGS.steps
    shapes = data.load_dataset(SETTINGS.dataset, SETTINGS.data_dir, SETTINGS.image_size, "train")
    assert ckpt["config"] == model_config(SETTINGS.model, len(shapes.classes),
                                          shapes.images.shape[-1])
    assert ckpt["data"]["classes"] == shapes.classes
    # no optimiser
    assert set(ckpt) == {"kind", "format", "config", "data", "ema", "step", "losses", "args"}
    # autoguidance's weak model
    weak = load_checkpoint(teacher.shipped_weak_path(SETTINGS), "teacher")
    assert (weak["step"] == SETTINGS.weak_step
            and weak["losses"] == ckpt["losses"][:SETTINGS.weak_step])
    # the copies they replaced were removed
    assert sorted(os.listdir(teacher.SHIPPED)) == sorted(
        os.path.basename(p) for p in (shipped, teacher.shipped_weak_path(SETTINGS)))


def test_the_shipped_teacher_draws_its_classes_and_cfg_draws_them_better(shipped):
    model, ckpt = load_teacher(shipped)  # strict: today's network code takes every weight
    judge = load_judge("shapes", "data", ckpt["data"]["image_size"])
    x_T, y = noises.bank("dev", 200, len(ckpt["data"]["classes"]), (3, 16, 16))
    with torch.no_grad():
        acc = {w: judge.score(sample_many(model, x_T, y, 20, w), y)["class_acc"]
               for w in (0.0, 3.0)}
    assert 0.4 < acc[0.0] < acc[3.0] and acc[3.0] > 0.8, acc


def test_a_run_with_no_teacher_given_copies_the_shipped_one(shipped, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, ckpt, path = teacher.pretrained(None, "cpu")
    assert path == teacher.DEFAULT_TEACHER and os.path.isfile(path)
    weights = load_checkpoint(shipped, "teacher")["ema"]
    assert all(torch.equal(v, weights[k]) for k, v in ckpt["ema"].items())
    teacher.get_weak(path, "cpu")  # autoguidance finds the weak model copied beside it


def test_a_teacher_already_in_runs_teacher_is_used_never_replaced(shipped, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("runs/teacher")
    # trained here: it has an optimiser state
    mine = {**load_checkpoint(shipped, "teacher"), "opt": {}}
    mine["ema"] = {k: v + 1 for k, v in mine["ema"].items()}
    save_atomic(mine, teacher.DEFAULT_TEACHER)
    before = open(teacher.DEFAULT_TEACHER, "rb").read()
    assert teacher.default_teacher() == teacher.DEFAULT_TEACHER
    assert open(teacher.DEFAULT_TEACHER, "rb").read() == before
    stale = {k: v for k, v in mine.items() if k != "opt"}  # a shipped copy of another recipe
    save_atomic({**stale, "args": {**stale["args"], "steps": 1}}, teacher.DEFAULT_TEACHER)
    with pytest.raises(BadInput, match="shipped teacher of other settings"):
        teacher.default_teacher()
