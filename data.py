"""Data sets as an ImageSet (uint8 images, int64 labels, class names), and the sample grids.

--dataset shapes      the embedded default: procedural coloured shapes, no download, deterministic
--dataset cifar10, imagenet64, folder: the real image sets (image_sets.py, read only when asked for)

Images stay uint8 in memory (ImageNet-64 in float32 would be 60 GB); `ImageSet.batch` gives [-1, 1].
"""
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from safety import BadInput, write_atomic

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


# the repository: where a relative data folder is stored from
ROOT = os.path.dirname(os.path.abspath(__file__))


def portable_dir(path):
    """--data-dir as a checkpoint stores it: relative to this repository when inside it, else
    absolute, so that resolve_dir finds it again from any working directory (and after the
    repository moves)."""
    full = os.path.abspath(path)
    return os.path.relpath(full, ROOT) if full == ROOT or full.startswith(ROOT + os.sep) else full


def resolve_dir(stored):
    """A stored --data-dir as a path: a relative one is relative to this repository."""
    return stored if os.path.isabs(stored) else os.path.join(ROOT, stored)


def load_dataset(name, data_dir="data", image_size=None, split="train", download=False):
    """The `split` ('train' or 'test') of a data set; image_size=None takes the source's native
    size."""
    if name == "shapes":
        return shapes(image_size or 16, split)
    if name not in DATASETS:
        raise BadInput(f"--dataset {name!r} is not one of {', '.join(DATASETS)}")
    import image_sets  # the readers of real image sets: only when one is asked for
    return ImageSet(*image_sets.read(name, data_dir, image_size, split, download))


# ----------------------------------------------------------------------------------------------
# The embedded default: procedural coloured shapes
# ----------------------------------------------------------------------------------------------

SHAPES = ["disk", "square", "triangle", "diamond", "plus", "cross", "ring", "frame", "two-dots",
          "stripes"]
SHAPES_SIZE = {"train": 20000, "test": 2000}
# fixed: the data set, and the classifier cached on it, never change
SHAPES_SEED = {"train": 0, "test": 1}


def shape_mask(k, u, v):
    """Inside-mask of shape class k in unit coordinates (u right, v down; the shape fills about
    |u|,|v| <= 1)."""
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
    """A bright foreground (any hue, brightest channel 0.7..1) on a dimmer background (any hue,
    channels <= 0.6), brightness differing by at least 0.2: the shape stands out, but not always by
    much."""
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
# Writing images
# ----------------------------------------------------------------------------------------------


def save_grid(images, nrow, path, scale=4, pad=1, header=(), row_names=()):
    """Write (N, 3, H, W) images in [-1, 1] as one PNG, nrow images per row, upscaled `scale` times.
    header: (title, columns) pairs, written left to right above the grid, each over its columns;
    row_names: a name per row (the class), written left of it."""
    x = to_uint8(images).numpy()
    N, C, H, W = x.shape
    rows = -(-N // nrow)
    canvas = np.full((rows * (H + pad) + pad, nrow * (W + pad) + pad, 3), 255, np.uint8)
    for i in range(N):
        r, c = divmod(i, nrow)
        canvas[pad + r * (H + pad):pad + r * (H + pad) + H,
               pad + c * (W + pad):pad + c * (W + pad) + W] = \
            x[i].transpose(1, 2, 0)
    img = Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale),
                                         Image.NEAREST)
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
    """The image under a white strip with each title centred over its columns (Pillow's built-in
    font)."""
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
