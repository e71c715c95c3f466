"""Distribution, diversity and memorisation metrics for the evaluation suite.

Everything here is a pure function on feature tensors; the caller computes the features, normally
with the project's own CLIP image encoder (so "CLIP-FD" / "CLIP-KID" numbers), and only the
optional `inception_features` / `fid_kid` path touches a network.

- `frechet_distance`: the Fréchet distance between Gaussians fitted to two feature sets (the FID
  formula, Heusel et al. 2017), in float64, torch only (no scipy).
- `kernel_distance`: KID (Bińkowski et al. 2018), the unbiased MMD^2 with the cubic polynomial
  kernel, averaged over random subsets; deterministic under `seed`.
- `mean_pairwise_distance`, `spread`: how much the samples drawn for one caption differ
  (unCLIP, Ramesh et al. 2022, Sec. 5.1 argues the decoder keeps more diversity than GLIDE).
- `caption_match`: CLIP score and R-precision of images against their captions, the caption-match
  figure for data the shapes reader cannot read (CIFAR-10, user folders).
- `memorisation`: nearest training neighbour of each generated sample in CLIP space, and the share
  of near-duplicates; batched so that training sets of 20k+ images fit in memory.
- `inception_features`, `fid_kid`: the standard FID / KID path, only when torchvision's Inception-v3
  weights are already on disk (no download is ever attempted); otherwise they return None.
"""

import glob
import os

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Distribution distances
# ---------------------------------------------------------------------------------------------


def _as_features(x, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a (N, D) feature tensor, got shape {tuple(x.shape)}")
    return x


def _gaussian_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of x: (N, D), in float64 (as np.cov in TF-FID)."""
    x = x.double()
    mu = x.mean(dim=0)
    xc = x - mu
    sigma = xc.T @ xc / (x.shape[0] - 1)  # (D, D)
    return mu, sigma


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric PSD matrix via eigh; tiny negative eigenvalues (round-off) clamp to 0."""
    evals, evecs = torch.linalg.eigh((m + m.T) / 2)
    return (evecs * evals.clamp(min=0).sqrt()) @ evecs.T


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets.

    feats_a: (N, D), feats_b: (M, D), N, M >= 2. Returns
        ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}).
    Tr((S_a S_b)^{1/2}) is computed without a general (non-symmetric) matrix square root:
    S_a S_b is similar to the symmetric PSD matrix S_a^{1/2} S_b S_a^{1/2}, so both have the same
    eigenvalues, and the trace of the square root is the sum of their square roots (eigh, float64,
    tiny negative eigenvalues from round-off clamped to 0). This is exact and symmetric in (a, b) up
    to round-off, and stays well defined for rank-deficient covariances (N < D).
    """
    feats_a, feats_b = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    if feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"feature dims differ: {feats_a.shape[1]} vs {feats_b.shape[1]}")
    if feats_a.shape[0] < 2 or feats_b.shape[0] < 2:
        raise ValueError("frechet_distance needs at least 2 samples per set")
    mu_a, sigma_a = _gaussian_stats(feats_a)
    mu_b, sigma_b = _gaussian_stats(feats_b)
    sqrt_a = _sqrt_psd(sigma_a)
    inner = sqrt_a @ sigma_b @ sqrt_a  # (D, D), symmetric PSD
    evals = torch.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = evals.clamp(min=0).sqrt().sum()
    diff = mu_a - mu_b
    fd = diff.dot(diff) + torch.trace(sigma_a) + torch.trace(sigma_b) - 2 * tr_covmean
    # Round-off can leave a value of order -1e-12 for identical sets; a distance is never negative.
    return max(float(fd), 0.0)


def _polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x.y / d + 1)^3, the KID kernel. x: (n, D), y: (m, D) -> (n, m)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def _mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 estimate between x: (m, D) and y: (m, D) (diagonals of k_xx, k_yy excluded)."""
    m = x.shape[0]
    k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    off_xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    off_yy = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return off_xx + off_yy - 2 * k_xy.mean()


def kernel_distance(feats_a, feats_b, subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018) on arbitrary features.

    feats_a: (N, D), feats_b: (M, D). For each of `subsets` rounds, draws min(subset_size, N, M)
    rows of each set without replacement and computes the unbiased MMD^2 with the cubic polynomial
    kernel k(x, y) = (x.y / D + 1)^3. Returns (mean, std) over the rounds; the estimate is unbiased,
    so it can be slightly negative for two samples of the same distribution. Float64; the random
    subsets come from a private torch.Generator seeded with `seed`, so results are deterministic
    and the global RNG is left untouched. Identical sets do not give exactly 0: k_xy keeps its
    diagonal, so the estimate is 2 (mean_{i!=j} k_ij - mean_i k_ii) / m, a small negative value.
    """
    feats_a, feats_b = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    if feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"feature dims differ: {feats_a.shape[1]} vs {feats_b.shape[1]}")
    m = min(subset_size, feats_a.shape[0], feats_b.shape[0])
    if m < 2:
        raise ValueError("kernel_distance needs at least 2 samples per set")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    a, b = feats_a.double(), feats_b.double()
    gen = torch.Generator().manual_seed(seed)  # CPU generator: same subsets on any device
    values = []
    for _ in range(subsets):
        ia = torch.randperm(a.shape[0], generator=gen)[:m].to(a.device)
        ib = torch.randperm(b.shape[0], generator=gen)[:m].to(b.device)
        values.append(_mmd2_unbiased(a[ia], b[ib]))
    values = torch.stack(values)
    std = values.std() if subsets > 1 else values.new_zeros(())
    return float(values.mean()), float(std)


# ---------------------------------------------------------------------------------------------
# Diversity: how much the samples for one caption differ
# ---------------------------------------------------------------------------------------------


def mean_pairwise_distance(feats) -> float:
    """Mean cosine distance 1 - cos(f_i, f_j) over all pairs i < j.

    feats: (N, D), N >= 2, e.g. the CLIP image embeddings of N samples for one caption.
    Cosine rather than euclidean distance because CLIP embeddings are compared by cosine (Sec. 2 of
    the unCLIP paper) and the value is then scale-free: 0 for identical rows, 1 for orthogonal ones,
    up to 2 for opposite ones. Rows are L2-normalised first; an all-zero row counts as distance 1
    to everything. Computed in O(N D) with sum_{i<j} f_i.f_j = (||sum_i f_i||^2 - sum_i ||f_i||^2) / 2,
    so large N needs no (N, N) matrix.
    """
    feats = _as_features(feats, "feats")
    n = feats.shape[0]
    if n < 2:
        raise ValueError("mean_pairwise_distance needs at least 2 rows")
    f = F.normalize(feats.double(), dim=-1)
    total = f.sum(dim=0)
    pair_cos_sum = (total.dot(total) - (f * f).sum()) / 2
    n_pairs = n * (n - 1) / 2
    return float(1 - pair_cos_sum / n_pairs)


def spread(values) -> float:
    """Mean over attributes of the standard deviation across samples.

    values: (N, K) (or (N,) for one attribute): K measured attributes (e.g. object x, y, size) of
    N samples generated for the same caption. Returns mean_k std_n(values[:, k]) with the unbiased
    (N - 1) estimator. NaN entries (an attribute that could not be measured on that sample) are
    ignored per column; columns with fewer than 2 finite values are skipped; NaN if none is left.
    """
    values = torch.as_tensor(values).double()
    if values.ndim == 1:
        values = values[:, None]  # (N, 1)
    if values.ndim != 2:
        raise ValueError(f"values must be (N, K) or (N,), got shape {tuple(values.shape)}")
    stds = []
    for col in values.T:
        col = col[torch.isfinite(col)]
        if col.numel() >= 2:
            stds.append(col.std())
    if not stds:
        return float("nan")
    return float(torch.stack(stds).mean())


# ---------------------------------------------------------------------------------------------
# Caption match: does the image go with its caption, in the eyes of a CLIP
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def caption_match(image_feats, text_feats, caption_ids, distractors: int = 99, seed: int = 0) -> dict:
    """How well images match their captions by CLIP similarity, for data no attribute reader reads.

    image_feats: (N, D) embeddings of N images; text_feats: (C, D) embeddings of the C distinct
    captions; caption_ids: (N,) the index in text_feats of each image's caption. Rows are
    L2-normalised. Returns
    - clip_cosine: mean cos(image, its caption);
    - clip_score: mean 100 * max(cos, 0), CLIPScore as torchmetrics computes it (Hessel et al. 2021
      without the 2.5 weight), but with the project's own CLIP, so not comparable to OpenAI-CLIP numbers;
    - r_precision: share of images whose own caption is the most similar among it and
      min(distractors, C - 1) other distinct captions drawn at random (seeded; R-precision with R = 1,
      as in AttnGAN, Xu et al. 2018); chance is 1 / (1 + that number);
    - retrieval_top1: share of images whose own caption is the most similar of all C; chance 1 / C;
    - n_distractors, n_captions.
    """
    img = F.normalize(_as_features(image_feats, "image_feats").double(), dim=-1)
    txt = F.normalize(_as_features(text_feats, "text_feats").double(), dim=-1)
    ids = torch.as_tensor(caption_ids, dtype=torch.long).reshape(-1)
    if ids.numel() != img.shape[0]:
        raise ValueError(f"{img.shape[0]} images but {ids.numel()} caption ids")
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"image features are {img.shape[1]}-dim, text features {txt.shape[1]}-dim")
    if ids.numel() and (ids.min() < 0 or ids.max() >= txt.shape[0]):
        raise ValueError(f"caption ids must lie in [0, {txt.shape[0]})")
    n, c = img.shape[0], txt.shape[0]
    sims = img @ txt.T  # (N, C)
    own = sims.gather(1, ids[:, None])[:, 0]  # (N,)
    k = min(distractors, c - 1)
    g = torch.Generator().manual_seed(seed)
    # k distinct other captions per image: a random permutation of the C - 1 others, first k kept
    others = torch.argsort(torch.rand(n, c - 1, generator=g), dim=1)[:, :k]  # indices into "all but own"
    others = others + (others >= ids[:, None]).long()  # skip the image's own caption
    beats = (sims.gather(1, others) >= own[:, None]).any(dim=1) if k else torch.zeros(n, dtype=torch.bool)
    top1 = (sims.argmax(dim=1) == ids).double().mean() if n else torch.tensor(float("nan"))
    return {"clip_cosine": float(own.mean()), "clip_score": float((100 * own.clamp(min=0)).mean()),
            "r_precision": float((~beats).double().mean()), "retrieval_top1": float(top1),
            "n_distractors": k, "n_captions": c}


# ---------------------------------------------------------------------------------------------
# Memorisation: nearest training neighbour in CLIP space
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def memorisation(gen_feats, train_feats, threshold: float = 0.95, batch: int = 4096) -> dict:
    """Nearest training neighbour (by cosine similarity) of every generated sample.

    gen_feats: (N, D), train_feats: (M, D), e.g. CLIP image embeddings. Returns
        nn_cosine_mean: float, mean over generated samples of the cosine to their nearest train image;
        near_duplicate_rate: float, share of generated samples with that cosine >= threshold;
        nn_index: (N,) long, index into train_feats of the nearest neighbour;
        nn_cosine: (N,) float, the cosine itself (to show the worst cases next to their neighbours).
    Both sets are processed in chunks of `batch` rows, so memory is O(batch^2), not O(N M).
    Computed in float32 on the device of gen_feats (the threshold is far above round-off).
    """
    gen_feats, train_feats = _as_features(gen_feats, "gen_feats"), _as_features(train_feats, "train_feats")
    if gen_feats.shape[1] != train_feats.shape[1]:
        raise ValueError(f"feature dims differ: {gen_feats.shape[1]} vs {train_feats.shape[1]}")
    if gen_feats.shape[0] == 0 or train_feats.shape[0] == 0:
        raise ValueError("memorisation needs non-empty gen_feats and train_feats")
    device = gen_feats.device
    gen = F.normalize(gen_feats.float(), dim=-1)
    nn_cos, nn_idx = [], []
    for g0 in range(0, gen.shape[0], batch):
        g = gen[g0:g0 + batch]
        best = torch.full((g.shape[0],), -float("inf"), device=device)
        best_idx = torch.zeros(g.shape[0], dtype=torch.long, device=device)
        for t0 in range(0, train_feats.shape[0], batch):
            t = F.normalize(train_feats[t0:t0 + batch].to(device).float(), dim=-1)
            cos, idx = (g @ t.T).max(dim=1)  # (n_g,), best within this train chunk
            better = cos > best  # strict: ties keep the earlier (lower) index
            best = torch.where(better, cos, best)
            best_idx = torch.where(better, idx + t0, best_idx)
        nn_cos.append(best)
        nn_idx.append(best_idx)
    nn_cos, nn_idx = torch.cat(nn_cos), torch.cat(nn_idx)
    return {
        "nn_cosine_mean": float(nn_cos.mean()),
        "near_duplicate_rate": float((nn_cos >= threshold).float().mean()),
        "nn_index": nn_idx.cpu(),
        "nn_cosine": nn_cos.cpu(),
    }


# ---------------------------------------------------------------------------------------------
# Optional standard FID / KID with torchvision's Inception-v3 (only if the weights are on disk)
# ---------------------------------------------------------------------------------------------

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def find_inception_weights(weights_path=None):
    """Path of torchvision's Inception-v3 weights, or None if not on this machine.

    An explicit `weights_path` is used if it exists (None if it does not); otherwise the torchvision
    cache is searched: torch.hub.get_dir()/checkpoints/inception_v3_google-*.pth. Never downloads.
    """
    if weights_path is not None:
        return str(weights_path) if os.path.isfile(weights_path) else None
    pattern = os.path.join(torch.hub.get_dir(), "checkpoints", "inception_v3_google-*.pth")
    found = sorted(glob.glob(pattern))
    return found[-1] if found else None


def load_inception(device, weights_path=None):
    """torchvision Inception-v3 with fc = Identity (2048-d pool features), eval mode, or None.

    Returns None when no weights are found (see `find_inception_weights`); nothing is downloaded.
    transform_input=True as torchvision sets it for its pretrained weights: the model takes
    ImageNet-normalised input and maps it back to the [-1, 1] scaling the Google weights expect.
    """
    path = find_inception_weights(weights_path)
    if path is None:
        return None
    from torchvision.models import inception_v3  # lazy: importing this module stays cheap
    model = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.fc = torch.nn.Identity()
    return model.eval().requires_grad_(False).to(device)


@torch.no_grad()
def inception_features(images, device, weights_path=None, batch_size: int = 50, model=None):
    """Inception-v3 pool features (N, 2048) of uint8 images, or None without the weights.

    images: uint8 (N, 3, H, W) (or (N, 1, H, W), repeated to RGB), e.g. 32x32 dataset images.
    Each batch is scaled to [0, 1], resized to 299x299 bilinearly (the usual FID upsampling of
    small images), normalised with ImageNet statistics and run through torchvision's Inception-v3
    in eval mode; `model` may be a network returned by `load_inception` to avoid reloading it.
    Weights come from `weights_path` or torchvision's cache; none is downloaded (our machines have
    no internet), and None is returned when they are absent.
    Caveat: torchvision's Inception-v3 weights differ slightly from the TF-FID Inception graph
    (pytorch-fid / clean-fid port the latter), so numbers from here are "torchvision-Inception FID":
    comparable among themselves, not with published FID values.
    Returns float32 features on the CPU.
    """
    if model is None:
        model = load_inception(device, weights_path)
        if model is None:
            return None
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    mean = torch.tensor(_IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD, device=device).view(1, 3, 1, 1)
    feats = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].to(device).float() / 255
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # (n, 3, H, W)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)  # (n, 3, 299, 299)
        feats.append(model((x - mean) / std).float().cpu())  # (n, 2048)
    return torch.cat(feats)


def fid_kid(real_uint8, fake_uint8, device, weights_path=None, kid_subsets: int = 100,
            kid_subset_size: int = 1000, seed: int = 0):
    """torchvision-Inception FID and KID between two uint8 image sets, or None without the weights.

    real_uint8: (N, 3, H, W), fake_uint8: (M, 3, H, W). Returns
    {"fid", "kid_mean", "kid_std", "n_real", "n_fake", "features"}. See `inception_features` for
    why these numbers are comparable among themselves but not with TF-FID values in papers.
    """
    model = load_inception(device, weights_path)
    if model is None:
        return None
    return fid_kid_from_features(inception_features(real_uint8, device, model=model),
                                 inception_features(fake_uint8, device, model=model),
                                 kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, seed=seed)


def fid_kid_from_features(real: torch.Tensor, fake: torch.Tensor, kid_subsets: int = 100,
                          kid_subset_size: int = 1000, seed: int = 0) -> dict:
    """`fid_kid` on Inception features already computed (real: (N, 2048), fake: (M, 2048)), e.g. the
    real images' once for several generated sets."""
    kid_mean, kid_std = kernel_distance(real, fake, subsets=kid_subsets, subset_size=kid_subset_size,
                                        seed=seed)
    return {
        "fid": frechet_distance(real, fake),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "n_real": real.shape[0],
        "n_fake": fake.shape[0],
        "features": "torchvision-inception-v3-pool3",
    }
