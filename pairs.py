"""NoiseRefine's training data (paper §3.3): guided pairs (x_T, c, x0_guide), cached in shards,
filtered.

    x_T       Gaussian noise, from the 'pairs' stream of noises.py (never shown or scored anywhere)
    c         a class label, uniform
    w         a guidance scale drawn per pair from its range (diffusion.GUIDANCES): random scales
              reduce the bias of one scale
    x0_guide  DenoiseGuide(x_T, c): N' guided DDIM steps from x_T (eq. 1-2), stored as 8-bit images;
              the guidance is CFG (the paper's), CFG + PAG, autoguidance or CFG on an interval
              (diffusion.Guidance)
    conf      the filter classifier's confidence in x0_guide (the paper keeps high aesthetic scores)

A shard depends only on its index and the settings, and is written whole or not at all, so an
interrupted or split (torchrun) generation resumes to exactly the pairs of an uninterrupted one.
"""
import dataclasses
import json
import math
import os

import torch
from tqdm import tqdm

import data
import distributed
import noises
from accel import autocast
from checkpoint import fingerprint, save_atomic, save_json
from diffusion import CFG, GUIDANCES, INTERVAL, STEPS, sample_many
from safety import BadInput

SHARD = 1000  # pairs per shard (fewer when there are fewer pairs)
FILTER = 0.9  # the filter's minimum confidence in a kept pair (train_refiner --filter)
VAL_FRAC = 0.05  # share of the kept pairs held out for validation


@dataclasses.dataclass
class PairSettings:
    """Everything that decides the pairs' content (and so the cache folder's name)."""
    count: int = 10000        # pairs before filtering
    guide_steps: int = STEPS  # N': guided DDIM steps that make x0_guide
    w_range: tuple = GUIDANCES["cfg"]["w_range"]  # CFG scale drawn per pair (low == high: one)
    pag: float = 0.0          # PAG scale added to the guidance
    # "cfg" (with pag > 0: CFG + PAG), "autoguidance" or "interval" (diffusion.Guidance)
    guidance: str = "cfg"
    interval: tuple = INTERVAL  # (sigma_lo, sigma_hi] of "interval"
    seed: int = 0
    amp: str = "none"         # "bf16": the guided steps under bf16 autocast (accel.py)


def for_guidance(name, **fields):
    """The PairSettings of a guidance name of train_refiner.py --guidance, at its scale range and
    PAG scale in diffusion.GUIDANCES (cfg+pag is CFG with a PAG term). fields override (count, seed,
    ...)."""
    defaults = dict(GUIDANCES[name], guidance="cfg" if name == "cfg+pag" else name)
    return PairSettings(**{**defaults, **fields})


def shard_size(s):
    return min(SHARD, s.count)


def cache_dir(s, teacher_path, teacher_fp, weak_fp=None):
    """The pairs' folder, next to the teacher, named by what decides a shard's content (not the
    count: a longer run reuses a shorter one's shards); cache_settings are stored inside."""
    lo, hi = s.w_range
    name = [f"pairs-{s.guidance}", f"w{lo:g}-{hi:g}", f"steps{s.guide_steps}", f"seed{s.seed}",
            f"shard{shard_size(s)}", f"teacher{teacher_fp[:8]}"]
    name += [f"pag{s.pag:g}"] if s.pag else []
    name += [s.amp] if s.amp != "none" else []
    name += [f"sigma{s.interval[0]:g}-{s.interval[1]:g}"] if s.guidance == "interval" else []
    name += [f"weak{weak_fp[:8]}"] if s.guidance == "autoguidance" else []
    return os.path.join(os.path.dirname(teacher_path), "-".join(name))


def cache_settings(s, teacher, guidance):
    """Everything that decides a shard's content, as the cache's settings.json holds it."""
    kept = {k: v for k, v in dataclasses.asdict(s).items() if k != "count"}
    if s.guidance != "interval":
        del kept["interval"]
    kept.update(shard_size=shard_size(s), teacher=fingerprint(teacher),
                weak=[fingerprint(n) for n in guidance.networks()])
    return json.loads(json.dumps(kept))  # as read back from settings.json: lists, not tuples


def check_cache(folder, settings, rank=0):
    """Record the settings in a new cache; refuse, in one line, a cache made with other ones."""
    path = os.path.join(folder, "settings.json")
    if os.path.isfile(path):
        stored = json.load(open(path))
        if stored != settings:
            other = ", ".join(k for k in settings if stored.get(k) != settings[k])
            raise BadInput(f"pair cache {folder} holds pairs made with another {other}; delete it, "
                           "or choose another --pairs-dir")
    elif rank == 0:
        save_json(settings, path)


def pair_inputs(index, s, num_classes, image_size):
    """x_T ~ N(0, I), c and w ~ U(w_range) of one shard, from the shard's own generator in the
    'pairs' stream: a resumed or split generation draws exactly the same, and no other use draws
    these noises."""
    n = shard_size(s)
    gen = noises.generator("pairs", s.seed, index)
    x_T = torch.randn(n, 3, image_size, image_size, generator=gen)
    y = torch.randint(num_classes, (n,), generator=gen)
    lo, hi = s.w_range
    w = lo + (hi - lo) * torch.rand(n, generator=gen)
    return x_T, y, w


def make_shard(teacher, pair_filter, index, s, num_classes, image_size, guidance=CFG):
    """One shard: x_T, c, w, x0_guide = DenoiseGuide(x_T, c) (eq. 1-2), the filter's confidence in
    each x0_guide and the filter's fingerprint (so that a changed filter is noticed)."""
    x_T, y, w = pair_inputs(index, s, num_classes, image_size)
    with autocast(next(teacher.parameters()).device, s.amp):
        x0_guide = sample_many(teacher, x_T, y, s.guide_steps, w, s.pag, guidance=guidance)
    x0_guide = data.to_uint8(x0_guide)  # what a guided image is: 8 bits; also 4x smaller on disk
    return {"x_T": x_T, "y": y, "w": w, "x0_guide": x0_guide,
            **filter_scores(pair_filter, x0_guide, y)}


def filter_scores(pair_filter, x0_guide, y):
    return {"conf": pair_filter.confidence(data.to_float(x0_guide), y),
            "filter": pair_filter.fingerprint()}


def shard_paths(s, folder):
    return [os.path.join(folder, f"shard_{i:05d}.pt")
            for i in range(math.ceil(s.count / shard_size(s)))]


def make_pairs(teacher, pair_filter, s, folder, num_classes, image_size, rank=0, world=1,
               guidance=CFG):
    """Generate the shards missing from the cache. Under torchrun, process r makes shards r,
    r + world, ...; since a shard depends only on its index, the union is the same."""
    os.makedirs(folder, exist_ok=True)
    check_cache(folder, cache_settings(s, teacher, guidance), rank)
    paths = shard_paths(s, folder)
    for i in tqdm(range(rank, len(paths), world), desc="guided pairs", disable=rank > 0):
        if not os.path.isfile(paths[i]):  # a shard exists only once it was written whole (rename)
            save_atomic(make_shard(teacher, pair_filter, i, s, num_classes, image_size, guidance),
                        paths[i])
    distributed.barrier()


def read_pairs(s, folder, pair_filter):
    """Every shard of the cache; a shard whose confidences came from another filter is re-scored
    (and rewritten) by this one, since x_T and x0_guide do not depend on the filter but `conf`
    does."""
    shards = []
    for path in shard_paths(s, folder):
        try:
            shard = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise BadInput(f"pair cache {path} is unreadable ({type(e).__name__}); delete it to "
                           "regenerate") from None
        if shard.get("filter") != pair_filter.fingerprint():
            shard.update(filter_scores(pair_filter, shard["x0_guide"], shard["y"]))
            save_atomic(shard, path)
        shards.append(shard)
    return {k: torch.cat([sh[k] for sh in shards])[:s.count] for k in shards[0] if k != "filter"}


def load_pairs(teacher, pair_filter, s, folder, num_classes, image_size, guidance=CFG):
    """All the pairs (one process): whole shards from the cache, missing ones generated."""
    make_pairs(teacher, pair_filter, s, folder, num_classes, image_size, guidance=guidance)
    return read_pairs(s, folder, pair_filter)


def split_pairs(pairs, threshold, val_frac, batch_size):
    """Quality filter (paper §3.3): keep pairs whose confidence is at least `threshold`; then a
    fixed validation split of the kept ones."""
    keep = pairs["conf"] >= threshold
    kept = {k: v[keep] for k, v in pairs.items()}
    n = len(kept["y"])
    n_val = max(1, int(val_frac * n))
    print(f"filter: kept {n} of {len(keep)} pairs ({n / len(keep):.1%}) with the filter's "
          f"confidence >= {threshold}; {n - n_val} train, {n_val} validation")
    if n - n_val < batch_size:
        raise BadInput(f"--filter {threshold} leaves {max(0, n - n_val)} training pairs, fewer "
                       f"than --batch-size {batch_size}")
    return {k: v[n_val:] for k, v in kept.items()}, {k: v[:n_val] for k, v in kept.items()}


def batch_of(pairs, idx, device):
    """(x_T, c, x0_guide in [-1, 1]) of the pairs idx, on the device."""
    x0_guide = data.to_float(pairs["x0_guide"][idx])
    return pairs["x_T"][idx].to(device), pairs["y"][idx].to(device), x0_guide.to(device)
