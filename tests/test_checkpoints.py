"""Checkpoints: round trip, exact resume, safe loading, the refiner's teacher fingerprint."""
import os
import pickle

import pytest
import torch

import train_teacher
from checkpoint import FORMAT, fingerprint, load_teacher, save_atomic
from conftest import tiny_model
from noiserefine import Refiner, load_refiner
from safety import BadInput

COMMON = ["--steps", "6", "--batch-size", "8", "--warmup", "2", "--grid-every", "1000",
          "--save-every", "1000", "--device", "cpu", "--seed", "3"]


def test_teacher_resume_equals_a_straight_run(tmp_path):
    train_teacher.main(COMMON + ["--out", str(tmp_path / "straight")])
    train_teacher.main(COMMON + ["--out", str(tmp_path / "split"), "--stop-at", "4"])
    assert torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)["step"] == 4
    train_teacher.main(COMMON + ["--out", str(tmp_path / "split"), "--resume"])
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert os.path.isfile(tmp_path / "straight" / "samples_000006.png")


def test_teacher_round_trip(tmp_path):
    model = tiny_model("unet")
    path = str(tmp_path / "t.pt")
    save_atomic({"kind": "teacher", "format": FORMAT, "config": model.config.__dict__,
                 "ema": model.state_dict(), "data": {}}, path)
    assert not os.path.exists(path + ".tmp")
    loaded, _ = load_teacher(path)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([5, 900]), torch.tensor([0, 3])
    assert torch.equal(loaded(x, t, y), model(x, t, y))
    assert fingerprint(loaded) == fingerprint(model)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"kind": "teacher", "payload": Evil()}, f, protocol=2)
    with pytest.raises(BadInput, match="not a readable teacher checkpoint"):
        load_teacher(str(path))
    assert not (tmp_path / "pwned").exists()


def test_truncated_and_wrong_format_checkpoints(tmp_path, capsys):
    model = tiny_model("dit")
    good = tmp_path / "good.pt"
    save_atomic({"kind": "teacher", "format": FORMAT, "config": model.config.__dict__,
                 "ema": model.state_dict()}, str(good))
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:200])
    save_atomic({"kind": "teacher", "format": FORMAT + 1}, str(tmp_path / "new.pt"))
    for name, message in (("cut.pt", "not a readable"), ("new.pt", "checkpoint format"),
                          ("none.pt", "no such file")):
        with pytest.raises(BadInput, match=message):
            load_teacher(str(tmp_path / name))


def test_a_long_load_error_is_cut_at_a_word_not_inside_one(tmp_path, monkeypatch):
    words = [f"word{i}" for i in range(60)]  # 419 characters: longer than the message keeps

    def fail(*a, **k):
        raise RuntimeError(" ".join(words))
    (tmp_path / "ckpt.pt").write_bytes(b"x")
    monkeypatch.setattr(torch, "load", fail)
    with pytest.raises(BadInput) as e:
        load_teacher(str(tmp_path / "ckpt.pt"))
    why = str(e.value).split("(RuntimeError: ")[1].rstrip(")")
    assert why.endswith(" ...") and why[:-4].split() == words[:len(why[:-4].split())]


def test_refiner_on_another_teacher_is_a_clear_error(tmp_path, capsys):
    teacher, other = tiny_model("unet", seed=0), tiny_model("unet", seed=1)
    refiner = Refiner(teacher, 4)
    path = str(tmp_path / "refiner.pt")
    save_atomic({"kind": "refiner", "format": FORMAT, "teacher_fingerprint": fingerprint(teacher),
                 "rank": 4, "alpha": 4, "best": refiner.trainable_state()}, path)
    assert torch.equal(load_refiner(path, teacher)(torch.ones(1, 3, 8, 8), torch.tensor([1])),
                       torch.ones(1, 3, 8, 8))
    with pytest.raises(BadInput, match="trained on teacher"):
        load_refiner(path, other)


def test_a_failed_write_is_one_line_naming_the_path_and_leaves_no_temporary_file(tmp_path):
    import errno
    from safety import write_atomic

    def disk_full(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(BadInput, match=r"cannot write .*ckpt.pt \(No space left on device\)"):
        write_atomic(str(tmp_path / "ckpt.pt"), disk_full)
    assert os.listdir(tmp_path) == []  # the temporary file is gone, so it cannot keep the disk full

    def torch_zip_writer_fails(f):  # how torch.save reports a full disk
        raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed "
                           "writing file")
    with pytest.raises(BadInput, match="PytorchStreamWriter failed writing file"):
        write_atomic(str(tmp_path / "ckpt.pt"), torch_zip_writer_fails)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(BadInput, match="cannot write .*a_file/sub/ckpt.pt"):
        save_atomic({"x": 1}, str(tmp_path / "a_file" / "sub" / "ckpt.pt"))
    with pytest.raises(ZeroDivisionError):  # anything else is a bug, and stays a traceback
        write_atomic(str(tmp_path / "other.pt"), lambda f: 1 / 0)
    assert sorted(os.listdir(tmp_path)) == ["a_file"]
