"""Why refined noise works: the paper's analyses (§5 of the paper, arXiv 2412.03895), one
subcommand per figure.

    python analyze.py diff       # |x_hat_T - x_T| against two independent noises (Figs. 3a, 7a)
    python analyze.py spectrum   # radial FFT magnitude of the difference (Figs. 3b, 7b)
    python analyze.py layout     # the difference beside the image it makes, per class (Fig. 9)
    python analyze.py trajectory # predicted x0 over the steps, three regimes (Fig. 10)
    python analyze.py bandswap   # swap / keep radial frequency bands (Figs. 20, 22-24)
    python analyze.py slerp      # spherical interpolation, refined and not (Fig. 27)
    python analyze.py mismatch   # refine with class a, denoise with b or null (Fig. 26)
    python analyze.py jacobian   # d eps / d x_t against c I; MSD vs full gradient
                                   (App. B.1, Prop. 2, Fig. 12)
    python analyze.py inversion  # DDIM inversion of CFG samples: guidance-free noise
                                   (§3.1, Fig. 3 vs 7)
    python analyze.py samplers   # refined noise under DDIM, Euler, DPM-Solver++(2M) (Fig. 29)
    python analyze.py judges     # every regime scored by the judge and by the filter
                                   (beyond the paper)
    python analyze.py guidance   # each guidance's scale on Gaussian noise: how GUIDANCES was chosen
    python analyze.py frontier --out docs   # quality against forwards per image, test bank:
                                              docs/frontier.png
    python analyze.py all

Each prints its numbers and writes --out/<name>.png (an image grid) and/or --out/<name>.csv
(curves; also <name>_plot.png when matplotlib happens to be installed). Noises come from the dev
bank of held-out noises (never a training x_T, and never the test bank of the final tables);
scores are the judge's. Defaults: the teacher and refiner that `python train_refiner.py` writes.
"""
import csv
import math
import os
import time
from dataclasses import dataclass

import torch

import data
import noises
import plot
from checkpoint import load_checkpoint, load_teacher, save_json, teacher_of
import cli
from cli import entry_point, print_table, resolve_device, seed_everything
from diffusion import (CFG, DISPLAY_W, GUIDANCES, INTERVAL, STEPS, SAMPLERS, Guidance, ddim_invert,
                       q_sample, sample, sample_many, timestep_batch)
from metrics import FILTER, Judge, judge_line, load_judge, load_or_train, run_regime, run_regimes
from noiserefine import RefinerSettings, full_loss, load_refiner, msd_loss, refine_many
from teacher import TeacherSettings, get_weak
from teacher_loop import rebuild_weak
from safety import write_atomic



@dataclass
class Context:
    teacher: torch.nn.Module
    refiner: torch.nn.Module
    judge: Judge
    K: int
    size: int
    out: str
    n: int
    steps: int
    dataset_args: tuple  # (dataset, data_dir, image_size) of the teacher's data
    teacher_path: str = None  # autoguidance finds its weak model next to it


# ----------------------------------------------------------------------------------------------
# Helpers: refining, frequency bands, files
# ----------------------------------------------------------------------------------------------


def on_device(ctx, *tensors):
    """Tensors at rest live on the CPU (banks, pictures, statistics); they meet the networks on
    theirs."""
    device = next(ctx.teacher.parameters()).device
    return [t.to(device) for t in tensors]


def refine(ctx, x_T, y):
    """x_hat_T = g_phi(x_T, c), batched; on the CPU like its inputs."""
    return refine_many(ctx.refiner, x_T, y)


def bank(ctx, n=None, index=0):
    """Noises of the dev bank (the test bank is kept for the final tables); index 1: independent
    others."""
    return noises.bank("dev", n or ctx.n, ctx.K, (3, ctx.size, ctx.size), index)


def radius(size):
    """Normalised radial frequency of every 2-D FFT bin: 0 at DC, 1 at the corner
    (fx = fy = 1/2)."""
    f = torch.fft.fftfreq(size)
    return torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2) / math.sqrt(0.5)


def band_mask(size, lo, hi):
    r = radius(size)
    return ((r >= lo) & (r < hi)) | ((r == 1.0) & (hi >= 1.0))


def band_energy(x, bands=10):
    """Share of the FFT energy |F|^2 (summed over images and channels) in each of `bands` radial
    bands."""
    energy = torch.fft.fft2(x.double()).abs().pow(2).sum((0, 1))
    total = energy.sum()
    return [float(energy[band_mask(x.shape[-1], b / bands, (b + 1) / bands)].sum() / total)
            for b in range(bands)]


def swap_band(x_base, x_band, mask):
    """x_base with the FFT bins in `mask` replaced by those of x_band (a real image again)."""
    F_base, F_band = torch.fft.fft2(x_base), torch.fft.fft2(x_band)
    return torch.fft.ifft2(torch.where(mask, F_band, F_base)).real


def write_csv(ctx, name, header, rows):
    path = os.path.join(ctx.out, f"{name}.csv")
    write_atomic(path, lambda f: csv.writer(f).writerows([header, *rows]), mode="w")
    return path


def maybe_plot(ctx, name, x, series, xlabel, ylabel, logy=False):
    """A PNG plot when matplotlib is installed; never required (the CSV holds the same numbers)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, ys in series.items():
        ax.plot(x, ys, marker="o", ms=3, label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, yscale="log" if logy else "linear")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(ctx.out, f"{name}_plot.png"), dpi=120)
    plt.close(fig)


def grid(ctx, name, rows):
    """rows: list of (n_cols, 3, H, W) tensors in [-1, 1], all the same length."""
    path = os.path.join(ctx.out, f"{name}.png")
    data.save_grid(torch.cat(rows), rows[0].shape[0], path)
    return path


def show_diff(d):
    """A noise difference made visible: scaled so that 3 standard deviations reach full colour."""
    return (d / (3 * d.std())).clamp(-1, 1)


def balanced_first(y, K, per_class):
    return torch.cat([torch.nonzero(y == k)[:per_class, 0] for k in range(min(K, 10))])


def table(header, rows, fmt):
    """Print rows under a header, each float in its column's format ('' leaves a value as it is)."""
    print_table(header, [[format(v, f) if f and isinstance(v, float) else v for v, f in zip(r, fmt)]
                         for r in rows])


# ----------------------------------------------------------------------------------------------
# 1-2. How large, and which frequencies: the difference x_hat_T - x_T
# ----------------------------------------------------------------------------------------------


def analysis_diff(ctx):
    x_T, y = bank(ctx)
    other, _ = bank(ctx, index=1)  # an independent Gaussian noise for each x_T
    d_ref = (refine(ctx, x_T, y) - x_T).abs().flatten()
    d_ind = (other - x_T).abs().flatten()
    stats = {name: (float(d.mean()), float(torch.quantile(d, 0.99))) for name, d in
             (("refined - x_T", d_ref), ("independent", d_ind))}
    print(f"|x_hat_T - x_T| over {len(y)} held-out noises x {d_ref.numel() // len(y)} values:")
    table(["difference", "mean", "99th pct"], [(k, *v) for k, v in stats.items()],
          ["", ".4f", ".4f"])
    print(f"mean |x_hat_T - x_T| is {stats['refined - x_T'][0] / stats['independent'][0]:.3f}x "
          "that of two independent noises")
    edges = torch.linspace(0, float(d_ind.max()), 41)
    h_ref = torch.histogram(d_ref.clamp(max=edges[-1]), edges, density=True).hist
    h_ind = torch.histogram(d_ind, edges, density=True).hist
    rows = [(f"{edges[i]:.3f}", f"{edges[i + 1]:.3f}", f"{h_ref[i]:.5f}", f"{h_ind[i]:.5f}")
            for i in range(40)]
    print("wrote", write_csv(ctx, "diff", ["lo", "hi", "density_refined", "density_independent"],
                             rows))
    maybe_plot(ctx, "diff", ((edges[:-1] + edges[1:]) / 2).tolist(),
               {"|x_hat_T - x_T|": h_ref.tolist(), "two independent noises": h_ind.tolist()},
               "|difference|", "density", logy=True)
    return {"mean_refined": stats["refined - x_T"][0], "p99_refined": stats["refined - x_T"][1],
            "mean_independent": stats["independent"][0],
            "p99_independent": stats["independent"][1]}


def analysis_spectrum(ctx):
    x_T, y = bank(ctx)
    other, _ = bank(ctx, index=1)
    e_ref, e_ind = band_energy(refine(ctx, x_T, y) - x_T), band_energy(other - x_T)
    print("share of the difference's FFT energy per radial band (0 = DC, 1 = the corner "
          "frequency):")
    rows = [(f"{b / 10:.1f}-{(b + 1) / 10:.1f}", e_ref[b], e_ind[b]) for b in range(10)]
    table(["band", "refined", "independent"], rows, ["", ".4f", ".4f"])
    ratio = e_ref[0] / e_ind[0]
    print(f"lowest band (0-0.1): {e_ref[0]:.1%} of the refined difference's energy vs "
          f"{e_ind[0]:.1%} of white noise's: {ratio:.1f}x")
    print("wrote", write_csv(ctx, "spectrum",
                             ["band", "energy_share_refined", "energy_share_independent"],
                             [(r[0], f"{r[1]:.6f}", f"{r[2]:.6f}") for r in rows]))
    maybe_plot(ctx, "spectrum", [b / 10 + 0.05 for b in range(10)], {"refined - x_T": e_ref,
               "independent": e_ind}, "normalised radius", "share of energy", logy=True)
    return {"low_share_refined": e_ref[0], "low_share_independent": e_ind[0], "ratio": ratio}


# ----------------------------------------------------------------------------------------------
# 3-4. What the difference looks like, and when the image forms
# ----------------------------------------------------------------------------------------------


def analysis_layout(ctx):
    x_T, y = bank(ctx)
    x_hat = refine(ctx, x_T, y)
    gauss = sample_many(ctx.teacher, x_T, y, ctx.steps)
    refined = sample_many(ctx.teacher, x_hat, y, ctx.steps)
    d, change = (x_hat - x_T).flatten(1), (refined - gauss).flatten(1)

    def corr(a, b):
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean())
    same, shuffled = corr(d, change), corr(d, change.roll(1, 0))
    print(f"correlation, over pixels, of x_hat_T - x_T with the change it makes to the image "
          f"(refined sample minus Gaussian sample): {same:.3f} (same noise) vs {shuffled:.3f} "
          "(another noise's change)")
    idx = balanced_first(y, ctx.K, 2)
    cols = [x_T[idx], show_diff(x_hat[idx] - x_T[idx]), refined[idx], gauss[idx]]
    print("wrote", grid(ctx, "layout", cols),
          "(rows: x_T; x_hat_T - x_T, scaled; the refined sample; the Gaussian sample. "
          "Two columns per class)")
    return {"corr_same": same, "corr_shuffled": shuffled}


@torch.no_grad()
def analysis_trajectory(ctx):
    x_T, y = bank(ctx, min(ctx.n, 500))
    regimes = {"unguided": (x_T, 0.0), f"cfg w={DISPLAY_W:g}": (x_T, DISPLAY_W),
               "refined": (refine(ctx, x_T, y), 0.0)}
    acc, dist, examples = {}, {}, {}
    for name, (x, w) in regimes.items():
        final, x0s = sample(ctx.teacher, *on_device(ctx, x, y), ctx.steps, w, return_x0=True)
        final, x0s = final.cpu(), [x0.cpu() for x0 in x0s]
        acc[name] = [ctx.judge.score(x0, y)["class_acc"] for x0 in x0s]
        # how much of the final image is already there at each step
        dist[name] = [float((x0.clamp(-1, 1) - final).pow(2).mean().sqrt()) for x0 in x0s]
        examples[name] = torch.stack(x0s, 1)[:3]  # (3 noises, steps, 3, H, W)
    print(f"per DDIM step ({len(y)} noises): class accuracy of the predicted x0, and its RMS "
          "distance to the sample the run ends with")
    names = list(regimes)
    rows = [(k + 1, *(acc[n][k] for n in names), *(dist[n][k] for n in names))
            for k in range(ctx.steps)]
    table(["step", *(f"acc {n}" for n in names), *(f"rms {n}" for n in names)], rows,
          ["", *[".3f"] * 3, *[".3f"] * 3])
    print("wrote", write_csv(ctx, "trajectory", ["step", *(f"acc_{n}" for n in names),
                                                 *(f"rms_to_final_{n}" for n in names)],
                             [(r[0], *(f"{v:.4f}" for v in r[1:])) for r in rows]))
    maybe_plot(ctx, "trajectory", list(range(1, ctx.steps + 1)), acc, "DDIM step",
               "class accuracy of x0 pred")
    rows_img = [examples[n][i] for i in range(3) for n in regimes]
    print("wrote", grid(ctx, "trajectory", rows_img), "(rows: noise 1 unguided, CFG, refined; "
          "noise 2 ...; columns: predicted x0 at steps 1..N)")
    return {name: {"acc": acc[name], "rms_to_final": dist[name]} for name in names}


# ----------------------------------------------------------------------------------------------
# 5. Frequency bands: which part of the correction carries the effect
# ----------------------------------------------------------------------------------------------


def closeness(images, refined, gauss):
    """1 - d(images, refined) / d(Gaussian sample, refined): 1 = the refined sample, 0 = as far as
    the Gaussian sample from the same x_T."""
    return 1 - float((images - refined).pow(2).mean() / (gauss - refined).pow(2).mean())


def analysis_bandswap(ctx):
    x_T, y = bank(ctx, min(ctx.n, 300))
    x_hat = refine(ctx, x_T, y)
    fresh, _ = bank(ctx, len(y), index=1)
    refined = sample_many(ctx.teacher, x_hat, y, ctx.steps)
    gauss = sample_many(ctx.teacher, x_T, y, ctx.steps)
    rows, shown = [], balanced_first(y, ctx.K, 1)
    pictures = [gauss[shown]]
    for b in range(10):
        swapped = swap_band(x_T, x_hat, band_mask(ctx.size, b / 10, (b + 1) / 10))
        images = sample_many(ctx.teacher, swapped, y, ctx.steps)
        pictures.append(images[shown])
        rows.append((f"swap {b / 10:.1f}-{(b + 1) / 10:.1f}", closeness(images, refined, gauss),
                     ctx.judge.score(images, y)["class_acc"]))
    pictures.append(refined[shown])
    low, zero = band_mask(ctx.size, 0, 0.1), torch.zeros_like(x_T)
    keeps = [("refined low, rest zero", swap_band(zero, x_hat, low)),
             ("refined low, rest re-drawn", swap_band(fresh, x_hat, low)),
             ("x_T low, rest re-drawn", swap_band(fresh, x_T, low)),
             ("refined high, low zero", swap_band(x_hat, zero, low)),
             ("refined high, low re-drawn", swap_band(x_hat, fresh, low))]
    for name, x in keeps:
        images = sample_many(ctx.teacher, x, y, ctx.steps)
        rows.append((name, closeness(images, refined, gauss),
                     ctx.judge.score(images, y)["class_acc"]))
    acc = ctx.judge.score
    print(f"{len(y)} noises; closeness: 1 = the refined sample, 0 = as far as the Gaussian sample; "
          f"class acc of Gaussian {acc(gauss, y)['class_acc']:.3f}, "
          f"of refined {acc(refined, y)['class_acc']:.3f}")
    table(["noise", "closeness", "class acc"], rows, ["", ".3f", ".3f"])
    print("wrote", write_csv(ctx, "bandswap", ["noise", "closeness_to_refined", "class_acc"],
                             [(r[0], f"{r[1]:.4f}", f"{r[2]:.4f}") for r in rows]))
    print("wrote", grid(ctx, "bandswap", pictures),
          "(rows: the Gaussian sample; x_T with band 0-0.1, 0.1-0.2, ... 0.9-1.0 taken from "
          "x_hat_T; the refined sample. One column per class)")
    return {r[0]: {"closeness": r[1], "class_acc": r[2]} for r in rows}


# ----------------------------------------------------------------------------------------------
# 6-7. Interpolation, and the class the refiner was given vs the one the denoiser gets
# ----------------------------------------------------------------------------------------------


def slerp(a, b, alpha):
    """Spherical interpolation per sample:
    sin((1-alpha) theta)/sin theta a + sin(alpha theta)/sin theta b."""
    cos = (a * b).flatten(1).sum(1) / (a.flatten(1).norm(dim=1) * b.flatten(1).norm(dim=1))
    theta = torch.acos(cos.clamp(-1, 1)).view(-1, 1, 1, 1)
    return (torch.sin((1 - alpha) * theta) * a + torch.sin(alpha * theta) * b) / torch.sin(theta)


def analysis_slerp(ctx, points=8):
    pairs = min(ctx.n, 500) // 10 * 10 // 2
    x_a, y = bank(ctx, pairs)
    x_b, _ = bank(ctx, pairs, index=1)
    alphas = [i / (points - 1) for i in range(points)]
    path = torch.stack([slerp(x_a, x_b, a) for a in alphas], 1)  # (pairs, points, 3, H, W)
    flat, ys = path.flatten(0, 1), y.repeat_interleave(points)
    plain = sample_many(ctx.teacher, flat, ys, ctx.steps).view_as(path)
    refined = sample_many(ctx.teacher, refine(ctx, flat, ys), ys, ctx.steps).view_as(path)
    acc = {name: [ctx.judge.score(imgs[:, i], y)["class_acc"] for i in range(points)]
           for name, imgs in (("unrefined", plain), ("refined", refined))}
    print(f"class accuracy along the interpolation "
          f"({pairs} pairs of noises, same class within a pair):")
    rows = [(f"{a:.2f}", acc["unrefined"][i], acc["refined"][i]) for i, a in enumerate(alphas)]
    table(["alpha", "unrefined", "refined"], rows, ["", ".3f", ".3f"])
    step = {name: float((imgs[:, 1:] - imgs[:, :-1]).pow(2).mean()) for name, imgs in
            (("unrefined", plain), ("refined", refined))}
    print(f"mean squared change between neighbouring images: unrefined {step['unrefined']:.4f}, "
          f"refined {step['refined']:.4f}")
    print("wrote", write_csv(ctx, "slerp", ["alpha", "acc_unrefined", "acc_refined"],
                             [(r[0], f"{r[1]:.4f}", f"{r[2]:.4f}") for r in rows]))
    shown = balanced_first(y, ctx.K, 1)[:4]
    print("wrote", grid(ctx, "slerp", [r for i in shown for r in (plain[i], refined[i])]),
          "(pairs of rows: unrefined, refined; alpha from 0 to 1 left to right)")
    return {"acc_unrefined": acc["unrefined"], "acc_refined": acc["refined"]}


def analysis_mismatch(ctx):
    x_T, a = bank(ctx)
    b = (a + 1) % ctx.K
    null = torch.full_like(a, ctx.K)
    x_hat = refine(ctx, x_T, a)
    cases = [("refined a, denoise a", x_hat, a), ("refined a, denoise b", x_hat, b),
             ("refined a, denoise null", x_hat, null), ("Gaussian, denoise b", x_T, b),
             ("Gaussian, denoise null", x_T, null)]
    rows, images = [], {}
    for name, x, c in cases:
        images[name] = sample_many(ctx.teacher, x, c, ctx.steps)
        cls = ctx.judge.classify(images[name])
        rows.append((name, float((cls == a).float().mean()), float((cls == b).float().mean())))
    print(f"b = a + 1 (mod {ctx.K}); shares of {len(a)} samples the judge puts "
          "in class a and in class b:")
    table(["case", "share a", "share b"], rows, ["", ".3f", ".3f"])
    print("wrote", write_csv(ctx, "mismatch", ["case", "share_a", "share_b"],
                             [(r[0], *(f"{v:.4f}" for v in r[1:])) for r in rows]))
    idx = balanced_first(a, ctx.K, 1)
    print("wrote", grid(ctx, "mismatch", [torch.stack([images[n][i] for n, _, _ in cases])
                                          for i in idx]),
          "(one row per class a; columns: " + "; ".join(n for n, _, _ in cases) + ")")
    return {r[0]: {"share_a": r[1], "share_b": r[2]} for r in rows}


# ----------------------------------------------------------------------------------------------
# 8. Proposition 2's premise: d eps / d x_t close to c I; and the MSD gradient's direction
# ----------------------------------------------------------------------------------------------


def distance_from_cI(teacher, x_t, t, y):
    """(c, ||J - cI|| / ||J||) for J = d eps / d x_t at one image; c = tr(J) / d is the multiple of
    the identity nearest to J in Frobenius norm. Proposition 2 needs the distance to be small."""
    f = lambda x: teacher(x.view_as(x_t), timestep_batch(t, x_t), y).flatten()  # noqa: E731
    J = torch.autograd.functional.jacobian(f, x_t.flatten(),
                                           vectorize=True)  # (d, d), one batched backward
    c = torch.trace(J) / J.shape[0]
    return float(c), float((J - c * torch.eye(J.shape[0], device=J.device)).norm() / J.norm())


def msd_and_full_gradients(ctx, x_T, y, x0_guide, N):
    """d loss / d x_hat_T per sample, for L_MSD and for full backprop (L_Denoise), flattened."""
    grads = []
    y, x0_guide = on_device(ctx, y, x0_guide)
    for loss_fn in (msd_loss, full_loss):
        x_hat, = on_device(ctx, refine(ctx, x_T, y.cpu()))
        x_hat.requires_grad_()
        # the mean over samples, times B
        per_sample = loss_fn(ctx.teacher, x_hat, y, x0_guide, N) * len(y)
        grads.append(torch.autograd.grad(per_sample, x_hat)[0].flatten(1).cpu())
    return grads


def analysis_jacobian(ctx, samples=4, N=RefinerSettings().msd_steps):
    test = data.load_dataset(*ctx.dataset_args, "test")
    gen = noises.generator("analysis")
    images, labels = test.batch(torch.randint(len(test), (samples,), generator=gen))
    rows = []
    for t in (999, 799, 599, 399, 199, 99, 49, 9):
        per_image = []
        for x, c in zip(images.split(1), labels.split(1)):
            # noises drawn as before
            x_t = q_sample(x, torch.tensor([t]), torch.randn(x.shape, generator=gen))
            per_image.append(distance_from_cI(ctx.teacher, *on_device(ctx, x_t), t,
                                              *on_device(ctx, c)))
        rows.append((t, sum(c for c, _ in per_image) / samples,
                     sum(d for _, d in per_image) / samples))
    print(f"Jacobian of eps w.r.t. x_t ({3 * ctx.size * ctx.size} x {3 * ctx.size * ctx.size}, "
          f"{samples} real test images noised to t): c = tr(J)/d and ||J - cI|| / ||J||")
    table(["t", "c", "rel. dist"], rows, ["", ".3f", ".3f"])
    write_csv(ctx, "jacobian", ["t", "c", "rel_dist_from_cI"],
              [(r[0], f"{r[1]:.5f}", f"{r[2]:.5f}") for r in rows])

    x_T, y = bank(ctx, 64)
    g_m, g_f = msd_and_full_gradients(ctx, x_T, y,
                                      sample_many(ctx.teacher, x_T, y, ctx.steps, DISPLAY_W), N)
    cos = (g_m * g_f).sum(1) / (g_m.norm(dim=1) * g_f.norm(dim=1))
    # Proposition 2's k, if g_full were a multiple of g_msd
    k = (g_m * g_f).sum(1) / g_m.pow(2).sum(1)
    print(f"MSD vs full-backprop gradient w.r.t. x_hat_T (N = {N}, 64 refined noises, "
          f"CFG targets): cosine mean {cos.mean():.3f} (min {cos.min():.3f}); "
          f"k = <g_full, g_msd> / |g_msd|^2 mean {k.mean():.3f} (Proposition 2: k in (0, 1))")
    print("wrote", os.path.join(ctx.out, "jacobian.csv"))
    return {"rows": rows, "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "k_mean": float(k.mean())}


# ----------------------------------------------------------------------------------------------
# 9. Guidance-free noise by DDIM inversion (§3.1), against the refiner's
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def analysis_inversion(ctx, inversion_steps=(20, 100)):
    """Invert CFG samples with unguided DDIM at the sampling step count and at a finer one (the
    inversion's eps-at-the-previous-point approximation shrinks with the step size), then sample
    unguided back."""
    x_T, y = bank(ctx, min(ctx.n, 500))
    x_cfg = sample_many(ctx.teacher, x_T, y, ctx.steps, DISPLAY_W)
    x_hat = refine(ctx, x_T, y)
    score = ctx.judge.score
    d_ref = (x_hat - x_T).flatten(1)
    rows = [("Gaussian x_T", ctx.steps,
             score(sample_many(ctx.teacher, x_T, y, ctx.steps), y)["class_acc"],
             float("nan"), 0.0, float("nan"), float("nan")),
            ("refined x_hat_T", ctx.steps,
             score(sample_many(ctx.teacher, x_hat, y, ctx.steps), y)["class_acc"],
             float("nan"), float(d_ref.abs().mean()), band_energy((x_hat - x_T))[0], 1.0)]
    for steps in inversion_steps:
        x_inv = torch.cat([ddim_invert(ctx.teacher, *on_device(ctx, x_cfg[i:i + 250], y[i:i + 250]),
                                       steps).cpu()
                           for i in range(0, len(y), 250)])
        recon = sample_many(ctx.teacher, x_inv, y, steps)
        d_inv = (x_inv - x_T).flatten(1)
        cos = float(((d_inv * d_ref).sum(1) / (d_inv.norm(dim=1) * d_ref.norm(dim=1))).mean())
        rows.append(("inverted CFG sample", steps, score(recon, y)["class_acc"],
                     10 * math.log10(4 / float((recon - x_cfg).pow(2).mean())),
                     float(d_inv.abs().mean()), band_energy(x_inv - x_T)[0], cos))
    print(f"{len(y)} CFG samples (w = {DISPLAY_W:g}, {ctx.steps} steps) inverted by unguided "
          "DDIM, then sampled unguided from the inverted noise x_T^guide; d = noise - x_T")
    table(["noise", "steps", "acc unguided", "recon PSNR dB", "mean |d|", "low-band share",
           "cos(d, d_ref)"], rows, ["", "", ".3f", ".1f", ".4f", ".3f", ".3f"])
    print(f"CFG itself: class acc {score(x_cfg, y)['class_acc']:.3f}; two independent noises: "
          "mean |d| 1.13, low-band share 0.020")
    write_csv(ctx, "inversion", ["noise", "steps", "class_acc_unguided", "recon_psnr_db",
                                 "mean_abs_diff", "low_band_share", "cosine_with_refined_diff"],
              [(r[0], r[1], *(f"{v:.4f}" for v in r[2:])) for r in rows])
    idx = balanced_first(y, ctx.K, 1)
    print("wrote", grid(ctx, "inversion", [x_cfg[idx], recon[idx], show_diff(x_inv[idx] - x_T[idx]),
                                           show_diff(x_hat[idx] - x_T[idx])]),
          f"(rows: CFG samples; their unguided reconstructions from the "
          f"{inversion_steps[-1]}-step inverted noise; inverted - x_T; refined - x_T. "
          "One column per class)")
    return {"rows": rows}


# ----------------------------------------------------------------------------------------------
# 10. Samplers and step counts other than the one the refiner was trained with
# ----------------------------------------------------------------------------------------------


def analysis_samplers(ctx):
    x_T, y = bank(ctx, min(ctx.n, 200))
    x_hat = refine(ctx, x_T, y)
    rows = []
    for sampler in SAMPLERS:
        for steps in (10, 20, 50):
            measured = {name: ctx.judge.measure(sample_many(ctx.teacher, x, y, steps, w,
                                                            sampler=sampler), y)
                        for name, x, w in (("Gaussian", x_T, 0.0),
                                           ("Gaussian + CFG", x_T, DISPLAY_W),
                                           ("refined", x_hat, 0.0))}
            scores = {name: ctx.judge.point_scores(m) for name, m in measured.items()}
            acc = ctx.judge.difference(measured["refined"], measured["Gaussian + CFG"])["class_acc"]
            rows.append((sampler, steps,
                         *(f"{scores[n]['class_acc']:.3f} / {scores[n]['fd_cls']:.2f}"
                           for n in scores),
                         f"{acc[0]:+.3f} [{acc[1]:+.3f}, {acc[2]:+.3f}]"))
    print(f"{len(y)} held-out noises, class accuracy / FD_cls (FD_cls on so few samples is biased "
          f"upward: compare within the table); CFG at w = {DISPLAY_W:g}; the last column with its "
          "95% paired interval")
    table(["sampler", "steps", "Gaussian", "Gaussian + CFG", "refined", "refined - CFG acc"], rows,
          [""] * 6)
    print("wrote", write_csv(ctx, "samplers", ["sampler", "steps", "gaussian", "cfg", "refined",
                                               "refined_minus_cfg_acc"], rows))
    return rows


# ----------------------------------------------------------------------------------------------
# 11. The judge against the filter: how much would the network that chose the pairs flatter
#     the result?
# ----------------------------------------------------------------------------------------------


def analysis_judges(ctx):
    """Score the same samples twice: by the judge (every table's grader) and by the filter (the
    network that chose the training pairs, so the refiner was trained toward images it likes)."""
    x_T, y = bank(ctx)
    graders = {"judge": ctx.judge,
               "filter": Judge(*load_or_train(FILTER, *ctx.dataset_args, ctx.judge.trained.device))}
    regimes = {"unguided": (x_T, 0.0), f"cfg w={DISPLAY_W:g}": (x_T, DISPLAY_W),
               "refined": (refine(ctx, x_T, y), 0.0)}
    rows = []
    for name, (x, w) in regimes.items():
        images = sample_many(ctx.teacher, x, y, ctx.steps, w)
        scores = {g: grader.score(images, y) for g, grader in graders.items()}
        rows.append((name, *(scores[g][k] for k in ("class_acc", "fd_cls") for g in graders)))
    print(f"{len(y)} dev-bank noises, each regime's samples scored by both networks "
          "(FD_cls in each one's own feature space, so compare within a column)")
    table(["regime", "acc judge", "acc filter", "FD_cls judge", "FD_cls filter"], rows,
          ["", ".3f", ".3f", ".2f", ".2f"])
    print("wrote", write_csv(ctx, "judges",
                             ["regime", "acc_judge", "acc_filter", "fd_judge", "fd_filter"],
                             [(r[0], *(f"{v:.4f}" for v in r[1:])) for r in rows]))
    return {r[0]: dict(zip(("acc_judge", "acc_filter", "fd_judge", "fd_filter"), r[1:]))
            for r in rows}


# ----------------------------------------------------------------------------------------------
# 12. Other guidances (beyond the paper): the dev-bank sweep behind GUIDANCES and INTERVAL
# ----------------------------------------------------------------------------------------------


def guidance_sweep(ctx):
    """(name, setting, Guidance, PAG scale, scales) of every guidance tried: CFG and CFG + PAG at
    the pairs' scales; autoguidance with the teacher's kept weak checkpoint and one of half its
    steps; the guidance interval at INTERVAL (wider scales: it guides fewer steps) and at two other
    intervals."""
    weak_step = (load_checkpoint(ctx.teacher_path, "teacher")["args"].get("weak_step")
                 or TeacherSettings.weak_step)
    pag = GUIDANCES["cfg+pag"]["pag"]
    sweep = [("cfg", "", CFG, 0.0, (2.0, 3.0, 4.0)),
             ("cfg+pag", f"pag {pag:g}", CFG, pag, (2.0, 3.0, 4.0))]
    device = str(ctx.teacher.output_layer().weight.device)
    for step in (max(1, weak_step // 2), weak_step):
        rebuild_weak(ctx.teacher_path, step, device)  # a step the training did not keep: re-run
        weak = get_weak(ctx.teacher_path, device, step)[0]
        sweep.append(("autoguidance", f"weak: step {step}", Guidance("autoguidance", weak=weak),
                      0.0, (1.0, 2.0, 3.0, 4.0)))
    for lo, hi in (INTERVAL, (1.0, 12.0), (0.3, 12.0)):
        scales = (2.0, 3.0, 4.0, 6.0) if (lo, hi) == INTERVAL else (3.0,)
        sweep.append(("interval", f"sigma in ({lo:g}, {hi:g}]",
                      Guidance("interval", interval=(lo, hi)), 0.0, scales))
    return sweep


def analysis_guidance(ctx):
    """Gaussian noise under each guidance and scale on the dev bank, scored by the judge: the
    numbers that chose each guidance's pair scales and the interval (docs/guidance.md says how)."""
    x_T, y = bank(ctx)
    rows = []
    for name, setting, guidance, pag, scales in guidance_sweep(ctx):
        for w in scales:
            row, _, _ = run_regime(ctx.teacher, ctx.judge, x_T, y, name, w, ctx.steps,
                                   guidance=guidance, pag=pag, intervals=False)
            rows.append((name, setting, w, row["class_acc"], row["fd_cls"], row["precision"],
                         row["recall"], row["nfe_per_image"]))
    print(f"{len(y)} dev-bank noises, Gaussian noise under each guidance, {ctx.steps} DDIM steps; "
          f"unguided for comparison: python analyze.py judges")
    header = ["guidance", "setting", "w", "class acc", "FD_cls", "precision", "recall",
              "forwards / image"]
    table(header, rows, ["", "", "g", ".3f", ".2f", ".3f", ".3f", ".0f"])
    print("wrote", write_csv(ctx, "guidance",
                             [h.replace(" / ", "_per_").replace(" ", "_") for h in header], rows))
    return rows


# ----------------------------------------------------------------------------------------------
# 13. The cost-quality frontier (beyond the paper's tables): which sampling is best for the
#     forwards paid
# ----------------------------------------------------------------------------------------------

FRONTIER_W = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0)
FRONTIER_STEPS = (5, 10, 20, 50)


def other_ways(ctx):
    """The other ways to spend about N to 2N forwards at ctx.steps, each at its own table's scale:
    refined noise with a little CFG on top (2N + 1), autoguidance with the teacher's kept weak
    checkpoint (2N: the weak model's forward replaces the unconditional one), and CFG only on the
    guidance interval (fewer than 2N). Guidance distillation and NPNet need a training run each:
    ablate.py's distill and npnet rows."""
    weak = get_weak(ctx.teacher_path, str(next(ctx.teacher.parameters()).device))[0]
    auto_w = sum(GUIDANCES["autoguidance"]["w_range"]) / 2
    return {"refined + cfg w=0.5": dict(refiner=ctx.refiner, w=0.5),
            f"autoguidance w={auto_w:g}": dict(w=auto_w, guidance=Guidance("autoguidance",
                                                                            weak=weak)),
            f"interval w={DISPLAY_W:g}": dict(w=DISPLAY_W, guidance=Guidance("interval",
                                                                             interval=INTERVAL))}


def frontier_points(ctx, x_T, y):
    """The frontier's points, each tagged with its series: "cfg" (w = DISPLAY_W at each step
    count), "refined", "cfg over w" (the sweep at ctx.steps), "unguided", and one per other way."""
    # first: a teacher without its weak checkpoint stops here, before any sampling
    others, points = other_ways(ctx), []
    for steps in sorted(set(FRONTIER_STEPS) | {ctx.steps}):
        regimes = {f"cfg w={w:g}": dict(w=w)
                   for w in (FRONTIER_W if steps == ctx.steps else (DISPLAY_W,))}
        extra = others if steps == ctx.steps else {}
        rows, _, _, _ = run_regimes(ctx.teacher, ctx.judge, x_T, y,
                                    {**regimes, "refined": dict(refiner=ctx.refiner), **extra},
                                    steps)
        for name, row in rows.items():
            if name == "refined" or name in extra:
                points.append(frontier_point(name, row))
                continue
            points.append(frontier_point("cfg" if row["w"] == DISPLAY_W else "cfg over w", row))
            if steps == ctx.steps and row["w"] in (0.0, DISPLAY_W):
                points.append(frontier_point("cfg over w" if row["w"] else "unguided", row))
    return points


def frontier_point(series, row):
    keys = ("steps", "w", "class_acc", "fd_cls", "precision", "recall", "nfe_per_image",
            "sec_per_image")
    return {"series": series, **{k: row[k] for k in keys},
            "ci": {k: row["ci"][k] for k in ("class_acc", "fd_cls")}}


def analysis_frontier(ctx):
    """A final table, so on the *test* bank (nothing is chosen from it), every point judged with its
    95% interval: Gaussian noise with CFG over FRONTIER_W at ctx.steps (the guidance trade-off);
    CFG at w = DISPLAY_W against refined noise at FRONTIER_STEPS DDIM steps (the budget axis:
    refined at N steps pays N + 1 forwards, CFG 2N); and the other ways at ctx.steps
    (other_ways). Forwards are counted by hooks; time per image from interleaved rounds. Writes
    frontier.json, frontier.csv and frontier.png (docs/frontier.png: --out docs)."""
    x_T, y = noises.bank("test", ctx.n, ctx.K, (3, ctx.size, ctx.size))
    points = frontier_points(ctx, x_T, y)
    header = ["series", "steps", "w", "forwards / image", "ms / image", "class acc [95% CI]",
              "FD_cls [95% CI]", "precision", "recall"]
    cells = [[p["series"], p["steps"], f"{p['w']:g}", f"{p['nfe_per_image']:g}",
              f"{1000 * p['sec_per_image']:.2f}",
              f"{p['class_acc']:.3f} [{p['ci']['class_acc'][0]:.3f}, "
              f"{p['ci']['class_acc'][1]:.3f}]",
              f"{p['fd_cls']:.2f} [{p['ci']['fd_cls'][0]:.2f}, {p['ci']['fd_cls'][1]:.2f}]",
              f"{p['precision']:.3f}", f"{p['recall']:.3f}"]
             for p in points if p["series"] != "cfg over w" or p["w"] != DISPLAY_W]
    print(f"{len(y)} test-bank noises; CFG at w = {DISPLAY_W:g} on the budget axis; the w sweep at "
          f"{ctx.steps} steps")
    print_table(header, cells)
    save_json({"points": points, "n": len(y), "bank": "test",
               "teacher": data.portable_dir(ctx.teacher_path)},
              os.path.join(ctx.out, "frontier.json"))
    print("wrote", write_csv(ctx, "frontier", header, cells), "and frontier.json")
    print("wrote", draw_frontier(points, ctx.steps, os.path.join(ctx.out, "frontier.png")))
    return points


def draw_frontier(points, steps, path):
    """Four panels: FD_cls and class accuracy against forwards per image (log axis), CFG and refined
    noise over the step counts, unguided and the other ways as single points; accuracy against
    FD_cls and precision against recall over CFG's w, refined beside."""
    # [(x, y, y_lo, y_hi, tag)], the interval where there is one
    def marks(series, x, y, tag, at=None):
        return [(p[x], p[y], *p["ci"].get(y, (p[y], p[y])), tag(p)) for p in points
                if p["series"] == series and at in (None, p["steps"])]
    curves = {"cfg": f"Gaussian + CFG w={DISPLAY_W:g}", "refined": "refined, unguided"}
    # the single points at `steps`: no guidance, and the other ways (other_ways)
    single = sorted({p["series"] for p in points} - {*curves, "cfg over w"})
    budget = {**curves, **{k: "Gaussian, unguided" if k == "unguided" else k for k in single}}
    panels = [dict(title=f"{label} against cost; labels: DDIM steps", xlabel="forwards per image",
                   ylabel=label.split(" (")[0], logx=True, legend=corner,
                   series=[(name, marks(k, "nfe_per_image", y,
                                        lambda p: f"{p['steps']}" if p["series"] in curves else ""),
                            k in curves)
                           for k, name in budget.items()])
              for y, label, corner in (("fd_cls", "FD_cls (lower is better)", "top right"),
                                       ("class_acc", "class accuracy", "bottom right"))]
    panels += [dict(title=f"{y} against {x} at {steps} steps; labels: CFG's w",
                    xlabel=x.replace("fd_", "FD_"), ylabel=y,
                    series=[("Gaussian + CFG over w",
                             marks("cfg over w", x, y, lambda p: f"{p['w']:g}", steps), True),
                            ("refined, unguided",
                             marks("refined", x, y, lambda p: "", steps), False)])
               for x, y in (("fd_cls", "class_acc"), ("recall", "precision"))]
    plot.save_panels(panels, path)
    return path


ANALYSES = {"diff": analysis_diff, "spectrum": analysis_spectrum, "layout": analysis_layout,
            "trajectory": analysis_trajectory, "bandswap": analysis_bandswap,
            "slerp": analysis_slerp, "mismatch": analysis_mismatch, "jacobian": analysis_jacobian,
            "inversion": analysis_inversion, "samplers": analysis_samplers,
            "judges": analysis_judges, "guidance": analysis_guidance, "frontier": analysis_frontier}


def build_parser():
    p = cli.Parser(__doc__)
    p.add_argument("name", choices=[*ANALYSES, "all"])
    p.add_argument("--teacher", type=cli.checkpoint_file, default=None,
                   help="teacher checkpoint (default: the one --refiner was trained on)")
    p.add_argument("--refiner", type=cli.checkpoint_file, default="runs/refiner/ckpt.pt",
                   help="refiner checkpoint")
    p.add_argument("--n", type=cli.integer(20, 10 ** 6), default=1000,
                   help="held-out noises (some analyses use fewer, see each)")
    p.add_argument("--steps", type=cli.STEPS_1000, default=STEPS, help="DDIM steps")
    p.add_argument("--out", type=cli.folder, default="runs/analysis", help="output folder")
    p.add_argument("--seed", type=cli.SEED, default=0,
                   help="seeds torch; the noise bank itself is fixed")
    p.add_argument("--device", type=cli.device, default="auto", help="auto, cpu, cuda, cuda:1, ...")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


@entry_point
def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    args.teacher = args.teacher or teacher_of(args.refiner)
    teacher, ckpt = load_teacher(args.teacher, device)
    refiner = load_refiner(args.refiner, teacher, device)
    ds = ckpt["data"]
    judge = load_judge(ds["dataset"], ds["data_dir"], ds["image_size"], device)
    os.makedirs(args.out, exist_ok=True)
    print(judge_line(judge))
    ctx = Context(teacher, refiner, judge, len(ds["classes"]), ds["image_size"], args.out, args.n,
                  args.steps, (ds["dataset"], ds["data_dir"], ds["image_size"]), args.teacher)
    results = {}
    # frontier: test bank
    for name in ([n for n in ANALYSES if n != "frontier"] if args.name == "all" else [args.name]):
        start = time.perf_counter()
        print(f"\n== {name}")
        results[name] = ANALYSES[name](ctx)
        print(f"({time.perf_counter() - start:.0f} s)")
    return results


if __name__ == "__main__":
    main()
