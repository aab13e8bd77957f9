"""The yardstick: a small classifier trained on the real images, and three scores of generated images.

- class accuracy: the classifier agrees with the intended label (adherence; our stand-in for CLIPScore);
- FD_cls: Frechet distance between the classifier's penultimate features of generated images and of
  real held-out images (our stand-in for FID; not Inception FID, so never call it FID);
- IS_cls: exp E_x[KL(p(y|x) || p(y))] from the classifier's softmax (an Inception-Score-style score).

    python evaluate.py --teacher runs/teacher/ckpt.pt --w 1 2 3 --json metrics.json

compares regimes on one fixed bank of held-out noises with balanced labels.
"""
import argparse
import hashlib
import json
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
from checkpoint import FORMAT, die, load_checkpoint, load_teacher, resolve_device, save_atomic
from diffusion import sample_many

HELD_OUT_SEED = 987_654_321  # the evaluation noise bank; training noises never use this generator
CLASSIFIER_STEPS = 600  # enough for >= 99% held-out accuracy on the embedded set (about 30 s on 2 cores)

# ----------------------------------------------------------------------------------------------
# The classifier
# ----------------------------------------------------------------------------------------------


class Classifier(nn.Module):
    """Four conv stages and global average pooling; `features` is the penultimate 128-d vector."""

    def __init__(self, num_classes, width=32):
        super().__init__()
        def stage(i, o):
            return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]
        w = width
        self.body = nn.Sequential(*stage(3, w), *stage(w, w), nn.MaxPool2d(2), *stage(w, 2 * w),
                                  *stage(2 * w, 2 * w), nn.MaxPool2d(2), *stage(2 * w, 4 * w),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * w, num_classes)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


def train_classifier(train, test, steps=CLASSIFIER_STEPS, batch_size=128, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    clf = Classifier(len(train.classes)).to(device)
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for _ in tqdm(range(steps), desc="classifier", leave=False):
        x, y = train.batch(torch.randint(len(train), (batch_size,), generator=gen))
        flip = torch.rand(batch_size, generator=gen) < 0.5  # every class here is left-right symmetric
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        loss = F.cross_entropy(clf(x.to(device)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    clf.eval()
    acc = (predict(clf, test.batch(slice(None))[0], device).argmax(1) == test.labels).float().mean().item()
    return clf, acc


@torch.no_grad()
def predict(clf, images, device="cpu", batch_size=500, features=False):
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device)
        out.append((clf.features(x) if features else clf(x)).cpu())
    return torch.cat(out)


def classifier_path(dataset, data_dir, test):
    """Keyed by a hash of the held-out images, so a changed data set never reuses a stale classifier."""
    digest = hashlib.sha256(test.images.numpy().tobytes()).hexdigest()[:8]
    return os.path.join(data_dir, f"classifier-{dataset}-{test.images.shape[-1]}px-{digest}.pt")


def load_or_train_classifier(dataset, data_dir, image_size, device="cpu"):
    """The evaluator's classifier, trained once and cached next to the data (keyed by set and size)."""
    test = data.load_dataset(dataset, data_dir, image_size, "test")
    path = classifier_path(dataset, data_dir, test)
    if os.path.isfile(path):
        ckpt = load_checkpoint(path, "classifier", flag="classifier cache")
        clf = Classifier(len(ckpt["classes"]))
        clf.load_state_dict(ckpt["model"])
        clf.to(device).eval()
    else:
        train = data.load_dataset(dataset, data_dir, image_size, "train")
        clf, acc = train_classifier(train, test, CLASSIFIER_STEPS, device=device)
        save_atomic({"kind": "classifier", "format": FORMAT, "model": clf.state_dict(),
                     "classes": train.classes, "test_acc": acc}, path)
        ckpt = {"test_acc": acc}
        print(f"classifier trained: held-out accuracy on real images {acc:.3f}; cached at {path}")
    return Evaluator(clf, test, ckpt["test_acc"], device)


# ----------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------


def frechet_distance(mu1, cov1, mu2, cov2):
    """|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)), in float64.

    tr (C1 C2)^(1/2) = sum of sqrt(eigenvalues of C1^(1/2) C2 C1^(1/2)), a symmetric PSD matrix."""
    mu1, cov1, mu2, cov2 = (t.double() for t in (mu1, cov1, mu2, cov2))
    vals, vecs = torch.linalg.eigh(cov1)
    s1 = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    tr_sqrt = torch.linalg.eigvalsh(s1 @ cov2 @ s1).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * tr_sqrt)


def gaussian_stats(feats):
    return feats.double().mean(0), torch.cov(feats.double().T)


def inception_score(probs):
    """exp E_x KL(p(y|x) || p(y)) for softmax probabilities (N, K)."""
    probs = probs.double().clamp(min=1e-12)
    p_y = probs.mean(0, keepdim=True)
    return float(torch.exp((probs * (probs.log() - p_y.log())).sum(1).mean()))


def as_saved(images):
    """What a saved PNG would hold: images are scored after 8-bit quantisation, like real ones."""
    return data.to_float(data.to_uint8(images))


class Evaluator:
    def __init__(self, clf, test, test_acc, device="cpu"):
        self.clf, self.device, self.test_acc = clf, device, test_acc
        self.real_stats = gaussian_stats(predict(clf, test.batch(slice(None))[0], device, features=True))

    def score(self, images, labels):
        """images in [-1, 1] (N, 3, H, W), intended labels (N,) -> class_acc, fd_cls, is_cls."""
        feats = predict(self.clf, as_saved(images), self.device, features=True)
        with torch.no_grad():
            probs = self.clf.head(feats.to(self.device)).softmax(1).cpu()
        return {"class_acc": (probs.argmax(1) == labels).float().mean().item(),
                "fd_cls": frechet_distance(*gaussian_stats(feats), *self.real_stats),
                "is_cls": inception_score(probs)}

    def classify(self, images):
        """The classifier's class for each image, scored as in `score`."""
        return predict(self.clf, as_saved(images), self.device).argmax(1)

    def confidence(self, images, labels):
        """p(label | image) under the classifier: the pairs' quality filter uses it."""
        with torch.no_grad():
            probs = predict(self.clf, images, self.device).softmax(1)
        return probs.gather(1, labels[:, None]).squeeze(1)


# ----------------------------------------------------------------------------------------------
# Regimes on a fixed noise bank
# ----------------------------------------------------------------------------------------------


def noise_bank(n, num_classes, shape, seed=HELD_OUT_SEED):
    """n held-out noises x_T and balanced labels (n / num_classes each), the same in every run."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=gen), torch.arange(n) % num_classes


class ForwardCounter:
    """Counts images passed through a network's forward (a CFG forward on 2B counts 2 per image)."""

    def __init__(self, *models):
        self.images = 0
        self.handles = [m.register_forward_hook(self.hook) for m in models]

    def hook(self, module, args, output):
        self.images += args[0].shape[0]

    def remove(self):
        for h in self.handles:
            h.remove()


def run_regime(teacher, evaluator, x_T, y, name, w=0.0, steps=20, refiner=None, batch_size=250):
    """Sample the bank in one regime, time it, count forwards, score it. Returns (row, images)."""
    n = min(batch_size, len(y))  # warm-up, not timed or counted: allocator and kernels settle first
    sample_many(teacher, x_T[:n], y[:n], 1, w, batch_size=batch_size, refiner=refiner)
    counter = ForwardCounter(teacher, *([refiner] if refiner is not None else []))
    start = time.perf_counter()
    images = sample_many(teacher, x_T, y, steps, w, batch_size=batch_size, refiner=refiner, desc=name)
    seconds = time.perf_counter() - start
    counter.remove()
    row = {"name": name, "w": w, "steps": steps, **evaluator.score(images, y),
           "nfe_per_image": counter.images / len(y), "sec_per_image": seconds / len(y)}
    return row, images


def print_table(rows, title=None):
    if title:
        print(title)
    print(f"{'regime':<10} {'w':>5} {'steps':>5} {'class_acc':>9} {'FD_cls':>8} {'IS_cls':>7} "
          f"{'NFE/img':>7} {'ms/img':>7}")
    for r in rows:
        print(f"{r['name']:<10} {r['w']:>5.2f} {r['steps']:>5d} {r['class_acc']:>9.3f} {r['fd_cls']:>8.2f} "
              f"{r['is_cls']:>7.2f} {r['nfe_per_image']:>7.1f} {1000 * r['sec_per_image']:>7.2f}")


def write_json(rows, path, **extra):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"regimes": rows, **extra}, f, indent=2)
    os.replace(tmp, path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", default="runs/teacher/ckpt.pt", help="teacher checkpoint")
    p.add_argument("--n", type=int, default=1000, help="samples per regime (balanced classes)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--w", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.0], help="CFG scales to compare")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--json", default=None, help="also write the table here")
    p.add_argument("--seed", type=int, default=0, help="seeds torch; the noise bank itself is fixed")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.n < 1 or args.steps < 1 or any(w < 0 for w in args.w):
        die("--n and --steps must be positive and every --w >= 0")
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    teacher, ckpt = load_teacher(args.teacher, device)
    ds = ckpt["data"]
    try:
        evaluator = load_or_train_classifier(ds["dataset"], ds["data_dir"], ds["image_size"], device)
    except data.DataError as e:
        die(str(e))
    print(f"classifier held-out accuracy on real images: {evaluator.test_acc:.3f}")
    x_T, y = noise_bank(args.n, len(ds["classes"]), (3, ds["image_size"], ds["image_size"]))
    rows = [run_regime(teacher, evaluator, x_T, y, "unguided", 0.0, args.steps, batch_size=args.batch_size)[0]]
    rows += [run_regime(teacher, evaluator, x_T, y, "cfg", w, args.steps, batch_size=args.batch_size)[0]
             for w in args.w]
    print_table(rows, f"{args.teacher}: {args.n} held-out noises, {args.steps} DDIM steps")
    if args.json:
        write_json(rows, args.json, teacher=args.teacher, classifier_acc=evaluator.test_acc)


if __name__ == "__main__":
    main()
