"""Each data source on a tiny file in its exact real format, and the embedded set."""
import hashlib
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import data
import image_sets


def test_shapes_is_deterministic_and_balanced():
    a, b = data.shapes(16, "test"), data.shapes(16, "test")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert torch.equal(torch.bincount(a.labels), torch.full((10,), 200))
    assert not torch.equal(a.images[:100], data.shapes(16, "train").images[:100])
    x, y = a.batch(slice(0, 8))
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1 and y.dtype == torch.int64


def cifar_batch(n, seed):
    rng = np.random.default_rng(seed)
    return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, n).tolist()}


def write_cifar_archive(path, n=4):
    with tarfile.open(path, "w:gz") as tar:
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for seed, name in enumerate(names):
            raw = pickle.dumps(cifar_batch(n, seed), protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


def test_cifar10_archive(tmp_path):
    write_cifar_archive(tmp_path / "cifar-10-python.tar.gz")
    train = data.load_dataset("cifar10", str(tmp_path), split="train")
    test = data.load_dataset("cifar10", str(tmp_path), split="test")
    assert train.images.shape == (20, 3, 32, 32) and len(test) == 4
    expected = cifar_batch(4, 0)
    assert torch.equal(train.images[:4].reshape(4, -1), torch.from_numpy(expected[b"data"]))
    assert train.labels[:4].tolist() == expected[b"labels"]


def test_cifar10_missing_archive_says_where_to_put_it(tmp_path):
    with pytest.raises(data.BadInput, match="cifar-10-python.tar.gz"):
        data.load_dataset("cifar10", str(tmp_path))


def test_cifar10_pickle_that_runs_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        (folder / name).write_bytes(pickle.dumps(Evil()))
    with pytest.raises(data.BadInput, match="not a CIFAR-10 python batch"):
        data.load_dataset("cifar10", str(tmp_path))
    assert not (tmp_path / "pwned").exists()


def test_imagenet64_npz(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 12288), dtype=np.uint8)
    np.savez(tmp_path / "train_data_batch_1.npz", data=x, labels=np.array([1, 2, 3, 1000, 5]))
    ds = data.load_dataset("imagenet64", str(tmp_path))
    assert ds.images.shape == (5, 3, 64, 64) and ds.labels.tolist() == [0, 1, 2, 999, 4]
    assert torch.equal(ds.images[1, :, 0, 0], torch.from_numpy(x[1].reshape(3, 64, 64)[:, 0, 0]))
    np.savez(tmp_path / "train_data_batch_2.npz", images=x)
    with pytest.raises(data.BadInput, match="'data' and 'labels'"):
        data.load_dataset("imagenet64", str(tmp_path))


def test_image_folder(tmp_path):
    for c, colour in (("cats", (255, 0, 0)), ("dogs", (0, 0, 255))):
        (tmp_path / c).mkdir()
        for i in range(10):
            Image.new("RGB", (20, 24), colour).save(tmp_path / c / f"{i}.png")
    (tmp_path / "dogs" / "broken.png").write_bytes(b"not a png")
    train = data.load_dataset("folder", str(tmp_path), image_size=8, split="train")
    test = data.load_dataset("folder", str(tmp_path), image_size=8, split="test")
    assert train.classes == ["cats", "dogs"] and train.images.shape[1:] == (3, 8, 8)
    assert len(train) + len(test) == 20  # the unreadable file is skipped
    assert train.images[0, 0].float().mean() == 255 and train.images[-1, 2].float().mean() == 255


def test_what_notebooks_and_archives_leave_in_an_image_folder_is_not_a_class(tmp_path):
    for c in ("cats", "dogs", ".ipynb_checkpoints", "__MACOSX"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8)).save(tmp_path / c / f"{i}.png")
    # macOS metadata beside a real image
    Image.new("RGB", (8, 8)).save(tmp_path / "cats" / "._0.png")
    train = data.load_dataset("folder", str(tmp_path), image_size=8, split="train")
    assert train.classes == ["cats", "dogs"] and len(train) == 6


def test_image_folder_with_one_class_is_a_clear_error(tmp_path):
    (tmp_path / "only").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "only" / "a.png")
    with pytest.raises(data.BadInput, match="at least 2 class"):
        data.load_dataset("folder", str(tmp_path), image_size=8)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink"])
def test_an_archive_with_a_member_that_leaves_the_folder_is_refused(tmp_path, kind):
    write_cifar_archive(tmp_path / "good.tar.gz")
    archive = tmp_path / "data" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(tmp_path / "good.tar.gz") as good, tarfile.open(archive, "w:gz") as tar:
        for info in good.getmembers():  # all the real members, then one hostile one
            tar.addfile(info, good.extractfile(info))
        evil = tarfile.TarInfo({"dotdot": "cifar-10-batches-py/../../evil",
                                "absolute": "/tmp/evil"}.get(kind, "x"))
        if kind in ("symlink", "hardlink"):
            evil.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
            evil.linkname = "/etc/passwd"
        tar.addfile(evil, io.BytesIO(b""))
    with pytest.raises(data.BadInput, match="unsafe member"):
        data.load_dataset("cifar10", str(tmp_path / "data"))
    # nothing was written
    assert sorted(os.listdir(tmp_path / "data")) == ["cifar-10-python.tar.gz"]
    assert not os.path.exists(tmp_path / "evil")


def test_download_with_a_wrong_md5_deletes_the_partial_file(tmp_path):
    source = tmp_path / "served.tar.gz"
    write_cifar_archive(source)
    target = tmp_path / "data" / "cifar-10-python.tar.gz"
    with pytest.raises(data.BadInput, match="expected 0+; the partial file was deleted"):
        image_sets.fetch(source.as_uri(), str(target), "0" * 32)
    assert os.listdir(tmp_path / "data") == []
    md5 = hashlib.md5(source.read_bytes()).hexdigest()
    image_sets.fetch(source.as_uri(), str(target), md5)  # the right MD5: kept, and readable
    assert len(data.load_dataset("cifar10", str(tmp_path / "data"), split="test")) == 4


def test_a_16_bit_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    """Pillow's convert('RGB') clips 16-bit grey values at 255: a mid-grey ramp would read almost
    white."""
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    assert Image.open(tmp_path / "ramp16.png").mode.startswith("I")
    pixels = image_sets.read_image(str(tmp_path / "ramp16.png"), 32)
    assert abs(pixels.mean() - 127.5) < 2 and pixels.min() < 5 and pixels.max() > 250
