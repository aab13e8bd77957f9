"""Bad input to the real command-line entry points ends in one line, `error: ...`, and exit status
2."""
import os
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from checkpoint import FORMAT, fingerprint, save_atomic
from conftest import tiny_model
from noiserefine import Refiner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def write_teacher(path, seed):
    model = tiny_model("unet", seed=seed)
    save_atomic({"kind": "teacher", "format": FORMAT, "config": model.config.__dict__,
                 "ema": model.state_dict(), "data": {"dataset": "shapes", "data_dir": "data",
                                                     "image_size": 8, "classes": list("abcd")}},
                str(path))
    return model


def make_bad_files(t):
    """One folder of bad inputs, each a real file of the wrong kind."""
    (t / "empty").mkdir()
    (t / "garbage.pt").write_bytes(b"this is not a checkpoint")
    (t / "a_file").write_text("x")
    np.savez(t / "empty" / "val_data.npz", images=np.zeros((2, 5), np.uint8))
    (t / "wrongtar").mkdir()
    with tarfile.open(t / "wrongtar" / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(t / "a_file", arcname="something/else.txt")
    (t / "cut" / "cifar-10-batches-py").mkdir(parents=True)
    raw = pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]},
                       protocol=2)
    for i in range(1, 6):
        (t / "cut" / "cifar-10-batches-py" / f"data_batch_{i}").write_bytes(raw[:len(raw) // 2])
    for name, arrays in (("npzkeys", {"images": np.zeros((2, 12288), np.uint8)}),
                         ("npzshape", {"data": np.zeros((2, 5), np.uint8), "labels": np.ones(2)})):
        (t / name).mkdir()
        np.savez(t / name / "train_data_batch_1.npz", **arrays)
    (t / "noimages" / "cats").mkdir(parents=True)
    (t / "noimages" / "dogs").mkdir()
    (t / "noimages" / "dogs" / "notes.txt").write_text("no images here")
    (t / "oneclass" / "only").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(t / "oneclass" / "only" / "a.png")
    teacher = write_teacher(t / "teacher.pt", seed=0)
    (t / "teacher_cut.pt").write_bytes((t / "teacher.pt").read_bytes()[:300])
    save_atomic({"kind": "teacher", "format": FORMAT + 1}, str(t / "teacher_v2.pt"))
    other = write_teacher(t / "other_teacher.pt", seed=1)
    refiner = Refiner(other, 0)
    save_atomic({"kind": "refiner", "format": FORMAT, "teacher_fingerprint": fingerprint(other),
                 "rank": 0, "alpha": 0, "best": refiner.trainable_state()},
                str(t / "other_refiner.pt"))
    assert fingerprint(teacher) != fingerprint(other)
    (t / "resume_t").mkdir()
    save_atomic({"kind": "teacher", "format": FORMAT,
                 "args": {"model": "unet-tiny", "dataset": "shapes"}, "opt": {}},
                str(t / "resume_t" / "ckpt.pt"))
    (t / "shipped_t").mkdir()
    save_atomic({"kind": "teacher", "format": FORMAT,
                 "args": {"model": "unet-tiny", "dataset": "shapes"}, "ema": {}},
                str(t / "shipped_t" / "ckpt.pt"))
    (t / "resume_r").mkdir()
    save_atomic({"kind": "refiner", "format": FORMAT, "args": {"lora_rank": 0, "pairs": 10000},
                 "opt": {}}, str(t / "resume_r" / "ckpt.pt"))
    return t


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_bad_files(tmp_path_factory.mktemp("bad"))


CASES = [
    (("train_teacher.py", "--steps", "0"), "argument --steps: expected an integer >= 1"),
    (("train_teacher.py", "--dataset", "cifar10", "--data-dir", "{t}/empty"),
     "cifar-10-python.tar.gz"),
    (("train_teacher.py", "--dataset", "imagenet64", "--data-dir", "{t}/empty"),
     "train_data_batch_*.npz"),
    (("train_teacher.py", "--dataset", "folder", "--data-dir", "{t}/nowhere"),
     "--data-dir {t}/nowhere: not a folder"),
    (("train_teacher.py", "--model", "dit-tiny", "--image-size", "18", "--out", "{t}/o"),
     "not divisible by the DiT patch"),
    (("train_teacher.py", "--device", "cuda", "--out", "{t}/o"), "CUDA is not available"),
    (("train_teacher.py", "--resume", "--out", "{t}/empty"), "--resume: no checkpoint"),
    (("train_teacher.py", "--out", "{t}/a_file/sub"),
     "argument --out: '{t}/a_file/sub' lies under '{t}/a_file', which is a file"),
    (("train_teacher.py", "--batch-size", "30000", "--out", "{t}/o"), "larger than the data set"),
    (("train_refiner.py", "--teacher", "{t}/garbage.pt", "--out", "{t}/o"),
     "is not a checkpoint (a checkpoint is a zip"),
    (("train_refiner.py", "--teacher", "{t}/missing.pt", "--out", "{t}/o"), "no such file"),
    (("train_refiner.py", "--w", "-1"), "argument --w: expected a number in [0, 100], got -1"),
    (("train_refiner.py", "--w", "nan"), "argument --w: expected a number in [0, 100], got nan"),
    (("train_refiner.py", "--w-range", "4", "2"), "--w-range must be low high, got 4 2"),
    (("train_refiner.py", "--msd-steps", "2000"),
     "argument --msd-steps: expected an integer in 1..1000, got 2000"),
    (("train_refiner.py", "--val-every", "0"), "argument --val-every: expected an integer >= 1"),
    (("sample.py", "--teacher", "{t}/garbage.pt"), "is not a checkpoint"),
    (("sample.py", "--teacher", "{t}/empty"), "is not a file"),
    (("sample.py", "--w", "inf"), "argument --w: expected a number in [0, 100], got inf"),
    (("evaluate.py", "--teacher", "{t}/missing.pt"), "no such file"),
    (("train_teacher.py", "--dataset", "cifar10", "--data-dir", "{t}/wrongtar"),
     "not the CIFAR-10 python archive"),
    (("train_teacher.py", "--dataset", "cifar10", "--data-dir", "{t}/cut"),
     "not a CIFAR-10 python batch"),
    (("train_teacher.py", "--dataset", "cifar10", "--image-size", "64"),
     "CIFAR-10 images are 32x32"),
    (("train_teacher.py", "--dataset", "imagenet64", "--data-dir", "{t}/npzkeys"),
     "keys 'data' and 'labels'"),
    (("train_teacher.py", "--dataset", "imagenet64", "--data-dir", "{t}/npzshape"),
     "expected 'data' uint8 (N, 12288)"),
    (("train_teacher.py", "--dataset", "folder", "--data-dir", "{t}/noimages"),
     "need at least 2 class folders"),
    (("train_teacher.py", "--dataset", "folder", "--data-dir", "{t}/oneclass"), "found 1"),
    (("sample.py", "--teacher", "{t}/teacher_cut.pt"), "not a readable teacher checkpoint"),
    (("sample.py", "--teacher", "{t}/teacher_v2.pt"),
     "checkpoint format 2 but this code reads format 1"),
    (("sample.py", "--teacher", "{t}/teacher.pt", "--refiner", "{t}/other_refiner.pt"),
     "was trained on teacher"),
    (("sample.py", "--teacher", "{t}/teacher.pt", "--refiner", "{t}/teacher.pt"),
     "expected a refiner checkpoint"),
    (("sample.py", "--steps", "5000"),
     "argument --steps: expected an integer in 1..1000, got 5000"),
    (("train_refiner.py", "--teacher", "{t}/teacher.pt", "--resume", "--out", "{t}/empty"),
     "--resume: no checkpoint"),
    (("train_teacher.py", "--resume", "--out", "{t}/resume_t", "--model", "dit-tiny"),
     "--resume: {t}/resume_t/ckpt.pt was trained with --model unet-tiny, not dit-tiny; leave "
     "--model out"),
    (("train_refiner.py", "--resume", "--out", "{t}/resume_r", "--lora-rank", "8"),
     "--resume: {t}/resume_r/ckpt.pt was trained with --lora-rank 0, not 8"),
    (("train_refiner.py", "--lora-rank", "-1"),
     "argument --lora-rank: expected an integer in 0..4096"),
    (("train_refiner.py", "--teacher", "{t}/teacher.pt", "--device", "cuda"),
     "CUDA is not available"),
    (("analyze.py", "diff", "--teacher", "{t}/teacher.pt", "--refiner", "{t}/missing.pt"),
     "argument --refiner: '{t}/missing.pt': no such file"),
    (("analyze.py", "layout", "--n", "5"), "argument --n: expected an integer in 20..1000000"),
    (("analyze.py", "diff", "--device", "mps"),
     "argument --device: expected auto, cpu, cuda or cuda:N, got 'mps'"),
    (("ablate.py", "--steps", "0"), "argument --steps: expected an integer >= 1"),
    (("ablate.py", "--teacher", "{t}/teacher.pt", "--seeds", "0", "0"),
     "--seeds must differ from each other"),
    (("bench.py", "--models", "resnet"), "argument --models: invalid choice: 'resnet'"),
    (("make_assignment.py", "--out", "{t}/a_file"), "exists and is not an empty folder"),
    # a folder flag given a file, and a file flag given a folder
    (("train_teacher.py", "--out", "{t}/a_file"),
     "argument --out: '{t}/a_file' is a file; expected a folder"),
    (("train_teacher.py", "--dataset", "folder", "--data-dir", "{t}/a_file"),
     "argument --data-dir: '{t}/a_file' is a file"),
    (("train_refiner.py", "--out", "{t}/a_file"),
     "argument --out: '{t}/a_file' is a file; expected a folder"),
    (("train_refiner.py", "--pairs-dir", "{t}/a_file"),
     "argument --pairs-dir: '{t}/a_file' is a file"),
    (("analyze.py", "diff", "--out", "{t}/a_file"), "argument --out: '{t}/a_file' is a file"),
    (("ablate.py", "--out", "{t}/a_file"), "argument --out: '{t}/a_file' is a file"),
    (("study.py", "--out", "{t}/a_file"), "argument --out: '{t}/a_file' is a file"),
    (("sample.py", "--out", "{t}/empty"),
     "argument --out: '{t}/empty' is a folder; expected a file name"),
    (("bench.py", "--json", "{t}/empty"), "argument --json: '{t}/empty' is a folder"),
    (("evaluate.py", "--json", "{t}/empty"), "argument --json: '{t}/empty' is a folder"),
    # a kept checkpoint is not overwritten by a run without --resume
    (("train_teacher.py", "--out", "{t}/resume_t"), "--out {t}/resume_t already holds a teacher"),
    (("train_refiner.py", "--out", "{t}/resume_r"), "--out {t}/resume_r already holds a refiner"),
    (("train_teacher.py", "--resume", "--out", "{t}/shipped_t"),
     "holds sampling weights only (a shipped teacher)"),
    (("train_teacher.py", "--out", "{t}/shipped_t"),
     "--out {t}/shipped_t holds a copy of the shipped teacher"),
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


def test_a_busy_cpu_is_said_in_one_line_unless_each_job_has_one_thread(monkeypatch, capsys):
    import cli
    import torch
    monkeypatch.setattr(os, "getloadavg", lambda: (float(os.cpu_count() or 1) + 1, 0.0, 0.0))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        cli.warn_if_cpu_busy("cpu")
        assert "OMP_NUM_THREADS=1" in capsys.readouterr().out
        torch.set_num_threads(1)
        cli.warn_if_cpu_busy("cpu")
        assert capsys.readouterr().out == ""
    finally:
        torch.set_num_threads(threads)
