"""torchrun with two CPU processes (gloo) computes what one process computes: the teacher's loss
curve and weights at the same global batch, and the very same pair shards."""
import os
import subprocess
import sys

import torch

from test_pipeline import make_folder, tiny_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# torchrun's default per process; the single run matches it
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def run(script, args, nproc=1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    result = subprocess.run([*launcher, os.path.join(ROOT, script), *args], capture_output=True,
                            text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_two_process_teacher_matches_one_process_at_the_same_global_batch(tmp_path):
    folder = make_folder(tmp_path / "images")
    common = ["--dataset", "folder", "--data-dir", folder, "--image-size", "8", "--batch-size", "8",
              "--steps", "8", "--warmup", "2", "--grid-every", "1000", "--device", "cpu",
              "--seed", "1"]
    run("train_teacher.py", [*common, "--out", str(tmp_path / "one")])
    run("train_teacher.py", [*common, "--out", str(tmp_path / "two")], nproc=2)
    one, two = load(tmp_path / "one" / "ckpt.pt"), load(tmp_path / "two" / "ckpt.pt")
    assert len(one["losses"]) == len(two["losses"]) == 8
    assert torch.allclose(torch.tensor(one["losses"]), torch.tensor(two["losses"]), rtol=1e-4)
    assert len(set(one["losses"])) == 8  # a real curve, not a constant
    for k in one["model"]:
        assert torch.allclose(one["model"][k], two["model"][k], atol=1e-3), k


def test_two_process_pair_generation_writes_the_same_shards(tmp_path, monkeypatch):
    common = ["--teacher", tiny_teacher(tmp_path, monkeypatch), "--pairs", "2000",
              "--guide-steps", "2", "--msd-steps", "2", "--steps", "2", "--val-every", "2",
              "--batch-size", "4", "--filter", "0", "--eval-n", "8", "--eval-steps", "2",
              "--device", "cpu"]
    run("train_refiner.py",
        [*common, "--pairs-dir", str(tmp_path / "p1"), "--out", str(tmp_path / "r1")])
    run("train_refiner.py",
        [*common, "--pairs-dir", str(tmp_path / "p2"), "--out", str(tmp_path / "r2")], nproc=2)
    for name in ("shard_00000.pt", "shard_00001.pt"):
        a, b = load(tmp_path / "p1" / name), load(tmp_path / "p2" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k])
                                            else a[k] == b[k] for k in a), name
    assert (load(tmp_path / "r1" / "ckpt.pt")["step"] == load(tmp_path / "r2" / "ckpt.pt")["step"]
            == 2)
