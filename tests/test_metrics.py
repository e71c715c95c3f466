import math

import pytest
import torch

from dalle2.evaluation.metrics import (
    fid_kid,
    fid_kid_from_features,
    frechet_distance,
    inception_features,
    kernel_distance,
    mean_pairwise_distance,
    memorisation,
    spread,
)


def _exact_gaussian_sample(n, mu, std, seed):
    """(n, D) samples whose empirical mean is exactly mu and empirical (unbiased) covariance diag(std^2)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, mu.numel(), generator=g, dtype=torch.float64)
    z = z - z.mean(0)
    cov = z.T @ z / (n - 1)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(cov)).T  # whitened: empirical covariance = I
    return z * std + mu


def test_frechet_identical_is_zero():
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(0)) * 3 + 1
    fd = frechet_distance(x, x.clone())
    scale = torch.cov(x.double().T).trace().item()
    assert fd < 1e-6 * scale


def test_frechet_grows_with_shift():
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randn(300, 8, generator=torch.Generator().manual_seed(2))
    dists = [frechet_distance(x, y + s) for s in (0.0, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(dists, dists[1:]))
    # A pure shift of one set adds exactly ||shift||^2 (covariances unchanged).
    assert frechet_distance(x, x + 2.0) == pytest.approx(8 * 4.0, rel=1e-9)


def test_frechet_matches_closed_form_for_diagonal_gaussians():
    d = 6
    mu_a, mu_b = torch.linspace(-1, 1, d).double(), torch.zeros(d).double()
    std_a, std_b = torch.linspace(0.5, 2, d).double(), torch.linspace(3, 1, d).double()
    a = _exact_gaussian_sample(500, mu_a, std_a, seed=3)
    b = _exact_gaussian_sample(400, mu_b, std_b, seed=4)
    # Diagonal covariances commute: Tr(Sa + Sb - 2 (Sa Sb)^1/2) = sum (sa - sb)^2.
    expected = ((mu_a - mu_b) ** 2).sum() + ((std_a - std_b) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected.item(), rel=1e-8)


def test_frechet_symmetric_with_correlated_covariances():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(100, 10, generator=g) @ torch.randn(10, 10, generator=g)
    b = torch.randn(80, 10, generator=g) @ torch.randn(10, 10, generator=g) + 0.3
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-8)
    # Rank-deficient covariances (N < D) stay finite and non-negative.
    fd = frechet_distance(a[:5], b[:7])
    assert math.isfinite(fd) and fd >= 0


def test_kid_identical_zero_same_distribution_small_different_positive():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(300, 16, generator=g)
    mean, std = kernel_distance(x, x.clone(), subsets=5, subset_size=1000)  # subset = whole set
    # Identical sets: the unbiased estimate is 2 (mean off-diagonal k - mean diagonal k) / m.
    k = (x.double() @ x.double().T / 16 + 1) ** 3
    m = 300
    expected = 2 * ((k.sum() - k.trace()) / (m * (m - 1)) - k.trace() / m) / m
    assert mean == pytest.approx(expected.item(), rel=1e-9) and std < 1e-9
    y = torch.randn(300, 16, generator=g)
    same_mean, same_std = kernel_distance(x, y, subsets=20, subset_size=100)
    diff_mean, diff_std = kernel_distance(x, y + 1.0, subsets=20, subset_size=100)
    assert abs(mean) < 0.05 * diff_mean and abs(same_mean) < 0.05 * diff_mean
    assert diff_mean > 5 * diff_std > 0
    # Deterministic under the seed, different subsets with another seed.
    assert kernel_distance(x, y, subsets=3, subset_size=50, seed=1) == \
        kernel_distance(x, y, subsets=3, subset_size=50, seed=1)
    assert kernel_distance(x, y, subsets=3, subset_size=50, seed=1) != \
        kernel_distance(x, y, subsets=3, subset_size=50, seed=2)


def test_kid_small_sets():
    g = torch.Generator().manual_seed(7)
    mean, std = kernel_distance(torch.randn(5, 4, generator=g), torch.randn(3, 4, generator=g) + 2,
                                subsets=4, subset_size=1000)
    assert math.isfinite(mean) and math.isfinite(std) and mean > 0
    with pytest.raises(ValueError):
        kernel_distance(torch.randn(1, 4), torch.randn(3, 4))


def test_mean_pairwise_distance():
    row = torch.randn(1, 32)
    assert mean_pairwise_distance(row.repeat(5, 1)) == pytest.approx(0.0, abs=1e-9)
    # Scaling a row does not change cosine distance.
    assert mean_pairwise_distance(torch.cat([row, 3 * row])) == pytest.approx(0.0, abs=1e-9)
    assert mean_pairwise_distance(torch.eye(7) * 2.5) == pytest.approx(1.0, abs=1e-9)
    assert mean_pairwise_distance(torch.stack([row[0], -row[0]])) == pytest.approx(2.0, abs=1e-9)
    # Matches the explicit pairwise mean.
    f = torch.randn(9, 5, generator=torch.Generator().manual_seed(8)).double()
    fn = torch.nn.functional.normalize(f, dim=-1)
    i, j = torch.triu_indices(9, 9, offset=1)
    expected = (1 - (fn[i] * fn[j]).sum(-1)).mean().item()
    assert mean_pairwise_distance(f) == pytest.approx(expected, rel=1e-10)


def test_spread():
    assert spread(torch.ones(6, 3)) == 0.0
    v = torch.tensor([[0.0, 10.0], [2.0, 10.0]])  # column stds: sqrt(2), 0
    assert spread(v) == pytest.approx(math.sqrt(2) / 2)
    # NaN entries are ignored per column.
    v = torch.tensor([[0.0, float("nan")], [2.0, 1.0], [float("nan"), 3.0]])
    assert spread(v) == pytest.approx(math.sqrt(2))
    assert spread(torch.tensor([1.0, 3.0])) == pytest.approx(math.sqrt(2))


def test_memorisation_copies_and_random():
    g = torch.Generator().manual_seed(9)
    train = torch.randn(1000, 64, generator=g)
    idx = torch.randperm(1000, generator=g)[:50]
    copies = train[idx] * 2.0  # cosine is scale-free
    out = memorisation(copies, train, batch=128)  # several train chunks and gen chunks
    assert out["near_duplicate_rate"] == 1.0
    assert out["nn_cosine_mean"] == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(out["nn_index"], idx) and out["nn_index"].dtype == torch.long
    rand = memorisation(torch.randn(50, 64, generator=g), train, batch=128)
    assert rand["near_duplicate_rate"] == 0.0
    assert rand["nn_cosine_mean"] < 0.6
    # Batching does not change the answer.
    full = memorisation(torch.randn(20, 64, generator=torch.Generator().manual_seed(10)), train, batch=4096)
    chunked = memorisation(torch.randn(20, 64, generator=torch.Generator().manual_seed(10)), train, batch=7)
    assert torch.equal(full["nn_index"], chunked["nn_index"])


def test_inception_absent_weights_returns_none(tmp_path):
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    missing = tmp_path / "no_such_inception.pth"
    assert inception_features(images, "cpu", weights_path=missing) is None
    assert fid_kid(images, images, "cpu", weights_path=missing) is None


def test_inception_features_loads_local_state_dict(tmp_path):
    from torchvision.models import inception_v3
    torch.manual_seed(0)
    net = inception_v3(weights=None, aux_logits=True, init_weights=False)
    path = tmp_path / "inception_v3_google-random.pth"
    torch.save(net.state_dict(), path)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(11))
    feats = inception_features(images, "cpu", weights_path=path)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all()
    assert not torch.allclose(feats[0], feats[1])  # different images, different features
    # The evaluation computes the real images' features once and reuses them for every generated set.
    fake = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(12))
    whole = fid_kid(images, fake, "cpu", weights_path=path, kid_subset_size=2)
    reused = fid_kid_from_features(feats, inception_features(fake, "cpu", weights_path=path), kid_subset_size=2)
    assert whole == reused and whole["fid"] > 0
