"""The evaluator's scores: the Frechet distance against its closed form, IS_cls bounds."""
import math

import torch

from evaluate import frechet_distance, gaussian_stats, inception_score, noise_bank


def test_fd_of_a_set_against_itself_is_zero():
    feats = torch.randn(500, 16)
    assert abs(frechet_distance(*gaussian_stats(feats), *gaussian_stats(feats))) < 1e-6


def test_fd_matches_the_closed_form_for_two_gaussians():
    # diagonal covariances: FD = |mu1 - mu2|^2 + sum (s1 - s2)^2 over standard deviations
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    s1, s2 = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, 1.0, 0.5])
    fd = frechet_distance(mu1, torch.diag(s1 ** 2), mu2, torch.diag(s2 ** 2))
    assert math.isclose(fd, 5.0 + 4.0 + 1.0, rel_tol=1e-9)
    # a full covariance, rotated: FD is rotation invariant
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    fd_rot = frechet_distance(q @ mu1.double(), q @ torch.diag(s1 ** 2).double() @ q.T,
                              q @ mu2.double(), q @ torch.diag(s2 ** 2).double() @ q.T)
    assert math.isclose(fd_rot, 10.0, rel_tol=1e-6)


def test_inception_score_bounds():
    K = 5
    assert math.isclose(inception_score(torch.eye(K)), K, rel_tol=1e-6)             # confident, diverse
    assert math.isclose(inception_score(torch.full((10, K), 1 / K)), 1.0, rel_tol=1e-6)  # no information


def test_noise_bank_is_fixed_and_balanced():
    a, ya = noise_bank(100, 10, (3, 4, 4))
    b, yb = noise_bank(100, 10, (3, 4, 4))
    assert torch.equal(a, b) and torch.equal(ya, yb)
    assert torch.equal(torch.bincount(ya), torch.full((10,), 10))
