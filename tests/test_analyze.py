"""analyze.py and ablate.py: the helpers against closed forms, and every analysis and ablation row
end to end on a tiny teacher (the numbers of the README come from the same code at full size)."""
import json
import math
import os

import pytest
import torch

import ablate
import analyze
import diffusion
import train_refiner
from test_pipeline import tiny_teacher


def test_band_energy_of_white_noise_follows_the_bands_area_and_a_smooth_image_sits_low():
    noise = torch.randn(400, 3, 16, 16)
    area = [float(analyze.band_mask(16, b / 10, (b + 1) / 10).float().mean()) for b in range(10)]
    assert sum(area) == pytest.approx(1.0)  # the bands tile the spectrum
    assert analyze.band_energy(noise) == pytest.approx(area, abs=0.01)
    smooth = torch.nn.functional.avg_pool2d(noise, 5, 1, 2)  # a low-pass filter
    assert analyze.band_energy(smooth)[0] > 5 * area[0]


def test_swap_band_and_slerp():
    a, b = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    everything, nothing = analyze.band_mask(8, 0, 1.0), torch.zeros(8, 8, dtype=torch.bool)
    assert everything.all()
    assert torch.allclose(analyze.swap_band(a, b, everything), b, atol=1e-5)
    assert torch.allclose(analyze.swap_band(a, b, nothing), a, atol=1e-5)
    assert torch.allclose(analyze.slerp(a, b, 0.0), a, atol=1e-5)
    assert torch.allclose(analyze.slerp(a, b, 1.0), b, atol=1e-5)
    u, v = torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8)
    u[0, 0, 0, 0], v[0, 0, 0, 1] = 1.0, 1.0  # orthogonal unit vectors: the midpoint has norm 1
    assert analyze.slerp(u, v, 0.5).norm().item() == pytest.approx(1.0)
    assert analyze.slerp(u, v, 0.5)[0, 0, 0, :2].tolist() == pytest.approx([math.sqrt(0.5)] * 2)


def test_gaussian_prior_starts_as_the_identity():
    prior = ablate.GaussianPrior(num_classes=3, size=8)
    x_T = torch.randn(5, 3, 8, 8)
    assert torch.equal(prior(x_T, torch.tensor([0, 1, 2, 0, 1])), x_T)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, device):
    """A 4-step teacher and a 4-step refiner on a tiny image folder (the refiner on --device)."""
    root = tmp_path_factory.mktemp("analyze")
    mp = pytest.MonkeyPatch()
    train_refiner.main(["--teacher", tiny_teacher(root, mp), "--pairs", "40", "--guide-steps", "2",
                        "--msd-steps", "2", "--steps", "4", "--val-every", "2", "--batch-size", "4",
                        "--filter", "0", "--val-frac", "0.2", "--eval-n", "8", "--eval-steps", "2",
                        "--out", str(root / "r"), "--device", device])
    yield root
    mp.undo()


@pytest.mark.device
def test_every_analysis_runs_and_writes_its_files(tiny_run, device):
    out = tiny_run / "analysis"
    results = analyze.main(["all", "--teacher", str(tiny_run / "t" / "ckpt.pt"), "--refiner",
                            str(tiny_run / "r" / "ckpt.pt"), "--n", "20", "--steps", "2", "--out",
                            str(out), "--device", device])
    # all: the dev bank only
    assert list(results) == [name for name in analyze.ANALYSES if name != "frontier"]
    for name in ("layout", "trajectory", "bandswap", "slerp", "mismatch", "inversion"):
        assert os.path.isfile(out / f"{name}.png"), name
    for name in results:
        if name != "layout":
            assert os.path.isfile(out / f"{name}.csv"), name
    # E|N(0, 2)|
    assert results["diff"]["mean_independent"] == pytest.approx(2 / math.sqrt(math.pi), rel=0.1)
    assert 0 <= results["spectrum"]["low_share_refined"] <= 1
    assert len(results["jacobian"]["rows"]) == 8 and -1 <= results["jacobian"]["cosine_mean"] <= 1
    assert len(results["samplers"]) == 3 * 3  # samplers x step counts, three regimes in each row
    assert (len(results["guidance"]) == 20 and {r[0] for r in results["guidance"]}
            == {"cfg", "cfg+pag", "autoguidance", "interval"})
    assert len(results["judges"]) == 3 and all(0 <= v["acc_filter"] <= 1
                                               for v in results["judges"].values())


def test_the_frontier_counts_n_plus_1_forwards_for_refined_noise_and_2n_for_cfg(tiny_run):
    out = tiny_run / "frontier"
    analyze.main(["frontier", "--refiner", str(tiny_run / "r" / "ckpt.pt"), "--n", "20", "--steps",
                  "2", "--out", str(out), "--device", "cpu"])
    points = json.load(open(out / "frontier.json"))["points"]
    steps = sorted({2, *analyze.FRONTIER_STEPS})
    for series, forwards in (("refined", lambda n: n + 1), ("cfg", lambda n: 2 * n)):
        mine = [p for p in points if p["series"] == series]
        assert ([p["steps"] for p in mine] == steps
                and all(p["nfe_per_image"] == forwards(p["steps"]) for p in mine))
    assert (sorted(p["w"] for p in points if p["series"] == "cfg over w")
            == sorted(analyze.FRONTIER_W))
    # the other ways, once each at --steps 2, at their own forwards: 2N + 1, 2N, at most 2N
    others = {p["series"]: p for p in points if p["series"] not in
              ("refined", "cfg", "cfg over w", "unguided")}
    assert {name.split(" w=")[0] for name in others} == {"refined + cfg", "autoguidance",
                                                          "interval"}
    assert all(p["steps"] == 2 for p in others.values())
    forwards = {name.split(" w=")[0]: p["nfe_per_image"] for name, p in others.items()}
    assert forwards["refined + cfg"] == 5 and forwards["autoguidance"] == 4
    assert 2 <= forwards["interval"] <= 4
    assert all(p["ci"]["class_acc"][0] <= p["class_acc"] <= p["ci"]["class_acc"][1] for p in points)
    assert os.path.isfile(out / "frontier.png") and os.path.isfile(out / "frontier.csv")


@pytest.mark.device
def test_every_ablation_row_runs(tiny_run, device):
    out = tiny_run / "ablate"
    argv = ["--teacher", str(tiny_run / "t" / "ckpt.pt"), "--pairs", "40", "--steps", "2",
            "--batch-size", "4", "--filter", "0", "--eval-n", "10", "--seeds", "0", "1", "--out",
            str(out), "--device", device]
    ablate.main(argv)
    report = json.load(open(out / "ablate.json"))
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ablate.ROWS
    assert all(r["seeds"] == (1 if name in ablate.UNTRAINED else 2) for name, r in rows.items())
    assert all(r["class_acc_ci"][0] <= r["class_acc"] <= r["class_acc_ci"][1]
               for r in rows.values())
    assert set(report["comparisons"]) == {f"{a} - {b}" for a, b in ablate.COMPARISONS
                                          if a in rows and b in rows}
    nfe = {name: r["nfe_per_image"] for name, r in rows.items()}
    assert (nfe["gaussian"] == 20 and nfe["cfg"] == 40 and nfe["distill"] == 20
            and nfe["noiserefine"] == 21)
    assert nfe["refined_cfg"] == 41  # one refinement, then 20 guided steps
    assert nfe["inverted"] == 21
    assert nfe["golden"] == 23  # a guided step (2) and an inversion step (1), then 20 unguided
    assert nfe["npnet"] == 21 and report["npnet_pairs"]["forwards_per_pair"] == 43
    assert 0 < report["npnet_pairs"]["kept"] <= report["npnet_pairs"]["of"] == 40
    assert all(r["train_seconds"] > 0 for name, r in rows.items() if name in ablate.TRAINED)
    # a second run reuses every row and seed; the cache is keyed by the teacher's weights, not its
    # path
    mtime = os.path.getmtime(out / "n5" / "seed1" / "measured.pt")
    ablate.main(argv)
    assert os.path.getmtime(out / "n5" / "seed1" / "measured.pt") == mtime
    settings = [ablate.settings("n5", 1, ablate.parse_args(argv), {"fingerprints": {"teacher": fp}})
                for fp in ("a", "b")]
    assert settings[0] != settings[1]


@pytest.mark.device
def test_the_guidance_table_runs_every_guidance_from_gaussian_and_refined_noise(tiny_run, device):
    out = tiny_run / "ablate"
    ablate.main(["--table", "guidance", "--teacher", str(tiny_run / "t" / "ckpt.pt"), "--pairs",
                 "40", "--steps", "2", "--batch-size", "4", "--filter", "0", "--eval-n", "10",
                 "--seeds", "0", "--out", str(out), "--device", device])
    report = json.load(open(out / "guidance.json"))
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ablate.TABLES["guidance"]
    nfe = {name: r["nfe_per_image"] for name, r in rows.items()}
    inside = sum(diffusion.INTERVAL[0] < diffusion.sigma(t) <= diffusion.INTERVAL[1]
                 for t in diffusion.ddim_timesteps(20))
    # counted by hooks: CFG 2 per step, CFG + PAG 3, autoguidance 2 (teacher and weak model),
    # interval 2 inside
    assert nfe == {"gaussian": 20, "cfg": 40, "noiserefine": 21, "pag": 60, "nr_pag": 21,
                   "auto": 40, "nr_auto": 21, "interval": 20 + inside, "nr_interval": 21}
    assert ({"nr_pag - pag", "nr_auto - auto", "nr_interval - interval"}
            <= set(report["comparisons"]))
    # the weak model: the teacher's own step 2
    assert os.path.isfile(tiny_run / "t" / "ckpt_000002.pt")


def test_redenoise_adds_the_guided_step_to_the_noise():
    """With eps independent of x, re-denoise sampling (one guided DDIM step, one unguided inversion
    step) returns x_T + (b_t / a_t) w (eps_c - eps_u) exactly."""
    class Flat(torch.nn.Module):  # eps_c = 1 + y, eps_u = 0, whatever x and t
        num_classes = 3

        def forward(self, x, t, y, identity_attn=False):
            return torch.ones_like(x) * torch.where(y == 3, 0, 1 + y).float().view(-1, 1, 1, 1)

    x_T, y, w = (torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.tensor([0, 2]),
                 torch.tensor([2.0, 3.0]))
    a_t, b_t = diffusion.ddim_coeffs(999, 949)
    expected = x_T + (b_t / a_t) * (w * torch.tensor([1.0, 3.0])).view(-1, 1, 1, 1)
    assert torch.allclose(ablate.redenoise(Flat(), x_T, y, w.double()), expected, atol=1e-10)
