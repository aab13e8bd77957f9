"""A real SIGKILL in the middle of teacher training, pair generation and refiner training: what was
written whole stays whole, and a rerun (pairs) or --resume (training) ends exactly where an
uninterrupted run ends."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import teacher_loop
import train_teacher
from test_pipeline import make_folder, tiny_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args):
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *args],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def kill_when(script, args, ready, timeout=120):
    """Start the script, SIGKILL it as soon as ready() holds; fail if it ends first."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, \
            f"{script} ended (status {proc.returncode}) before it could be killed"
        assert time.monotonic() < deadline, f"{script}: nothing to kill after {timeout} s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def same_tensors(a, b):
    """Two dicts hold the same tensors (and the same other values, such as a shard's filter
    fingerprint)."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k])
                                        else a[k] == b[k] for k in a)


def test_teacher_killed_mid_run_resumes_to_the_uninterrupted_result(tmp_path):
    folder = make_folder(tmp_path / "images")
    common = ["--dataset", "folder", "--data-dir", folder, "--image-size", "8", "--batch-size", "8",
              "--steps", "2000", "--warmup", "5", "--save-every", "10", "--grid-every", "100000",
              "--seed", "3", "--device", "cpu"]
    run("train_teacher.py", *common, "--stop-at", "60", "--out", str(tmp_path / "straight"))
    ckpt = tmp_path / "killed" / "ckpt.pt"
    kill_when("train_teacher.py", [*common, "--out", str(tmp_path / "killed")], ckpt.exists)
    step = load(ckpt)["step"]  # the last checkpoint is whole: it loads
    assert 10 <= step < 60 and step % 10 == 0
    run("train_teacher.py", *common, "--stop-at", "60", "--resume", "--out",
        str(tmp_path / "killed"))
    a, b = load(tmp_path / "straight" / "ckpt.pt"), load(ckpt)
    assert a["step"] == b["step"] == 60
    assert same_tensors(a["model"], b["model"]) and same_tensors(a["ema"], b["ema"])


def test_ctrl_c_in_training_is_one_line_saying_what_was_kept(tmp_path):
    """SIGINT (Ctrl-C) mid-run: exit 130, no traceback, one line naming the step and the kept
    checkpoint, and that checkpoint is whole and of the step the line names."""
    folder = make_folder(tmp_path / "images")
    out, ckpt = tmp_path / "t", tmp_path / "t" / "ckpt.pt"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_teacher.py"), "--dataset",
                             "folder", "--data-dir", folder, "--image-size", "8", "--batch-size",
                             "8", "--steps", "100000", "--save-every", "10", "--grid-every",
                             "100000", "--out", str(out), "--device", "cpu"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            # a shell that starts the tests in the background (`cmd &`) makes them
                            # ignore SIGINT, and a child inherits that; a terminal's Ctrl-C reaches
                            # a run with the default action
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not ckpt.exists():
        assert proc.poll() is None and time.monotonic() < deadline, \
            "the run ended before it could be interrupted"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    saved = load(ckpt)["step"]
    assert (last.startswith("interrupted at step ")
            and f"the checkpoint of step {saved} is kept in {out}" in last)
    assert "--resume continues" in last and not (out / "ckpt.pt.tmp").exists()


def test_pairs_and_refiner_killed_mid_run_resume_to_the_uninterrupted_result(tmp_path, monkeypatch):
    common = ["--teacher", tiny_teacher(tmp_path, monkeypatch), "--pairs", "2000",
              "--guide-steps", "2", "--msd-steps", "2", "--steps", "150", "--val-every", "10",
              "--batch-size", "4", "--filter", "0", "--eval-n", "8", "--eval-steps", "2",
              "--device", "cpu"]
    straight, killed = ["--pairs-dir", str(tmp_path / "p1"), "--out", str(tmp_path / "r1")], \
        ["--pairs-dir", str(tmp_path / "p2"), "--out", str(tmp_path / "r2")]
    run("train_refiner.py", *common, *straight)

    shard0 = tmp_path / "p2" / "shard_00000.pt"
    kill_when("train_refiner.py", common + killed, shard0.exists)  # during pair generation
    assert not (tmp_path / "p2" / "shard_00001.pt").exists()
    ckpt = tmp_path / "r2" / "ckpt.pt"
    kill_when("train_refiner.py", common + killed, ckpt.exists)  # during refiner training
    assert 10 <= load(ckpt)["step"] < 150
    run("train_refiner.py", *common, *killed, "--resume")

    for i in range(2):
        name = f"shard_{i:05d}.pt"
        assert same_tensors(load(tmp_path / "p1" / name), load(tmp_path / "p2" / name))
    a, b = load(tmp_path / "r1" / "ckpt.pt"), load(ckpt)
    assert a["step"] == b["step"] == 150 and a["best_val"] == b["best_val"]
    assert same_tensors(a["state"], b["state"]) and same_tensors(a["best"], b["best"])
    scores = [{r["name"]: r["class_acc"]
               for r in json.load(open(tmp_path / r / "metrics.json"))["regimes"]}
              for r in ("r1", "r2")]
    assert scores[0] == scores[1]


def test_a_nan_loss_stops_with_the_step_named_and_keeps_the_last_good_checkpoint(
        tmp_path, monkeypatch, capsys):
    real, calls = teacher_loop.training_loss, []

    def nan_at_step_3(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 4 else loss
    monkeypatch.setattr(teacher_loop, "training_loss", nan_at_step_3)
    out = tmp_path / "t"
    with pytest.raises(SystemExit) as e:
        train_teacher.main(["--steps", "10", "--batch-size", "8", "--save-every", "1",
                            "--grid-every", "1000", "--out", str(out), "--device", "cpu",
                            "--dataset", "folder", "--data-dir", make_folder(tmp_path / "images"),
                            "--image-size", "8"])
    assert e.value.code == 2 and "loss is nan at step 3" in capsys.readouterr().err
    ckpt = load(out / "ckpt.pt")
    assert ckpt["step"] == 3 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
