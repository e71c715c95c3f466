"""Tests of dalle2.diffusion against closed forms. CPU, seconds."""
import math

import pytest
import torch

from dalle2.decoder.model import UNet
from dalle2.diffusion import (
    GaussianDiffusion,
    PreparesConditioning,
    _extract,
    classifier_free_guidance,
    dynamic_threshold,
    make_beta_schedule,
    respaced_timesteps,
)
from dalle2.prior.model import PriorNetwork

SHAPES = [(6, 8), (3, 2, 4, 4)]  # the prior's (N, D) and the decoder's (N, C, H, W)
OBJECTIVES = ["eps", "x0", "v"]


def cosine_abar_reference(T, s=0.008):
    """Cosine alpha-bar written independently of the module (float64, with the 0.999 beta clip)."""
    f = [math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)]
    abar, prod = [], 1.0
    for t in range(T):
        prod *= 1 - min(1 - f[t + 1] / f[t], 0.999)
        abar.append(prod)
    return torch.tensor(abar, dtype=torch.float64)


def ideal_model(diffusion, x0_true):
    """A denoiser that knows x0: returns the exact target of the objective for any x_t, using the ORIGINAL
    schedule at the (original) timestep it receives."""
    abar_all = diffusion.alphas_cumprod

    def fn(x_t, t, **kwargs):
        abar = abar_all[t.cpu()].to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))
        x0 = x0_true.to(x_t.dtype)
        eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
        return {"eps": eps, "x0": x0, "v": abar.sqrt() * eps - (1 - abar).sqrt() * x0}[diffusion.objective]

    return fn


def gaussian_optimal_model(diffusion, sigma):
    """The exact denoiser for data x0 ~ N(0, sigma^2 I):
    E[x0 | x_t] = sqrt(abar) sigma^2 / (abar sigma^2 + 1 - abar) x_t.
    Smooth and linear in x_t, but not ideal for any particular x0."""
    abar_all = diffusion.alphas_cumprod

    def fn(x_t, t, **kwargs):
        abar = abar_all[t.cpu()].to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))
        x0 = abar.sqrt() * sigma ** 2 / (abar * sigma ** 2 + 1 - abar) * x_t
        eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
        return {"eps": eps, "x0": x0, "v": abar.sqrt() * eps - (1 - abar).sqrt() * x0}[diffusion.objective]

    return fn


def rand_x0(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 1.8 - 0.9  # in [-0.9, 0.9]


# ---- schedules and respacing ------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("T", [10, 50, 1000])
def test_schedules_monotone_and_in_range(schedule, T):
    d = GaussianDiffusion(timesteps=T, schedule=schedule)
    assert d.betas.dtype == torch.float64 and d.betas.device.type == "cpu" and d.betas.shape == (T,)
    assert (d.betas > 0).all() and (d.betas <= 0.999).all()
    abar = d.alphas_cumprod
    assert (abar > 0).all() and (abar < 1).all()
    assert (abar[1:] < abar[:-1]).all()


def test_schedule_closed_forms():
    assert torch.allclose(GaussianDiffusion(1000, "cosine").alphas_cumprod, cosine_abar_reference(1000),
                          rtol=1e-10, atol=0)
    assert torch.allclose(GaussianDiffusion(37, "cosine").alphas_cumprod, cosine_abar_reference(37),
                          rtol=1e-10, atol=0)
    lin = make_beta_schedule("linear", 1000)
    assert lin[0].item() == pytest.approx(1e-4) and lin[-1].item() == pytest.approx(0.02)
    lin = make_beta_schedule("linear", 100)  # scaled by 1000/T
    assert lin[0].item() == pytest.approx(1e-3) and lin[-1].item() == pytest.approx(0.2)


@pytest.mark.parametrize("T,steps", [(1000, 1), (1000, 2), (1000, 50), (1000, 999), (1000, 1000),
                                     (10, 3), (10, 9), (7, 7), (1, 1), (4000, 250)])
def test_respaced_timesteps(T, steps):
    k = respaced_timesteps(T, steps)
    assert k.dtype == torch.long and k.shape == (steps,)
    assert k[-1].item() == T - 1  # the first sampling step is always the last training step
    if steps > 1:
        assert k[0].item() == 0
        gaps = k[1:] - k[:-1]
        assert (gaps >= 1).all()  # increasing, distinct
        assert gaps.max() - gaps.min() <= 1  # evenly spaced
    if steps == T:
        assert torch.equal(k, torch.arange(T))


def test_respaced_timesteps_rejects_bad_steps():
    for steps in (0, 11, -1):
        with pytest.raises(ValueError):
            respaced_timesteps(10, steps)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("steps", [1, 3, 50, 999])
def test_respaced_process_keeps_abar(schedule, steps):
    d = GaussianDiffusion(1000, schedule)
    sp = d.respace(steps)
    kept = respaced_timesteps(1000, steps)
    assert sp.num_timesteps == steps and torch.equal(sp.timestep_map, kept)
    assert torch.allclose(sp.alphas_cumprod, d.alphas_cumprod[kept], rtol=1e-12, atol=0)
    assert (sp.betas > 0).all() and (sp.betas < 1).all()
    assert d.respace(steps) is sp  # cached
    assert d.respace(1000) is d


def test_extract_broadcasts_any_rank():
    arr = torch.arange(10, dtype=torch.float64)
    t = torch.tensor([3, 7])
    for shape in [(2, 5), (2, 3, 4, 4), (2,)]:
        out = _extract(arr, t, shape)
        assert out.shape == (2,) + (1,) * (len(shape) - 1) and out.dtype == torch.float32
        assert out.flatten().tolist() == [3.0, 7.0]


# ---- forward process and posterior --------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8,), (2, 3, 3)])
def test_q_sample_moments(shape):
    torch.manual_seed(0)
    d = GaussianDiffusion(1000, "cosine")
    x0 = rand_x0((1,) + shape).expand((20000,) + shape)
    for t_val in (0, 300, 800):
        t = torch.full((20000,), t_val)
        x_t = d.q_sample(x0, t)
        abar = d.alphas_cumprod[t_val].item()
        assert torch.allclose(x_t.mean(0), math.sqrt(abar) * x0[0], atol=4 * math.sqrt((1 - abar) / 20000) + 1e-6)
        assert torch.allclose(x_t.var(0), torch.full(shape, 1 - abar), rtol=0.06)
        mean, var = d.q_mean_variance(x0[:4], t[:4])
        assert torch.allclose(mean, math.sqrt(abar) * x0[:4]) and torch.allclose(var, torch.tensor(1 - abar).float())


def _posterior_bayes(abar, abar_prev, x0, x_t):
    """q(x_{t-1} | x_t, x0) by Bayes' rule: product of N(x_t; sqrt(a) x_{t-1}, 1 - a) and
    N(x_{t-1}; sqrt(abar_prev) x0, 1 - abar_prev), with a = abar / abar_prev. All float64."""
    a = abar / abar_prev
    precision = a / (1 - a) + 1 / (1 - abar_prev)
    var = 1 / precision
    mean = var * (math.sqrt(a) / (1 - a) * x_t + math.sqrt(abar_prev) / (1 - abar_prev) * x0)
    return mean, var


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("steps", [None, 10])
def test_posterior_matches_closed_form(shape, steps):
    d = GaussianDiffusion(200, "cosine")
    ref_abar = cosine_abar_reference(200)
    if steps is not None:
        d, ref_abar = d.respace(steps), ref_abar[respaced_timesteps(200, steps)]
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    x_t = torch.randn(shape, generator=g, dtype=torch.float64)
    n = shape[0]
    for t_val in range(1, d.num_timesteps):
        t = torch.full((n,), t_val)
        mean, var, log_var = d.q_posterior(x0, x_t, t)
        ref_mean, ref_var = _posterior_bayes(ref_abar[t_val].item(), ref_abar[t_val - 1].item(), x0, x_t)
        assert torch.allclose(mean, ref_mean, rtol=1e-9, atol=1e-12)
        assert torch.allclose(var, torch.full_like(var, ref_var), rtol=1e-9, atol=0)
        assert torch.allclose(log_var, torch.full_like(var, math.log(ref_var)), rtol=1e-9, atol=0)
    # t = 0: x_{-1} is the data itself
    mean, var, log_var = d.q_posterior(x0, x_t, torch.zeros(n, dtype=torch.long))
    assert torch.allclose(mean, x0, atol=1e-12) and (var == 0).all() and torch.isfinite(log_var).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_conversions_round_trip(shape):
    d = GaussianDiffusion(1000, "cosine")
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.linspace(0, 999, shape[0]).long()
    x_t = d.q_sample(x0, t, eps)
    assert torch.allclose(d.predict_x0_from_eps(x_t, t, eps), x0, atol=1e-9)
    assert torch.allclose(d.predict_eps_from_x0(x_t, t, x0), eps, atol=1e-9)
    v = d.predict_v(x0, t, eps)
    assert torch.allclose(d.predict_x0_from_v(x_t, t, v), x0, atol=1e-9)
    for objective, out in [("eps", eps), ("x0", x0), ("v", v)]:
        do = GaussianDiffusion(1000, "cosine", objective=objective)
        x0_hat, eps_hat = do.model_output_to_x0_eps(x_t, t, out)
        assert torch.allclose(x0_hat, x0, atol=1e-9) and torch.allclose(eps_hat, eps, atol=1e-9)


# ---- sampling -----------------------------------------------------------------------------------------


SAMPLER_CONFIGS = [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)]


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("sampler,eta", SAMPLER_CONFIGS)
@pytest.mark.parametrize("steps", [None, 7])
@pytest.mark.parametrize("shape", SHAPES)
def test_ideal_denoiser_recovers_x0(objective, sampler, eta, steps, shape):
    d = GaussianDiffusion(100, "cosine", objective=objective)
    x0 = rand_x0(shape)
    out = d.sample(ideal_model(d, x0), shape, steps=steps, sampler=sampler, eta=eta,
                   generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and out.shape == shape
    assert (out - x0).abs().max() < 1e-5


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_ideal_denoiser_full_1000_step_cosine(objective):
    # abar at t = 999 is 2.4e-9: the eps -> x0 conversion divides by 5e-5 there.
    d = GaussianDiffusion(1000, "cosine", objective=objective)
    x0 = rand_x0((4, 3, 2, 2))
    for sampler in ("ddim", "ddpm"):
        out = d.sample(ideal_model(d, x0), x0.shape, sampler=sampler, generator=torch.Generator().manual_seed(0))
        assert (out - x0).abs().max() < 1e-5


def test_model_receives_original_timesteps():
    d = GaussianDiffusion(100, "cosine")
    seen = []

    def model(x_t, t, **kwargs):
        assert t.dtype == torch.long and t.shape == (x_t.shape[0],)
        seen.append(t[0].item())
        return torch.zeros_like(x_t)

    d.sample(model, (2, 4), steps=5)
    assert seen == respaced_timesteps(100, 5).flip(0).tolist()
    seen.clear()
    d.training_loss(model, torch.zeros(2, 4), t=torch.tensor([3, 3]))
    assert seen == [3]


@pytest.mark.parametrize("steps", [None, 10])
@pytest.mark.parametrize("clip_x0", [None, "static"])
def test_ddpm_equals_ddim_eta1(steps, clip_x0):
    """With the same noise draws, DDIM(eta=1) and DDPM ancestral sampling are the same process
    (Song et al. 2021, Sec. 4.1): this checks the posterior mean/variance of the respaced chain."""
    d = GaussianDiffusion(100, "linear", objective="v")
    model = lambda x, t, **kw: 0.7 * x + 0.002 * t.view(-1, 1).float()  # noqa: E731
    a = d.sample(model, (5, 3), steps=steps, sampler="ddpm", generator=torch.Generator().manual_seed(3),
                 clip_x0=clip_x0)
    b = d.sample(model, (5, 3), steps=steps, sampler="ddim", eta=1.0, generator=torch.Generator().manual_seed(3),
                 clip_x0=clip_x0)
    assert torch.allclose(a, b, atol=1e-5)


def _gaussian_sample_variance(abar, sigma, sampler, eta):
    """Exact output variance of a sampler on N(0, sigma^2) data with its exact (linear) denoiser, per
    dimension: x_{i-1} = m_i x_i + s_i z, so Var_{i-1} = m_i^2 Var_i + s_i^2. DDPM from Bayes' rule,
    DDIM from Song et al. eq. 12; abar: (S,) float64 of the chain actually run."""
    var = 1.0
    for i in range(len(abar) - 1, 0, -1):
        ab, ab_p = abar[i].item(), abar[i - 1].item()
        c = math.sqrt(ab) * sigma ** 2 / (ab * sigma ** 2 + 1 - ab)  # x0_hat = c x_t
        if sampler == "ddpm":
            a = ab / ab_p
            post_var = 1 / (a / (1 - a) + 1 / (1 - ab_p))
            m = post_var * (math.sqrt(ab_p) / (1 - ab_p) * c + math.sqrt(a) / (1 - a))
            s2 = post_var
        else:
            s2 = eta ** 2 * (1 - ab_p) / (1 - ab) * (1 - ab / ab_p)
            m = math.sqrt(ab_p) * c + math.sqrt(1 - ab_p - s2) * (1 - math.sqrt(ab) * c) / math.sqrt(1 - ab)
        var = m ** 2 * var + s2
    c0 = math.sqrt(abar[0].item()) * sigma ** 2 / (abar[0].item() * sigma ** 2 + 1 - abar[0].item())
    return c0 ** 2 * var


@pytest.mark.parametrize("sampler,eta", SAMPLER_CONFIGS)
@pytest.mark.parametrize("steps", [20, 100])
def test_gaussian_data_is_sampled_with_the_right_variance(sampler, eta, steps):
    """For data N(0, sigma^2 I) and its exact denoiser, the samples' variance must match the closed form
    of the respaced chain, and approach sigma^2 (a DDPM step that skipped the posterior mean, or used the
    original betas on a respaced chain, would not)."""
    sigma = 0.5
    d = GaussianDiffusion(1000, "cosine", objective="eps")
    out = d.sample(gaussian_optimal_model(d, sigma), (10000, 2), steps=steps, sampler=sampler, eta=eta,
                   generator=torch.Generator().manual_seed(0))
    expected = _gaussian_sample_variance(cosine_abar_reference(1000)[respaced_timesteps(1000, steps)],
                                         sigma, sampler, eta)
    assert abs(out.mean().item()) < 0.02
    assert out.var().item() == pytest.approx(expected, rel=0.04)  # 4 standard errors of the estimate
    if steps == 100:
        assert expected == pytest.approx(sigma ** 2, rel=0.1)


def test_ddim_eta0_is_deterministic_and_ignores_generator():
    d = GaussianDiffusion(100, "cosine", objective="eps")
    model = lambda x, t, **kw: 0.5 * x  # noqa: E731
    noise = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    a = d.sample(model, noise.shape, steps=20, noise=noise, generator=torch.Generator().manual_seed(1))
    b = d.sample(model, noise.shape, steps=20, noise=noise, generator=torch.Generator().manual_seed(2))
    c = d.sample(model, noise.shape, steps=20, noise=noise)
    assert torch.equal(a, b) and torch.equal(a, c)
    # with eta > 0 the generator matters
    e1 = d.sample(model, noise.shape, steps=20, noise=noise, eta=1.0, generator=torch.Generator().manual_seed(1))
    e2 = d.sample(model, noise.shape, steps=20, noise=noise, eta=1.0, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(e1, e2)


@pytest.mark.parametrize("shape", SHAPES)
def test_generator_seed_reproducibility(shape):
    d = GaussianDiffusion(100, "cosine", objective="x0")
    model = lambda x, t, **kw: 0.5 * x  # noqa: E731
    run = lambda seed: d.sample(model, shape, steps=10, sampler="ddpm",  # noqa: E731
                                generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))
    # the generator also draws the initial noise: given the same initial noise, only per-step noise differs
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with_noise = d.sample(model, shape, steps=10, sampler="ddpm", noise=noise,
                          generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(with_noise, run(5))


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("shape", SHAPES)
def test_ddim_invert_reconstructs_with_ideal_denoiser(objective, shape):
    d = GaussianDiffusion(100, "cosine", objective=objective)
    x0 = rand_x0(shape)
    model = ideal_model(d, x0)
    x_T = d.ddim_invert(model, x0, steps=20)
    assert x_T.shape == shape and torch.isfinite(x_T).all()
    out = d.sample(model, shape, steps=20, noise=x_T)
    assert (out - x0).abs().max() < 1e-5


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_ddim_invert_reconstructs_with_smooth_linear_model(objective):
    d = GaussianDiffusion(1000, "cosine", objective=objective)
    model = gaussian_optimal_model(d, sigma=0.5)
    x0 = rand_x0((8, 3, 2, 2), seed=4).double()
    errors = []
    for steps in (25, 100):
        x_T = d.ddim_invert(model, x0, steps=steps)
        out = d.sample(model, x0.shape, steps=steps, noise=x_T)
        errors.append((out - x0).abs().max().item())
    # the inverted latent is not trivially the data: it lives at the noise level of the first step
    assert x_T.std().item() > 1.5 * x0.std().item()
    # measured max error: 0.108 at 25 steps, 0.027 at 100, 0.007 at 400 (first order in the step size)
    assert errors[1] < 0.04 and errors[1] < errors[0] / 3


def test_autocast_style_half_output_is_computed_in_float32():
    d = GaussianDiffusion(50, "cosine", objective="v")
    x0 = rand_x0((3, 4))
    ideal = ideal_model(d, x0)
    out = d.sample(lambda x, t, **kw: ideal(x, t).bfloat16(), (3, 4), steps=5)
    assert out.dtype == torch.float32 and (out - x0).abs().max() < 2e-2


# ---- clipping -----------------------------------------------------------------------------------------


def test_static_clipping_keeps_x0_in_range():
    d = GaussianDiffusion(100, "cosine", objective="x0")
    wild = lambda x, t, **kw: 3.0 * x + 2.0  # predicts x0 far outside [-1, 1]  # noqa: E731
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    unclipped = d.sample(wild, (4, 2, 3, 3), steps=10, generator=g())
    assert unclipped.abs().max() > 1.5
    assert torch.equal(d.sample(wild, (4, 2, 3, 3), steps=10, generator=g(), clip_x0="none"),
                       unclipped)  # config spelling
    for sampler in ("ddim", "ddpm"):
        out, preds = d.sample(wild, (4, 2, 3, 3), steps=10, sampler=sampler, generator=g(), clip_x0="static",
                              return_x0=True)
        assert out.abs().max() <= 1.0 and preds.shape == (10, 4, 2, 3, 3) and preds.abs().max() <= 1.0
        assert torch.equal(out, preds[-1])


def test_dynamic_threshold():
    g = torch.Generator().manual_seed(0)
    inside = torch.rand(5, 3, 4, 4, generator=g) * 2 - 1
    assert torch.equal(dynamic_threshold(inside, 0.995), inside)
    outside = torch.randn(5, 7, generator=g) * 4
    out = dynamic_threshold(outside, 0.9)
    assert out.abs().max() <= 1.0
    s = torch.quantile(outside.abs(), 0.9, dim=1, keepdim=True).clamp(min=1)
    assert torch.allclose(out, outside.clamp(-s, s) / s)
    # mixed batch: in-range rows untouched
    mixed = torch.cat([inside.flatten(1)[:, :7], outside])
    assert torch.equal(dynamic_threshold(mixed)[:5], inside.flatten(1)[:, :7])
    # inside a sampler, an ideal denoiser of in-range data is unaffected
    d = GaussianDiffusion(100, "cosine", objective="eps")
    x0 = rand_x0((3, 2, 4, 4))
    out = d.sample(ideal_model(d, x0), x0.shape, steps=10, clip_x0="dynamic")
    assert (out - x0).abs().max() < 1e-5


# ---- classifier-free guidance -------------------------------------------------------------------------


class ToyConditionalModel:
    """out = 0.5 x + t/100 + (null if dropped else emb * gain); records the batch size of every call."""

    def __init__(self):
        self.calls = []
        self.null = torch.tensor([0.3, -0.2, 0.1, 0.0])

    def __call__(self, x_t, t, emb=None, gain=1.0, bias=None, cond_drop=None):
        self.calls.append(x_t.shape[0])
        cond = emb * gain
        if cond_drop is not None:
            cond = torch.where(cond_drop[:, None], self.null.expand_as(cond), cond)
        return 0.5 * x_t + t[:, None].float() / 100 + cond + bias


def test_cfg_scale_one_is_the_plain_conditional_call():
    m = ToyConditionalModel()
    x, t = torch.randn(3, 4), torch.tensor([1, 5, 9])
    kw = dict(emb=torch.randn(3, 4), gain=2.0, bias=torch.randn(1, 4))
    out = classifier_free_guidance(m, 1.0)(x, t, **kw)
    assert m.calls == [3]
    assert torch.equal(out, m(x, t, **kw))


@pytest.mark.parametrize("scale", [0.0, 3.0, 7.5])
def test_cfg_matches_two_separate_calls(scale):
    m = ToyConditionalModel()
    x, t = torch.randn(3, 4), torch.tensor([1, 5, 9])
    # emb has leading dim N (doubled); bias has leading dim 1 (passed as is); gain is not a tensor
    kw = dict(emb=torch.randn(3, 4), gain=2.0, bias=torch.randn(1, 4))
    out = classifier_free_guidance(m, scale)(x, t, **kw)
    assert m.calls == [6]  # one batched forward
    cond = m(x, t, **kw, cond_drop=torch.zeros(3, dtype=torch.bool))
    uncond = m(x, t, **kw, cond_drop=torch.ones(3, dtype=torch.bool))
    assert torch.allclose(out, uncond + scale * (cond - uncond), atol=1e-6)


def test_sample_uses_guidance():
    d = GaussianDiffusion(50, "cosine", objective="eps")
    m = ToyConditionalModel()
    kw = dict(emb=torch.randn(2, 4) * 0.1, bias=torch.zeros(1, 4))
    noise = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    a = d.sample(m, (2, 4), steps=5, noise=noise, model_kwargs=kw, guidance_scale=3.0)
    assert m.calls == [4] * 5
    b = d.sample(classifier_free_guidance(m, 3.0), (2, 4), steps=5, noise=noise, model_kwargs=kw)
    assert torch.equal(a, b)
    assert not torch.allclose(a, d.sample(m, (2, 4), steps=5, noise=noise, model_kwargs=kw))


class ToyPreparedModel(ToyConditionalModel):
    """The same model, with its condition work (null substitution) split out as prepare_conditioning,
    as the prior and the decoder do; counts how often that step-invariant work runs."""

    def __init__(self):
        super().__init__()
        self.prepared = 0

    def prepare_conditioning(self, emb, gain=1.0, bias=None, cond_drop=None):
        self.prepared += 1
        cond = emb * gain
        if cond_drop is not None:
            cond = torch.where(cond_drop[:, None], self.null.expand_as(cond), cond)
        return {"cond": cond, "bias": bias}

    def __call__(self, x_t, t, cond=None, **kw):
        if cond is None:
            cond = self.prepare_conditioning(**kw)
        self.calls.append(x_t.shape[0])
        return 0.5 * x_t + t[:, None].float() / 100 + cond["cond"] + cond["bias"]


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_step_invariant_conditioning_is_prepared_once_per_sample(scale):
    """A model with prepare_conditioning gets it called once per sample (not once per step), with the
    guidance-doubled conditions, and samples exactly as the plain per-call model."""
    d = GaussianDiffusion(50, "cosine", objective="eps")
    kw = dict(emb=torch.randn(2, 4) * 0.1, bias=torch.zeros(1, 4))
    noise = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    prepared = ToyPreparedModel()
    a = d.sample(prepared, (2, 4), steps=5, noise=noise, model_kwargs=kw, guidance_scale=scale)
    assert prepared.prepared == 1 and prepared.calls == [2 if scale == 1.0 else 4] * 5
    b = d.sample(ToyConditionalModel(), (2, 4), steps=5, noise=noise, model_kwargs=kw, guidance_scale=scale)
    torch.testing.assert_close(a, b)
    prepared.prepared = 0
    d.ddim_invert(prepared, noise, steps=4, model_kwargs=kw, guidance_scale=scale)
    assert prepared.prepared == 1


# ---- training loss ------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("loss_weighting", ["plain", "min_snr"])
def test_training_loss_zero_for_ideal_positive_otherwise(objective, shape, loss_weighting):
    d = GaussianDiffusion(1000, "cosine", objective=objective, loss_weighting=loss_weighting)
    x0 = rand_x0(shape).double()
    loss = d.training_loss(ideal_model(d, x0), x0, generator=torch.Generator().manual_seed(0))
    assert loss.shape == (shape[0],) and loss.dtype == torch.float32
    assert loss.max().item() < 1e-10
    bad = d.training_loss(lambda x, t, **kw: torch.zeros_like(x) + 0.1, x0, generator=torch.Generator().manual_seed(0))
    assert (bad > 0).all()


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_training_loss_matches_manual_mse(objective):
    d = GaussianDiffusion(100, "linear", objective=objective)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    t = torch.tensor([0, 10, 50, 99])
    model = lambda x, t, **kw: 0.3 * x  # noqa: E731
    abar = d.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    target = {"eps": noise, "x0": x0, "v": abar.sqrt() * noise - (1 - abar).sqrt() * x0}[objective]
    expected = ((0.3 * x_t - target) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(d.training_loss(model, x0, t=t, noise=noise), expected, rtol=1e-5)
    # same generator -> same t and noise -> same loss
    l1 = d.training_loss(model, x0, generator=torch.Generator().manual_seed(7))
    l2 = d.training_loss(model, x0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(l1, l2)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_min_snr_weights(objective):
    gamma = 5.0
    plain = GaussianDiffusion(1000, "cosine", objective=objective)
    d = GaussianDiffusion(1000, "cosine", objective=objective, loss_weighting="min_snr", min_snr_gamma=gamma)
    t = torch.tensor([0, 10, 100, 300, 500, 900, 999])
    abar = cosine_abar_reference(1000)[t]
    snr = abar / (1 - abar)
    expected = {"eps": torch.minimum(snr, torch.tensor(gamma)) / snr,
                "x0": torch.minimum(snr, torch.tensor(gamma)),
                "v": torch.minimum(snr, torch.tensor(gamma)) / (snr + 1)}[objective]
    assert torch.allclose(d.loss_weight(t), expected.float(), rtol=1e-5)
    assert torch.equal(plain.loss_weight(t), torch.ones(7))
    x0 = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(7, 5, generator=torch.Generator().manual_seed(1))
    model = lambda x, t, **kw: 0.3 * x  # noqa: E731
    assert torch.allclose(d.training_loss(model, x0, t=t, noise=noise),
                          plain.training_loss(model, x0, t=t, noise=noise) * expected.float(), rtol=1e-5)


def test_constructor_and_sampler_validation():
    with pytest.raises(ValueError, match="schedule"):
        GaussianDiffusion(schedule="quadratic")
    with pytest.raises(ValueError, match="objective"):
        GaussianDiffusion(objective="score")
    with pytest.raises(ValueError, match="loss_weighting"):
        GaussianDiffusion(loss_weighting="p2")
    d = GaussianDiffusion(10)
    model = lambda x, t, **kw: x  # noqa: E731
    with pytest.raises(ValueError, match="sampler"):
        d.sample(model, (1, 2), sampler="euler")
    with pytest.raises(ValueError, match="clip_x0"):
        d.sample(model, (1, 2), clip_x0="soft")
    with pytest.raises(ValueError):
        d.sample(model, (1, 2), steps=11)
    with pytest.raises(ValueError, match="noise"):
        d.sample(model, (1, 2), noise=torch.zeros(2, 2))


def test_the_prior_and_the_decoder_follow_the_conditioning_contract():
    """The sampler prepares the conditioning once for networks that declare it (PreparesConditioning)."""
    assert issubclass(UNet, PreparesConditioning) and issubclass(PriorNetwork, PreparesConditioning)
    assert not isinstance(lambda x_t, t: x_t, PreparesConditioning)
