"""Bad input to the real command-line entry points ends in one line, `error: ...`, and exit status 2."""
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def files(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage.pt").write_bytes(b"this is not a checkpoint")
    (tmp_path / "a_file").write_text("x")
    np.savez(tmp_path / "empty" / "val_data.npz", images=np.zeros((2, 5), np.uint8))
    return tmp_path


CASES = [
    (("train_teacher.py", "--steps", "0"), "--steps must be >= 1"),
    (("train_teacher.py", "--dataset", "cifar10", "--data-dir", "{t}/empty"), "cifar-10-python.tar.gz"),
    (("train_teacher.py", "--dataset", "imagenet64", "--data-dir", "{t}/empty"), "train_data_batch_*.npz"),
    (("train_teacher.py", "--dataset", "folder", "--data-dir", "{t}/nowhere"), "--data-dir {t}/nowhere: not a folder"),
    (("train_teacher.py", "--model", "dit-tiny", "--image-size", "18", "--out", "{t}/o"), "not divisible by the DiT patch"),
    (("train_teacher.py", "--device", "cuda", "--out", "{t}/o"), "CUDA is not available"),
    (("train_teacher.py", "--resume", "--out", "{t}/empty"), "--resume: no checkpoint"),
    (("train_teacher.py", "--out", "{t}/a_file/sub"), "cannot create the output folder"),
    (("train_teacher.py", "--batch-size", "30000", "--out", "{t}/o"), "larger than the data set"),
    (("train_refiner.py", "--teacher", "{t}/garbage.pt", "--out", "{t}/o"), "not a readable teacher checkpoint"),
    (("train_refiner.py", "--teacher", "{t}/missing.pt", "--out", "{t}/o"), "no such file"),
    (("train_refiner.py", "--w", "-1"), "--w/--w-range must be >= 0"),
    (("train_refiner.py", "--msd-steps", "2000"), "--msd-steps and --guide-steps must be in 1..1000"),
    (("train_refiner.py", "--steps", "-3"), "must be >= 1"),
    (("sample.py", "--teacher", "{t}/garbage.pt"), "not a readable teacher checkpoint"),
    (("sample.py", "--w", "-2"), "--w must be >= 0"),
    (("evaluate.py", "--teacher", "{t}/missing.pt"), "no such file"),
]


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(a[:2]) for a, _ in CASES])
def test_bad_input_gives_one_clear_line(files, argv, message):
    result = run(*[a.format(t=files) for a in argv], cwd=files)
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(err) == 1 and err[0].startswith("error: ") and message.format(t=files) in err[0], err
    assert "Traceback" not in result.stderr


def test_a_second_run_into_the_same_out_is_refused_and_a_stale_lock_taken_over(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        (out / ".lock").write_text(str(alive.pid))
        result = run("train_teacher.py", "--steps", "1", "--out", str(out), cwd=tmp_path)
        assert result.returncode == 2 and f"another run (pid {alive.pid})" in result.stderr
    finally:
        alive.kill()
        alive.wait()
    (out / ".lock").write_text(str(alive.pid))  # its process is gone now: a killed run's lock
    result = run("train_teacher.py", "--steps", "1", "--batch-size", "4", "--grid-every", "1000",
                 "--out", str(out), "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (out / "ckpt.pt").exists() and not (out / ".lock").exists()
