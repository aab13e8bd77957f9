"""Inception FID (Heusel et al. 2017, arXiv 1706.08500), for comparing with papers on CIFAR-10 and
ImageNet-64: evaluate.py --fid and train_refiner.py --fid.

The features are pytorch-fid's port of the TF Inception v3 (2048-d pool features, the images resized
to 299 px inside it), an optional dependency imported only when --fid is asked for: pip install
pytorch-fid. Its weights are downloaded on first use into torch's hub cache; a machine without
network needs that file copied there. The reference statistics are the training set's, cached beside
the data set.

Read an FID with its sample count: FID is biased upward at small n (Chong & Forsyth 2020, arXiv
1911.07023), so numbers are comparable only at equal n, and papers use 50,000. With CFG, FID against
real data can rise while class adherence improves, so the table also gives the FID of the refined
samples against the CFG samples: how close NoiseRefine's images come to the guided ones it learned
from.

The embedded sets' own stand-in, FD_cls (metrics.py), needs none of this.
"""
import hashlib
import os

import torch
from tqdm import tqdm

import data
from checkpoint import save_atomic
from metrics import as_saved, frechet_distance, gaussian_stats
from safety import BadInput

REFERENCE = "the training set"


def inception(device):
    """The feature function of pytorch-fid's Inception v3: images in [-1, 1] -> (N, 2048)
    float64."""
    try:
        from pytorch_fid.inception import InceptionV3
    except ImportError:
        raise BadInput("--fid needs the optional package pytorch-fid (pip install "
                       "pytorch-fid)") from None
    try:
        net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device).eval()
    except Exception as e:  # no network for the first download, or a broken cache file
        raise BadInput(f"--fid: the Inception weights could not be loaded ({type(e).__name__}); "
                       f"pytorch-fid downloads them into {torch.hub.get_dir()}/checkpoints on "
                       "first use") from None

    @torch.no_grad()
    def features(images):
        # pytorch-fid takes [0, 1]
        return net(((images + 1) / 2).to(device))[0].flatten(1).double().cpu()
    features.name = "inception-v3-pytorch-fid"
    return features


class FID:
    """FID of generated images against a reference set's statistics, under one feature function."""

    def __init__(self, features, batch_size=200):
        self.features, self.batch_size = features, batch_size

    def feats(self, images, desc=None):
        """Features of 8-bit-quantised images (what a saved PNG would hold), in batches."""
        chunks = range(0, len(images), self.batch_size)
        return torch.cat([self.features(as_saved(images[i:i + self.batch_size]))
                          for i in tqdm(chunks, desc=desc, leave=False, disable=desc is None)])

    def stats(self, images, desc=None):
        return gaussian_stats(self.feats(images, desc))

    def reference(self, dataset, data_dir, image_size):
        """(mu, cov, n) of the training set's features, cached in data_dir (written whole or not at
        all)."""
        key = hashlib.sha256(
            f"{self.features.name}/{dataset}/{image_size}".encode()).hexdigest()[:10]
        path = os.path.join(data_dir, f"fid_stats_{dataset}_{image_size}_{key}.pt")
        if os.path.isfile(path):
            ref = torch.load(path, weights_only=True)
            return ref["mu"], ref["cov"], ref["n"]
        train = data.load_dataset(dataset, data_dir, image_size, "train")
        mu, cov = self.stats(data.to_float(train.images), desc=f"FID statistics of {dataset}")
        save_atomic({"mu": mu, "cov": cov, "n": len(train)}, path)
        return mu, cov, len(train)

    def table(self, images, reference, against=None):
        """{regime: {"fid", "n", ...}}: each regime's FID against the reference statistics; with
        against=(regime_a, regime_b), also regime_a's FID against regime_b's samples."""
        mu_r, cov_r, n_r = reference
        stats = {name: self.stats(x, desc=f"FID {name}") for name, x in images.items()}
        rows = {name: {"fid": frechet_distance(*stats[name], mu_r, cov_r), "n": len(images[name]),
                       "reference": REFERENCE, "reference_n": n_r} for name in images}
        if against:
            a, b = against
            rows[a][f"fid_to_{b}"] = frechet_distance(*stats[a], *stats[b])
        return rows


def print_fid(rows):
    n = {r["n"] for r in rows.values()}
    print(f"Inception FID against {REFERENCE} ({next(iter(rows.values()))['reference_n']} images), "
          f"{'/'.join(map(str, sorted(n)))} samples per regime (papers use 50,000; fewer reads "
          "higher):")
    for name, r in rows.items():
        extra = "".join(f"; FID to the {k[7:]} samples {v:.2f}" for k, v in r.items()
                        if k.startswith("fid_to_"))
        print(f"  {name}: {r['fid']:.2f}{extra}")
