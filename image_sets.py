"""The real image sets, read only when one is asked for (the embedded default is data.shapes):

--dataset cifar10     cifar-10-python.tar.gz (or cifar-10-batches-py/) under --data-dir; --download
                      fetches it
--dataset imagenet64  downsampled ImageNet 64x64 npz batches (train_data_batch_*.npz, val_data.npz)
--dataset folder      root/<class name>/*.png|jpg, resized to --image-size

Each reader returns (uint8 images (N, 3, H, W), int64 labels, class names); data.load_dataset wraps
them. The files come from elsewhere, so they are read safely: pickles admit only numpy arrays,
archives are read in place with their members checked, and a download is checked against its MD5.
"""
import glob
import hashlib
import io
import os
import pickle
import sys
import tarfile
import urllib.request

import numpy as np
import torch
from PIL import Image

from safety import BadInput


def read(name, data_dir, image_size, split, download):
    if name == "cifar10":
        return cifar10(data_dir, split, download, image_size)
    if name == "imagenet64":
        return imagenet64(data_dir, split, image_size)
    return image_folder(data_dir, image_size or 32, split)


# ----------------------------------------------------------------------------------------------
# CIFAR-10 (the python archive)
# ----------------------------------------------------------------------------------------------

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck"]


def read_cifar_batch(raw, where):
    try:
        d = NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
        images = np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(d[b"labels"], np.int64)
    except Exception as e:
        raise BadInput(f"{where}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from None
    return images, labels


def cifar10(data_dir, split="train", download=False, image_size=None):
    if image_size not in (None, 32):
        raise BadInput(f"--image-size {image_size}: CIFAR-10 images are 32x32")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    archive = os.path.join(data_dir, "cifar-10-python.tar.gz")
    if os.path.isdir(folder):
        raws = []
        for path in (os.path.join(folder, n) for n in names):
            if not os.path.isfile(path):
                raise BadInput(f"--data-dir {data_dir}: {path} is missing")
            raws.append((open(path, "rb").read(), path))
    else:
        if not os.path.isfile(archive):
            if not download:
                raise BadInput(f"--data-dir {data_dir}: no cifar-10-python.tar.gz or "
                                f"cifar-10-batches-py/ there; put the archive from {CIFAR_URL} "
                                "there, or add --download")
            fetch(CIFAR_URL, archive, CIFAR_MD5)
        raws = read_from_tar(archive, [f"cifar-10-batches-py/{n}" for n in names],
                             "CIFAR-10 python archive")
    parts = [read_cifar_batch(raw, where) for raw, where in raws]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return images, labels, list(CIFAR_CLASSES)


# ----------------------------------------------------------------------------------------------
# ImageNet 64x64 (downsampled ImageNet, npz batches)
# ----------------------------------------------------------------------------------------------


def imagenet64(data_dir, split="train", image_size=None):
    if image_size not in (None, 64):
        raise BadInput(f"--image-size {image_size}: ImageNet-64 images are 64x64")
    pattern = "train_data_batch_*.npz" if split == "train" else "val_data.npz"
    files = sorted(glob.glob(os.path.join(data_dir, pattern)))
    if not files:
        raise BadInput(f"--data-dir {data_dir}: no {pattern} there (downsampled ImageNet 64x64 npz "
                       "batches)")
    images, labels = [], []
    for f in files:
        try:
            with np.load(f, allow_pickle=False) as z:
                data, lab = z["data"], z["labels"]
        except Exception as e:
            raise BadInput(f"{f}: not an ImageNet-64 npz with keys 'data' and 'labels' "
                            f"({type(e).__name__}: {e})") from None
        if (data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 64 * 64
                or len(lab) != len(data)):
            raise BadInput(f"{f}: expected 'data' uint8 (N, 12288) and N 'labels', got "
                           f"{data.dtype} {data.shape}")
        images.append(data.reshape(-1, 3, 64, 64))
        labels.append(np.asarray(lab, np.int64) - 1)  # labels are 1..1000 in the files
    labels = np.concatenate(labels)
    if labels.min() < 0 or labels.max() > 999:
        raise BadInput(f"--data-dir {data_dir}: ImageNet-64 labels must lie in 1..1000")
    return (torch.from_numpy(np.concatenate(images)), torch.from_numpy(labels),
            [f"class{i:03d}" for i in range(1000)])


# ----------------------------------------------------------------------------------------------
# Any image folder: root/<class name>/*.png|jpg
# ----------------------------------------------------------------------------------------------

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def hidden(name):
    """What a notebook or an unzipped archive leaves beside the classes (.ipynb_checkpoints,
    __MACOSX, ._x.png)."""
    return name.startswith(".") or name == "__MACOSX"


def image_folder(root, image_size=32, split="train"):
    """Every 10th image of each class (in sorted order) is held out as the test split.
    An unreadable file is skipped with a warning, so one bad file does not stop a long run."""
    if not os.path.isdir(root):
        raise BadInput(f"--data-dir {root}: not a folder")
    classes = sorted(d for d in os.listdir(root)
                     if os.path.isdir(os.path.join(root, d)) and not hidden(d))
    files = {c: sorted(f for f in os.listdir(os.path.join(root, c))
                       if f.lower().endswith(IMAGE_EXTS) and not hidden(f)) for c in classes}
    classes = [c for c in classes if files[c]]
    if len(classes) < 2:
        raise BadInput(f"--data-dir {root}: need at least 2 class folders with images "
                        f"(root/<class>/*.png|jpg), found {len(classes)}")
    images, labels = [], []
    for k, c in enumerate(classes):
        for i, f in enumerate(files[c]):
            if (i % 10 == 9) != (split == "test"):
                continue
            img = read_image(os.path.join(root, c, f), image_size)
            if img is not None:
                images.append(img)
                labels.append(k)
    if not images:
        raise BadInput(f"--data-dir {root}: no readable images in the {split} split")
    return torch.from_numpy(np.stack(images)), torch.tensor(labels), classes


def eight_bit(im):
    """16- and 32-bit grey images as 8 bits: Pillow's convert('RGB') would clip them
    (65535 -> 255)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        top = 65535 if im.mode.startswith("I;16") or np.asarray(im).max() > 255 else 255
        return Image.fromarray(
            (np.asarray(im, np.float64) * 255 / top).round().clip(0, 255).astype(np.uint8))
    return im


def read_image(path, size):
    try:
        with Image.open(path) as im:
            im = eight_bit(im).convert("RGB").resize((size, size), Image.BICUBIC)
            return np.asarray(im).transpose(2, 0, 1).copy()
    except Exception as e:
        print(f"warning: skipping unreadable image {path} ({type(e).__name__})", file=sys.stderr)
        return None


# ----------------------------------------------------------------------------------------------
# Reading untrusted files
# ----------------------------------------------------------------------------------------------


class NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; allow only what they hold (numpy arrays), so a file cannot run
    code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_from_tar(archive, members, what):
    """Read members straight from the archive: nothing is extracted, so no member can write outside
    it. An archive that holds a member with an absolute path, a `..` or a link is refused all the
    same: the real archives this repository reads have none, so one that does was not made by their
    authors."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for info in tar.getmembers():
                if unsafe_member(info):
                    raise BadInput(f"{archive}: refusing an archive with the unsafe member "
                                   f"{info.name!r} (absolute path, '..' or a link)")
            out = []
            names = set(tar.getnames())
            for m in members:
                if m not in names:
                    raise BadInput(f"{archive}: not the {what} (no member {m})")
                info = tar.getmember(m)
                if not info.isfile():
                    raise BadInput(f"{archive}: member {m} is not a regular file")
                out.append((tar.extractfile(info).read(), f"{archive}:{m}"))
            return out
    except (tarfile.TarError, EOFError, OSError) as e:
        raise BadInput(f"{archive}: not a readable tar.gz archive "
                       f"({type(e).__name__}: {e})") from None


def unsafe_member(info):
    parts = info.name.replace("\\", "/").split("/")
    return info.name.startswith(("/", "\\")) or ".." in parts or info.issym() or info.islnk()


def fetch(url, path, md5):
    """Download to path.part, check the MD5, then rename; a mismatch deletes the partial file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    part = path + ".part"
    print(f"downloading {url} -> {path}", file=sys.stderr)
    try:
        urllib.request.urlretrieve(url, part)
    except OSError as e:
        raise BadInput(f"--download: could not fetch {url} ({e})") from None
    digest = hashlib.md5(open(part, "rb").read()).hexdigest()
    if digest != md5:
        os.remove(part)
        raise BadInput(f"--download: {url} has MD5 {digest}, expected {md5}; the partial file was "
                       "deleted")
    os.replace(part, path)
