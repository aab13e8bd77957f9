"""The yardstick: two small classifiers trained on real images, and the scores of generated images.

Two classifiers with two jobs. The *filter* keeps the guided training pairs it finds convincing (the
paper's aesthetic filter); the *judge* scores every table. They start from different seeds, have
different widths and learn from disjoint halves of the training images, so a refiner that learned to
please the filter is not graded by it. Every score below is the judge's:

- class accuracy: the judge agrees with the intended label (adherence; our stand-in for CLIPScore);
- FD_cls: Frechet distance between the judge's penultimate features of generated images and of real
  held-out images (our stand-in for FID; not Inception FID, so never call it FID);
- IS_cls: exp E_x[KL(p(y|x) || p(y))] from the judge's softmax (an Inception-Score-style score);
- precision and recall (Kynkaanniemi et al. 2019, arXiv 1904.06991): fidelity and coverage, k = 3;
- diversity: mean pairwise feature distance within a class, relative to real images' (1 = as
  varied).

`python evaluate.py` prints these scores for a teacher's CFG scales.
"""
import dataclasses
import hashlib
import os
import statistics

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
from checkpoint import FORMAT, fingerprint, load_checkpoint, save_atomic
from cli import print_table
from diffusion import BATCH, CFG, STEPS, sample_many
from timing import spread, timed

# enough for >= 99% held-out accuracy on the embedded set
CLASSIFIER_STEPS = 600
# The embedded set's filter and judge, as this code trained them, ship with the repository (1.9 MB):
# a fixed yardstick, as FID ships its Inception weights. A cached file of the same name and
# settings is used first; `python evaluate.py --check-classifiers` retrains both and compares.
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "classifiers")
MIRROR_SAFE = ("shapes", "cifar10", "imagenet64")  # sets whose classes survive a left-right flip
BOOTSTRAP = 1000  # resamples of the held-out noises behind every 95% interval
# FD_cls's resamples draw the real reference images too, from their own stream: REAL_RESAMPLES
# draws, the b-th resample of the generated side meeting draw b mod REAL_RESAMPLES (each costs an
# eigendecomposition, once per judge; 200 spread a 1,000-resample interval's real side well, at a
# fifth of the cost)
REAL_RESAMPLES, REAL_RESAMPLE_SEED = 200, 1
INTERVALS = ("class_acc", "fd_cls")  # the scores that carry one

# ----------------------------------------------------------------------------------------------
# The classifiers: one network, two jobs
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Spec:
    """Who a classifier is: its job, initialisation seed, width and the half of the training images
    (even or odd indices) it learns from."""
    role: str
    seed: int
    width: int
    half: int


FILTER = Spec("filter", seed=0, width=32, half=0)
JUDGE = Spec("judge", seed=1, width=48, half=1)


class Classifier(nn.Module):
    """Four conv stages and global average pooling; `features` is the penultimate (4 * width)-d
    vector."""

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


def half_of(images, half):
    """The training images with index parity `half`: the filter and the judge never share an
    image."""
    idx = torch.arange(half, len(images), 2)
    return data.ImageSet(images.images[idx], images.labels[idx], images.classes)


def train_classifier(train, test, spec, flip, steps=None, batch_size=128, device="cpu"):
    """(classifier, accuracy on the real held-out images). The global random state is left as it
    was, so a run that trains the classifier draws what a run that loads it from the cache draws."""
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        clf = Classifier(len(train.classes), spec.width).to(device)
    steps = steps or CLASSIFIER_STEPS
    gen = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for _ in tqdm(range(steps), desc=spec.role, leave=False):
        x, y = train.batch(torch.randint(len(train), (batch_size,), generator=gen))
        # only for sets whose classes are mirror-symmetric (a digit's mirror image is no digit)
        if flip:
            mirror = torch.rand(batch_size, generator=gen) < 0.5
            x = torch.where(mirror[:, None, None, None], x.flip(3), x)
        loss = F.cross_entropy(clf(x.to(device)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    clf.eval()
    acc = (predict(clf, test.batch(slice(None))[0], device).argmax(1)
           == test.labels).float().mean().item()
    return clf, acc


@torch.no_grad()
def predict(clf, images, device="cpu", batch_size=500, features=False):
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device)
        out.append((clf.features(x) if features else clf(x)).cpu())
    return torch.cat(out)



def classifier_path(dataset, data_dir, test, spec):
    """Named by the data set (with a hash of its held-out images: a changed set never reuses a
    stale classifier) and the classifier's job; what made it is stored inside (settings)."""
    digest = hashlib.sha256(test.images.numpy().tobytes()).hexdigest()[:8]
    return os.path.join(data_dir, f"classifier-{dataset}-{test.images.shape[-1]}px-{digest}-"
                                  f"{spec.role}.pt")


def classifier_settings(spec, flip, steps):
    """What makes a classifier what it is, as its file records it and a load compares."""
    return {"spec": dataclasses.asdict(spec), "flip": flip, "steps": steps}


@dataclasses.dataclass
class Trained:
    """A trained classifier and what the tables print beside it."""
    net: Classifier
    spec: Spec
    test_acc: float
    device: str = "cpu"

    def info(self):
        return {"seed": self.spec.seed, "width": self.spec.width,
                "train_half": ["even", "odd"][self.spec.half], "test_acc": self.test_acc}

    def fingerprint(self):
        return fingerprint(self.net)

    def confidence(self, images, labels):
        """p(label | image): the filter keeps a pair when this is high enough."""
        probs = predict(self.net, images, self.device).softmax(1)
        return probs.gather(1, labels[:, None]).squeeze(1)


def load_or_train(spec, dataset, data_dir, image_size, device="cpu", steps=None):
    """The classifier of `spec`, trained once on its half of the training images (for `steps`,
    default CLASSIFIER_STEPS) and cached next to the data."""
    test = data.load_dataset(dataset, data_dir, image_size, "test")
    flip, steps = dataset in MIRROR_SAFE, steps or CLASSIFIER_STEPS
    path = classifier_path(dataset, data_dir, test, spec)
    ckpt = next((c for c in map(cached, (path, shipped_path(path)))
                 if c and c.get("settings") == classifier_settings(spec, flip, steps)), None)
    if ckpt:
        net = Classifier(len(ckpt["classes"]), spec.width)
        net.load_state_dict(ckpt["model"])
        net.to(device).eval()
        acc = ckpt["test_acc"]
    else:
        train = half_of(data.load_dataset(dataset, data_dir, image_size, "train"), spec.half)
        net, acc = train_classifier(train, test, spec, flip, steps, device=device)
        save_classifier(net, acc, train.classes, classifier_settings(spec, flip, steps), path)
        print(f"{spec.role} trained on {len(train)} images: held-out accuracy on real images "
              f"{acc:.3f}; cached at {path}")
    return Trained(net, spec, acc, device), test


def cached(path):
    """The classifier checkpoint at path, or None where there is none."""
    if not os.path.isfile(path):
        return None
    return load_checkpoint(path, "classifier", flag="classifier cache")


def save_classifier(net, acc, classes, made_with, path):
    save_atomic({"kind": "classifier", "format": FORMAT, "model": net.state_dict(),
                 "classes": classes, "test_acc": acc, "settings": made_with}, path)


def shipped_path(path):
    """Where the repository's own copy of the classifier cached at `path` would be (its name says
    what it is)."""
    return os.path.join(SHIPPED, os.path.basename(path))


def load_filter(dataset, data_dir, image_size, device="cpu", steps=None):
    return load_or_train(FILTER, dataset, data_dir, image_size, device, steps)[0]


def load_judge(dataset, data_dir, image_size, device="cpu", steps=None):
    return Judge(*load_or_train(JUDGE, dataset, data_dir, image_size, device, steps))


# ----------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------


def sqrt_psd(cov):
    """The symmetric square root of a covariance matrix."""
    vals, vecs = torch.linalg.eigh(cov.double())
    return vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(mu1, cov1, mu2, cov2, sqrt_cov1=None):
    """|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)), in float64.

    tr (C1 C2)^(1/2) = sum of sqrt(eigenvalues of C1^(1/2) C2 C1^(1/2)), a symmetric PSD matrix.
    sqrt_cov1: C1^(1/2) if already known (the real images' side, computed once per judge)."""
    s1 = sqrt_cov1 if sqrt_cov1 is not None else sqrt_psd(cov1)
    return frechet_from_sqrt(mu1, torch.trace(cov1.double()), s1, mu2, cov2)


def frechet_from_sqrt(mu1, trace1, sqrt_cov1, mu2, cov2):
    """frechet_distance from side 1's mean, trace of C1 and C1^(1/2) alone (what a bootstrap keeps
    of it)."""
    mu1, s1, mu2, cov2 = (t.double() for t in (mu1, sqrt_cov1, mu2, cov2))
    tr_sqrt = torch.linalg.eigvalsh(s1 @ cov2 @ s1).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + trace1 + torch.trace(cov2) - 2 * tr_sqrt)


def gaussian_stats(feats):
    return feats.double().mean(0), torch.cov(feats.double().T)


def inception_score(probs):
    """exp E_x KL(p(y|x) || p(y)) for softmax probabilities (N, K)."""
    probs = probs.double().clamp(min=1e-12)
    p_y = probs.mean(0, keepdim=True)
    return float(torch.exp((probs * (probs.log() - p_y.log())).sum(1).mean()))


def precision_recall(real, fake, k=3):
    """Kynkaanniemi et al. 2019: a set's manifold is the union of balls around its points, each
    reaching to the point's k-th nearest neighbour in the set. Precision: share of fake points
    inside the real manifold (fidelity); recall: share of real points inside the fake manifold
    (coverage)."""
    real, fake = real.double(), fake.double()

    # distance to the k-th nearest other point (the k + 1-th, counting the point itself)
    def radii(x):
        return torch.cdist(x, x).kthvalue(k + 1, dim=1).values

    def inside(points, centres, r):
        return float((torch.cdist(points, centres) <= r[None, :]).any(1).double().mean())
    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def equal_counts(real, real_labels, fake, fake_labels):
    """The same number of real and generated feature vectors per class (precision and recall are
    biased by unequal counts): the first min(n_real, n_fake) of each class, of each set."""
    keep_r, keep_f = [], []
    for k in torch.unique(fake_labels):
        r, f = torch.nonzero(real_labels == k)[:, 0], torch.nonzero(fake_labels == k)[:, 0]
        n = min(len(r), len(f))
        keep_r.append(r[:n])
        keep_f.append(f[:n])
    return real[torch.cat(keep_r)], fake[torch.cat(keep_f)]


def diversity(real, real_labels, fake, fake_labels):
    """Mean over classes of (mean pairwise feature distance among generated images of the
    class) / (the same among real images of the class). 1: as varied as real images; near 0: one
    prototype per class."""
    ratios = []
    for k in torch.unique(fake_labels):
        r, f = real[real_labels == k].double(), fake[fake_labels == k].double()
        if len(r) > 1 and len(f) > 1:
            ratios.append(float(torch.pdist(f).mean() / torch.pdist(r).mean()))
    return sum(ratios) / len(ratios)


def as_saved(images):
    """What a saved PNG would hold: images are scored after 8-bit quantisation, like real ones."""
    return data.to_float(data.to_uint8(images))


def bias_corrected_interval(values, point):
    """95% bias-corrected percentile interval (Efron 1981) from bootstrap values of a statistic
    whose estimate is `point`. FD_cls is biased upward on a resample (which holds only ~63% distinct
    samples), so plain percentiles would sit above the estimate; the correction shifts them by how
    far the bootstrap median sits from it. For an unbiased statistic (class accuracy) it is the
    plain percentile interval."""
    values = torch.as_tensor(values, dtype=torch.float64)
    below = float((values < point).double().mean() + 0.5 * (values == point).double().mean())
    z0 = torch.special.ndtri(torch.tensor(below).clamp(1 / (len(values) + 1),
                                                       len(values) / (len(values) + 1)))
    levels = torch.special.ndtr(
        2 * z0 + torch.special.ndtri(torch.tensor([0.025, 0.975], dtype=torch.float64)))
    return [float(values.quantile(levels[0])), float(values.quantile(levels[1]))]


def resamples(n, count=None, seed=0):
    """(count, n) indices: `count` resamples with replacement of n held-out noises. Every regime is
    scored on the same resamples, so the intervals of two regimes on the same noises, and of their
    difference, are paired."""
    return torch.randint(n, (count or BOOTSTRAP, n), generator=torch.Generator().manual_seed(seed))


@dataclasses.dataclass
class Measured:
    """What the judge saw of one regime's samples: features, softmax and intended labels (one row
    per noise); `boot` caches the scores on each bootstrap resample (Judge.bootstrap)."""
    feats: torch.Tensor
    probs: torch.Tensor
    labels: torch.Tensor
    boot: dict = None


class Judge:
    """Scores generated images; built once per data set from the judge classifier and the real
    held-out images."""

    def __init__(self, trained, test):
        self.trained, self.test_acc = trained, trained.test_acc
        self.real = predict(trained.net, test.batch(slice(None))[0], trained.device, features=True)
        self.real_labels = test.labels
        mu, cov = gaussian_stats(self.real)
        # FD_cls's real side: mean, trace, C^(1/2)
        self.real_stats = (mu, torch.trace(cov), sqrt_psd(cov))
        self.real_boot = None

    def info(self):
        return self.trained.info()

    def measure(self, images, labels):
        feats = predict(self.trained.net, as_saved(images), self.trained.device, features=True)
        with torch.no_grad():
            probs = self.trained.net.head(feats.to(self.trained.device)).softmax(1).cpu()
        return Measured(feats, probs, labels)

    def point_scores(self, m, idx=slice(None), real=None):
        """class_acc, fd_cls and is_cls of the samples idx (all by default; a bootstrap resample
        otherwise), FD_cls against the real reference's stats `real` (default: all of it)."""
        return {"class_acc": (m.probs[idx].argmax(1) == m.labels[idx]).float().mean().item(),
                "fd_cls": frechet_from_sqrt(*(real or self.real_stats),
                                            *gaussian_stats(m.feats[idx])),
                "is_cls": inception_score(m.probs[idx])}

    def real_resamples(self):
        """The real reference's stats on each of REAL_RESAMPLES resamples of its images, drawn once
        per judge and shared by every regime (so differences stay paired): FD_cls's interval then
        holds the reference's own sampling noise, not only the generated side's (docs/evaluation.md
        measures how much it adds)."""
        if self.real_boot is None:
            self.real_boot = []
            for idx in resamples(len(self.real), REAL_RESAMPLES, REAL_RESAMPLE_SEED):
                mu, cov = gaussian_stats(self.real[idx])
                self.real_boot.append((mu, torch.trace(cov), sqrt_psd(cov).float()))
        return self.real_boot

    def bootstrap(self, m):
        """{key: (BOOTSTRAP,) scores of m on each shared resample of its noises (and, for FD_cls, of
        the real reference)}, computed once per regime: every interval is read off these."""
        if m.boot is None:
            real = self.real_resamples()
            scores = [self.point_scores(m, idx, real[b % len(real)])
                      for b, idx in enumerate(resamples(len(m.labels)))]
            m.boot = {key: torch.tensor([s[key] for s in scores], dtype=torch.float64)
                      for key in INTERVALS}
        return m.boot

    def scores(self, m, intervals=True):
        """Every score of one regime; with intervals, 95% bootstrap intervals over the noises."""
        out = self.point_scores(m)
        out["precision"], out["recall"] = precision_recall(
            *equal_counts(self.real, self.real_labels, m.feats, m.labels))
        out["diversity"] = diversity(self.real, self.real_labels, m.feats, m.labels)
        if intervals:
            out["ci"] = {key: bias_corrected_interval(self.bootstrap(m)[key], out[key])
                         for key in INTERVALS}
        return out

    def score(self, images, labels):
        """Point scores of images in [-1, 1] (N, 3, H, W) with intended labels (N,): no
        intervals."""
        return self.scores(self.measure(images, labels), intervals=False)

    def difference(self, a, b):
        """Score of regime a minus regime b on the same noises, with a paired 95% bootstrap
        interval: {key: [difference, lo, hi]}. An interval that holds 0 means the two are within
        noise."""
        return {key: seeds_interval(self, [a], [b], key) for key in INTERVALS}

    def classify(self, images):
        """The judge's class for each image, scored as in `score`."""
        return predict(self.trained.net, as_saved(images), self.trained.device).argmax(1)


def seeds_interval(judge, runs_a, runs_b=(), key="class_acc", seed=0):
    """[value, lo, hi]: the mean over seeds of row a's score (minus row b's, if given), and its 95%
    interval from a two-level bootstrap. Each resample draws the held-out noises with replacement
    (the same draw for every run: the rows share their noises, so a comparison is paired) and each
    row's seeds with replacement, so the interval widens with both the evaluation noise and the
    seed-to-seed spread of training. runs_a, runs_b: one Measured per seed (one alone: a plain
    bootstrap over the noises)."""
    gen = torch.Generator().manual_seed(seed)

    def mean_over_seeds(runs):
        """(point, (BOOTSTRAP,) values): each resample takes the mean over a resample of the
        seeds."""
        boot = torch.stack([judge.bootstrap(r)[key] for r in runs])  # (seeds, BOOTSTRAP)
        pick = torch.randint(len(runs), boot.shape, generator=gen)
        return (statistics.mean(judge.point_scores(r)[key] for r in runs),
                boot.gather(0, pick).mean(0))
    point, values = mean_over_seeds(runs_a)
    if runs_b:
        point_b, values_b = mean_over_seeds(runs_b)
        point, values = point - point_b, values - values_b
    return [point, *bias_corrected_interval(values, point)]


def verdict(diff, key="class_acc"):
    """'higher', 'lower' or 'within noise': where the 95% interval of a difference lies."""
    _, lo, hi = diff[key]
    return "higher" if lo > 0 else "lower" if hi < 0 else "within noise"


# ----------------------------------------------------------------------------------------------
# Regimes on a fixed noise bank
# ----------------------------------------------------------------------------------------------


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


def run_regimes(teacher, judge, x_T, y, regimes, steps=STEPS, batch_size=BATCH, intervals=True):
    """Sample the bank in each regime and score it. regimes: {name: dict(w=, refiner=, guidance=,
    pag=)}, each key optional (w = 0 is no guidance). The regimes take turns batch by batch, the
    order rotating, so each batch is a timing round and a slow spell of the machine hits every
    regime alike (timing.py): sec_per_image is the median round's, sec_per_image_range the fastest
    and slowest. Forwards are counted by a hook. Returns ({name: row}, {name: images}, {name:
    measured}, {name: [seconds per image, by round]})."""
    runs = {name: {"w": 0.0, "refiner": None, "guidance": CFG, "pag": 0.0, **r}
            for name, r in regimes.items()}
    device, n = str(next(teacher.parameters()).device), min(batch_size, len(y))
    for r in runs.values():  # warm-up, not timed or counted: allocator and kernels settle first
        sample_many(teacher, x_T[:n], y[:n], 1, batch_size=batch_size, **r)
    images, rounds, forwards = ({name: [] for name in runs} for _ in range(3))
    names = list(runs)
    for k, i in enumerate(tqdm(range(0, len(y), batch_size), desc=" / ".join(names), leave=False)):
        for name in names[k % len(names):] + names[:k % len(names)]:
            r = runs[name]
            xb, yb = x_T[i:i + batch_size], y[i:i + batch_size]
            counter = ForwardCounter(teacher, *([r["refiner"]] if r["refiner"] is not None else []),
                                     *r["guidance"].networks())
            out, seconds = timed(
                lambda: sample_many(teacher, xb, yb, steps, batch_size=batch_size, **r), device)
            counter.remove()
            images[name].append(out)
            rounds[name].append(seconds / len(yb))
            forwards[name].append(counter.images)
    rows, measured = {}, {}
    for name in names:
        images[name] = torch.cat(images[name])
        measured[name] = judge.measure(images[name], y)
        time_per_image = spread(rounds[name])
        rows[name] = {"name": name, "w": runs[name]["w"], "steps": steps,
                      **judge.scores(measured[name], intervals),
                      "nfe_per_image": sum(forwards[name]) / len(y),
                      "sec_per_image": time_per_image["median"],
                      "sec_per_image_range": [time_per_image["min"], time_per_image["max"]]}
    return rows, images, measured, rounds


def run_regime(teacher, judge, x_T, y, name, w=0.0, steps=STEPS, refiner=None, batch_size=BATCH,
               intervals=True, guidance=CFG, pag=0.0):
    """One regime of run_regimes. Returns (row, images, measured)."""
    regime = dict(w=w, refiner=refiner, guidance=guidance, pag=pag)
    rows, images, measured, _ = run_regimes(teacher, judge, x_T, y, {name: regime}, steps,
                                            batch_size, intervals)
    return rows[name], images[name], measured[name]


def judge_line(judge, filter=None):
    """What every table prints above itself: who graded it, and how well it reads real images."""
    line = (f"judge (seed {judge.trained.spec.seed}, width {judge.trained.spec.width}, "
            f"{judge.info()['train_half']} half of the training images): accuracy on real held-out "
            f"images {judge.test_acc:.3f}")
    if filter is not None:
        line += f"; the pairs' filter (another network, the other half) {filter.test_acc:.3f}"
    return line


def print_regimes(rows, title=None):
    """The regime table: every score with its 95% interval where it has one."""
    if title:
        print(title)
    cells = []
    for r in rows:
        acc, fd = r["ci"]["class_acc"], r["ci"]["fd_cls"]
        cells.append([r["name"], f"{r['w']:.2f}", r["steps"],
                      f"{r['class_acc']:.3f} [{acc[0]:.3f}, {acc[1]:.3f}]",
                      f"{r['fd_cls']:.2f} [{fd[0]:.2f}, {fd[1]:.2f}]", f"{r['is_cls']:.2f}",
                      f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['diversity']:.3f}",
                      f"{r['nfe_per_image']:.1f}", f"{1000 * r['sec_per_image']:.2f}"])
    print_table(["regime", "w", "steps", "class_acc [95% CI]", "FD_cls [95% CI]", "IS_cls",
                 "precision", "recall", "diversity", "NFE/img", "ms/img"], cells)


def print_difference(name_a, name_b, diff):
    acc, fd = diff["class_acc"], diff["fd_cls"]
    print(f"{name_a} - {name_b}: class_acc {acc[0]:+.3f} [{acc[1]:+.3f}, {acc[2]:+.3f}] "
          f"({verdict(diff)}); FD_cls {fd[0]:+.2f} [{fd[1]:+.2f}, {fd[2]:+.2f}] "
          f"({verdict(diff, 'fd_cls')}; lower is better)")
