"""Data sets: one function per source, all returning an ImageSet (uint8 images, int64 labels, class names).

--dataset shapes      the embedded default: procedural coloured shapes, no download, deterministic
--dataset cifar10     cifar-10-python.tar.gz (or cifar-10-batches-py/) under --data-dir; --download fetches it
--dataset imagenet64  downsampled ImageNet 64x64 npz batches (train_data_batch_*.npz, val_data.npz)
--dataset folder      root/<class name>/*.png|jpg, resized to --image-size

Images stay uint8 in memory (ImageNet-64 in float32 would be 60 GB); `ImageSet.batch` gives [-1, 1].
"""
import glob
import io
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from safety import BadInput, NumpyOnlyUnpickler, fetch, read_from_tar, write_atomic

DATASETS = ("shapes", "cifar10", "imagenet64", "folder")


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    classes: list

    def __len__(self):
        return len(self.labels)

    def batch(self, idx):
        """Images in [-1, 1] (float32) and labels for the given indices."""
        return to_float(self.images[idx]), self.labels[idx]


def to_uint8(x):
    """[-1, 1] float -> uint8 (what a PNG holds)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_float(x):
    """uint8 -> [-1, 1] float32, the inverse of to_uint8."""
    return x.float() / 127.5 - 1


ROOT = os.path.dirname(os.path.abspath(__file__))  # the repository: where a relative data folder is stored from


def portable_dir(path):
    """--data-dir as a checkpoint stores it: relative to this repository when inside it, else absolute, so
    that resolve_dir finds it again from any working directory (and after the repository moves)."""
    full = os.path.abspath(path)
    return os.path.relpath(full, ROOT) if full == ROOT or full.startswith(ROOT + os.sep) else full


def resolve_dir(stored):
    """A stored --data-dir as a path: relative ones from this repository, or, for checkpoints written before
    portable_dir, from the working directory when only that one exists."""
    if os.path.isabs(stored):
        return stored
    here = os.path.join(ROOT, stored)
    return stored if not os.path.exists(here) and os.path.exists(stored) else here


def load_dataset(name, data_dir="data", image_size=None, split="train", download=False):
    """The `split` ('train' or 'test') of a data set; image_size=None takes the source's native size."""
    if name == "shapes":
        return shapes(image_size or 16, split)
    if name == "cifar10":
        return cifar10(data_dir, split, download, image_size)
    if name == "imagenet64":
        return imagenet64(data_dir, split, image_size)
    if name == "folder":
        return image_folder(data_dir, image_size or 32, split)
    raise BadInput(f"--dataset {name!r} is not one of {', '.join(DATASETS)}")


# ----------------------------------------------------------------------------------------------
# The embedded default: procedural coloured shapes
# ----------------------------------------------------------------------------------------------

SHAPES = ["disk", "square", "triangle", "diamond", "plus", "cross", "ring", "frame", "two-dots", "stripes"]
SHAPES_SIZE = {"train": 20000, "test": 2000}
SHAPES_SEED = {"train": 0, "test": 1}  # fixed: the data set, and the classifier cached on it, never change


def shape_mask(k, u, v):
    """Inside-mask of shape class k in unit coordinates (u right, v down; the shape fills about |u|,|v| <= 1)."""
    au, av, r = np.abs(u), np.abs(v), np.sqrt(u * u + v * v)
    box = np.maximum(au, av)
    if k == 0:
        return r <= 1.0
    if k == 1:
        return box <= 0.8
    if k == 2:
        return (v <= 0.8) & (au <= 0.55 * (v + 0.95))
    if k == 3:
        return au + av <= 1.0
    if k == 4:
        return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
    if k == 5:
        return ((np.abs(u - v) <= 0.4) | (np.abs(u + v) <= 0.4)) & (box <= 0.85)
    if k == 6:
        return (r <= 1.0) & (r >= 0.55)
    if k == 7:
        return (box <= 0.9) & (box >= 0.55)
    if k == 8:
        return ((u - 0.5) ** 2 + v * v <= 0.2) | ((u + 0.5) ** 2 + v * v <= 0.2)
    return (box <= 0.9) & ((v + 0.9) % 0.6 < 0.3)


def shapes(image_size=16, split="train"):
    """Class = shape; within a class: position, size, colour, background colour and gradient vary.

    Rendered at 4x resolution and box-filtered, so edges are anti-aliased. Deterministic per split.
    """
    n, rng = SHAPES_SIZE[split], np.random.default_rng(SHAPES_SEED[split])
    labels = np.arange(n) % len(SHAPES)
    rng.shuffle(labels)
    S, ss = image_size, 4
    grid = (np.arange(S * ss) + 0.5) / ss  # pixel coordinates of the sub-samples
    radius = rng.uniform(0.22, 0.40, n) * S
    cx = rng.uniform(radius * 0.8, S - radius * 0.8)
    cy = rng.uniform(radius * 0.8, S - radius * 0.8)
    fg, bg = two_contrasting_colours(rng, n)
    gradient = rng.normal(0, 0.08, (n, 2, 3))  # background drifts by this much across the image
    images = np.empty((n, 3, S, S), np.uint8)
    for k in range(len(SHAPES)):
        idx = np.nonzero(labels == k)[0]
        u = (grid[None, None, :] - cx[idx, None, None]) / radius[idx, None, None]
        v = (grid[None, :, None] - cy[idx, None, None]) / radius[idx, None, None]
        mask = shape_mask(k, u, v).astype(np.float32)
        mask = mask.reshape(len(idx), S, ss, S, ss).mean(axis=(2, 4))[:, None]  # (n_k, 1, S, S)
        ramp = np.linspace(-1, 1, S)
        back = (bg[idx, :, None, None] + gradient[idx, 0, :, None, None] * ramp[None, None, :, None]
                + gradient[idx, 1, :, None, None] * ramp[None, None, None, :])
        img = back * (1 - mask) + fg[idx, :, None, None] * mask
        images[idx] = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels).long(), list(SHAPES))


def two_contrasting_colours(rng, n):
    """A bright foreground (any hue, brightest channel 0.7..1) on a dimmer background (any hue, channels
    <= 0.6), brightness differing by at least 0.2: the shape stands out, but not always by much."""
    fg = rng.uniform(0, 1, (n, 3))
    fg *= rng.uniform(0.7, 1, (n, 1)) / fg.max(axis=1, keepdims=True)
    bg = rng.uniform(0, 0.6, (n, 3))
    luma = np.array([0.299, 0.587, 0.114])
    for _ in range(100):
        bad = (fg - bg) @ luma < 0.2
        if not bad.any():
            break
        bg[bad] = rng.uniform(0, 0.6, (bad.sum(), 3))
    return fg, bg


# ----------------------------------------------------------------------------------------------
# CIFAR-10 (the python archive)
# ----------------------------------------------------------------------------------------------

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


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
                raise BadInput(f"--data-dir {data_dir}: no cifar-10-python.tar.gz or cifar-10-batches-py/ "
                                f"there; put the archive from {CIFAR_URL} there, or add --download")
            fetch(CIFAR_URL, archive, CIFAR_MD5)
        raws = read_from_tar(archive, [f"cifar-10-batches-py/{n}" for n in names], "CIFAR-10 python archive")
    parts = [read_cifar_batch(raw, where) for raw, where in raws]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return ImageSet(images, labels, list(CIFAR_CLASSES))


# ----------------------------------------------------------------------------------------------
# ImageNet 64x64 (downsampled ImageNet, npz batches)
# ----------------------------------------------------------------------------------------------


def imagenet64(data_dir, split="train", image_size=None):
    if image_size not in (None, 64):
        raise BadInput(f"--image-size {image_size}: ImageNet-64 images are 64x64")
    pattern = "train_data_batch_*.npz" if split == "train" else "val_data.npz"
    files = sorted(glob.glob(os.path.join(data_dir, pattern)))
    if not files:
        raise BadInput(f"--data-dir {data_dir}: no {pattern} there (downsampled ImageNet 64x64 npz batches)")
    images, labels = [], []
    for f in files:
        try:
            with np.load(f, allow_pickle=False) as z:
                data, lab = z["data"], z["labels"]
        except Exception as e:
            raise BadInput(f"{f}: not an ImageNet-64 npz with keys 'data' and 'labels' "
                            f"({type(e).__name__}: {e})") from None
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 64 * 64 or len(lab) != len(data):
            raise BadInput(f"{f}: expected 'data' uint8 (N, 12288) and N 'labels', got {data.dtype} {data.shape}")
        images.append(data.reshape(-1, 3, 64, 64))
        labels.append(np.asarray(lab, np.int64) - 1)  # labels are 1..1000 in the files
    labels = np.concatenate(labels)
    if labels.min() < 0 or labels.max() > 999:
        raise BadInput(f"--data-dir {data_dir}: ImageNet-64 labels must lie in 1..1000")
    return ImageSet(torch.from_numpy(np.concatenate(images)), torch.from_numpy(labels),
                    [f"class{i:03d}" for i in range(1000)])


# ----------------------------------------------------------------------------------------------
# Any image folder: root/<class name>/*.png|jpg
# ----------------------------------------------------------------------------------------------

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def hidden(name):
    """What a notebook or an unzipped archive leaves beside the classes (.ipynb_checkpoints, __MACOSX, ._x.png)."""
    return name.startswith(".") or name == "__MACOSX"


def image_folder(root, image_size=32, split="train"):
    """Every 10th image of each class (in sorted order) is held out as the test split.
    An unreadable file is skipped with a warning, so one bad file does not stop a long run."""
    if not os.path.isdir(root):
        raise BadInput(f"--data-dir {root}: not a folder")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not hidden(d))
    files = {c: sorted(f for f in os.listdir(os.path.join(root, c)) if f.lower().endswith(IMAGE_EXTS)
                       and not hidden(f)) for c in classes}
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
    return ImageSet(torch.from_numpy(np.stack(images)), torch.tensor(labels), classes)


def eight_bit(im):
    """16- and 32-bit grey images as 8 bits: Pillow's convert('RGB') would clip them (65535 -> 255)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        top = 65535 if im.mode.startswith("I;16") or np.asarray(im).max() > 255 else 255
        return Image.fromarray((np.asarray(im, np.float64) * 255 / top).round().clip(0, 255).astype(np.uint8))
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
# Writing images
# ----------------------------------------------------------------------------------------------


def save_grid(images, nrow, path, scale=4, pad=1, header=(), row_names=()):
    """Write (N, 3, H, W) images in [-1, 1] as one PNG, nrow images per row, upscaled `scale` times.
    header: (title, columns) pairs, written left to right above the grid, each over its columns; row_names:
    a name per row (the class), written left of it."""
    x = to_uint8(images).numpy()
    N, C, H, W = x.shape
    rows = -(-N // nrow)
    canvas = np.full((rows * (H + pad) + pad, nrow * (W + pad) + pad, 3), 255, np.uint8)
    for i in range(N):
        r, c = divmod(i, nrow)
        canvas[pad + r * (H + pad):pad + r * (H + pad) + H, pad + c * (W + pad):pad + c * (W + pad) + W] = \
            x[i].transpose(1, 2, 0)
    img = Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)
    if row_names:
        img = with_row_names(img, row_names, (H + pad) * scale, pad * scale)
    if header:
        left = img.width - nrow * (W + pad) * scale - pad * scale  # the row names' strip
        img = with_header(img, header, (W + pad) * scale, left + pad * scale)
    write_atomic(path, lambda f: img.save(f, format="PNG"))


def with_row_names(img, names, row_height, top):
    """The image right of a white strip with each row's name beside it (Pillow's built-in font)."""
    from PIL import ImageDraw
    draw = ImageDraw.Draw(img)
    strip = int(max(draw.textlength(str(n)) for n in names)) + 8
    out = Image.new("RGB", (img.width + strip, img.height), "white")
    out.paste(img, (strip, 0))
    draw = ImageDraw.Draw(out)
    for i, name in enumerate(names):
        draw.text((4, top + i * row_height + row_height / 2 - 5), str(name), fill="black")
    return out


def with_header(img, header, column_width, left):
    """The image under a white strip with each title centred over its columns (Pillow's built-in font)."""
    from PIL import ImageDraw
    strip = 14
    out = Image.new("RGB", (img.width, img.height + strip), "white")
    out.paste(img, (0, strip))
    draw, x = ImageDraw.Draw(out), left
    for title, columns in header:
        width = columns * column_width
        text = draw.textlength(title)
        draw.text((x + max(0, (width - text) / 2), 2), title, fill="black")
        x += width
    return out
