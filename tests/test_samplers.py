"""DPM-Solver++(2M), guidance in a limited interval and per-image generators, against closed forms. CPU, seconds."""
import pytest
import torch

from dalle2.diffusion import GaussianDiffusion, _randn, classifier_free_guidance, step_model

SHAPES = [(6, 8), (3, 2, 4, 4)]  # the prior's (N, D) and the decoder's (N, C, H, W)


def gaussian_model(diffusion, mu, s):
    """The exact denoiser for data x0 ~ N(mu, s^2 I) (mu broadcasts against a row): with a = sqrt(abar),
    x_t ~ N(a mu, (a^2 s^2 + 1 - abar) I) and E[x0 | x_t] = mu + a s^2 / (a^2 s^2 + 1 - abar) (x_t - a mu),
    returned as the diffusion's objective."""
    abar_all = diffusion.alphas_cumprod

    def fn(x_t, t, **kwargs):
        abar = abar_all[t.cpu()].to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))
        a = abar.sqrt()
        x0 = mu + a * s ** 2 / (abar * s ** 2 + 1 - abar) * (x_t - a * mu)
        eps = (x_t - a * x0) / (1 - abar).sqrt()
        return {"eps": eps, "x0": x0, "v": a * eps - (1 - abar).sqrt() * x0}[diffusion.objective]

    return fn


def gaussian_ode_solution(diffusion, mu, s, x_T):
    """Where the probability-flow ODE takes x_T (at t = T-1), read out as the sampler's output E[x0 | x_0]
    at t = 0. The marginals stay N(a_t mu, v_t I), v_t = a_t^2 s^2 + 1 - abar_t, and the ODE's flow is
    affine with a scalar gain, so it keeps the standardised coordinate z = (x_t - a_t mu) / sqrt(v_t)."""
    abar = diffusion.alphas_cumprod
    v = abar * s ** 2 + 1 - abar
    z = (x_T - abar[-1].sqrt() * mu) / v[-1].sqrt()
    return mu + abar[0].sqrt() * s ** 2 / v[0].sqrt() * z


def rms(a, b):
    return (a - b).pow(2).mean().sqrt().item()


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_dpmpp2m_is_far_closer_to_the_ode_solution_than_ddim(objective):
    """Gaussian data, its exact denoiser, the project's cosine schedule: DPM-Solver++(2M) at 10-20 steps is
    several times closer to the exact probability-flow solution than DDIM at the same steps (20 steps of
    it beat 50 of DDIM), and both converge to it (which checks the reference)."""
    d = GaussianDiffusion(1000, "cosine", objective=objective)
    mu, s = torch.linspace(-0.5, 0.5, 16, dtype=torch.float64), 0.5
    x_T = torch.randn(64, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = gaussian_ode_solution(d, mu, s, x_T)
    model = gaussian_model(d, mu, s)
    err = {(sampler, steps): rms(d.sample(model, x_T.shape, steps=steps, sampler=sampler, noise=x_T), exact)
           for sampler in ("ddim", "dpmpp2m") for steps in (10, 20, 50, 1000 if objective == "eps" else 50)}
    if objective == "eps":  # (the objectives only change how the same x0 is expressed)
        assert err["ddim", 1000] < 2e-3 and err["dpmpp2m", 1000] < 1e-4
    assert err["dpmpp2m", 10] < err["ddim", 10] / 2
    assert err["dpmpp2m", 20] < err["ddim", 20] / 5
    assert err["dpmpp2m", 20] < err["ddim", 50] / 3


def test_dpmpp2m_first_step_is_ddim_and_one_step_returns_x0():
    """A one-step chain returns the model's x0 at T-1. The first update and the one into t = 0 are first
    order, and first-order DPM-Solver++ is DDIM with eta = 0: chains of 2 and 3 steps equal DDIM's, and
    4 steps (one second-order update) do not."""
    d = GaussianDiffusion(100, "cosine", objective="eps")
    model = gaussian_model(d, torch.tensor(0.2, dtype=torch.float64), 0.7)
    x_T = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for steps in (1, 2, 3):
        torch.testing.assert_close(d.sample(model, x_T.shape, steps=steps, sampler="dpmpp2m", noise=x_T),
                                   d.sample(model, x_T.shape, steps=steps, sampler="ddim", noise=x_T))
    four = d.sample(model, x_T.shape, steps=4, sampler="dpmpp2m", noise=x_T)
    assert not torch.allclose(four, d.sample(model, x_T.shape, steps=4, sampler="ddim", noise=x_T))
    one_step_x0 = model(x_T, torch.full((5,), 99))  # eps at T-1 -> x0
    abar = d.alphas_cumprod[-1]
    torch.testing.assert_close(d.sample(model, x_T.shape, steps=1, sampler="dpmpp2m", noise=x_T),
                               (x_T - (1 - abar).sqrt() * one_step_x0) / abar.sqrt())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_dpmpp2m_shapes_determinism_and_ideal_denoiser(shape, objective):
    """(N, D) and (N, C, H, W); same generator seed -> same samples, whatever eta says; a denoiser that
    knows x0 gets x0 back."""
    d = GaussianDiffusion(200, "cosine", objective=objective)
    x0_true = torch.rand(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 1.8 - 0.9
    abar_all = d.alphas_cumprod

    def ideal(x_t, t, **kw):
        abar = abar_all[t.cpu()].to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))
        eps = (x_t - abar.sqrt() * x0_true) / (1 - abar).sqrt()
        return {"eps": eps, "x0": x0_true, "v": abar.sqrt() * eps - (1 - abar).sqrt() * x0_true}[objective]

    noise = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = d.sample(ideal, shape, steps=12, sampler="dpmpp2m", noise=noise)
    assert out.shape == shape
    torch.testing.assert_close(out, x0_true, atol=1e-6, rtol=0)
    run = lambda seed, eta=0.0: d.sample(lambda x, t, **kw: 0.3 * x, shape, steps=7, sampler="dpmpp2m",  # noqa: E731
                                         eta=eta, generator=torch.Generator().manual_seed(seed))
    assert run(4).shape == shape and run(4).dtype == torch.float32
    assert torch.equal(run(4), run(4)) and torch.equal(run(4), run(4, eta=1.0))
    assert not torch.equal(run(4), run(5))


@pytest.mark.parametrize("clip_x0", ["static", "dynamic"])
def test_dpmpp2m_clips_every_x0_prediction(clip_x0):
    """The x0 each step uses (and the result) is clipped: a model predicting x0 far outside [-1, 1]."""
    d = GaussianDiffusion(100, "cosine", objective="x0")
    out, preds = d.sample(lambda x, t, **kw: 3.0 * x + 2.0, (4, 2, 3, 3), steps=8, sampler="dpmpp2m",
                          clip_x0=clip_x0, return_x0=True, generator=torch.Generator().manual_seed(0))
    assert preds.shape == (8, 4, 2, 3, 3)
    assert preds.abs().max() <= 1.0 + 1e-6 and out.abs().max() <= 1.0 + 1e-6
    unclipped = d.sample(lambda x, t, **kw: 3.0 * x + 2.0, (4, 2, 3, 3), steps=8, sampler="dpmpp2m",
                         generator=torch.Generator().manual_seed(0))
    assert unclipped.abs().max() > 1.5


class ToyPreparedModel:
    """out = 0.5 x + t/100 + cond, cond = emb (or a learned null where dropped) prepared once; records
    the rows of every call and how often the conditioning is prepared."""

    def __init__(self):
        self.calls, self.prepared = [], 0
        self.null = torch.tensor([0.3, -0.2, 0.1, 0.0])

    def prepare_conditioning(self, emb, cond_drop=None):
        self.prepared += 1
        cond = emb if cond_drop is None else torch.where(cond_drop[:, None], self.null.expand_as(emb), emb)
        return {"cond": cond}

    def __call__(self, x_t, t, cond=None, **kw):
        if cond is None:
            cond = self.prepare_conditioning(**kw)
        self.calls.append(x_t.shape[0])
        return 0.5 * x_t + t[:, None].float() / 100 + cond["cond"]


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp2m"])
def test_guided_dpmpp2m_through_step_model(sampler):
    """The prepared-conditioning, classifier-free-guidance path: one batched 2N-row call per step, the
    conditioning prepared once, and the same samples as guiding each call separately."""
    d = GaussianDiffusion(50, "cosine", objective="eps")
    kw = dict(emb=torch.randn(3, 4, generator=torch.Generator().manual_seed(0)) * 0.1)
    noise = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    m = ToyPreparedModel()
    a = d.sample(m, (3, 4), steps=6, sampler=sampler, noise=noise, model_kwargs=kw, guidance_scale=3.0)
    assert m.calls == [6] * 6 and m.prepared == 1
    b = d.sample(classifier_free_guidance(ToyPreparedModel(), 3.0), (3, 4), steps=6, sampler=sampler, noise=noise,
                 model_kwargs=kw)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, d.sample(m, (3, 4), steps=6, sampler=sampler, noise=noise, model_kwargs=kw))


# ---- guidance in a limited interval ------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp2m"])
def test_guidance_interval(sampler):
    """The whole interval is today's guided output exactly; an interval holding no step is the unguided
    (scale 1) output exactly; in between, steps outside the interval run the N conditional rows only."""
    d = GaussianDiffusion(50, "cosine", objective="eps")  # 5 steps keep t = 0, 12, 25, 37, 49
    kw = dict(emb=torch.randn(2, 4, generator=torch.Generator().manual_seed(0)) * 0.2)

    def run(scale, interval=None, model=None):
        m = model or ToyPreparedModel()
        out = d.sample(m, (2, 4), steps=5, sampler=sampler, model_kwargs=kw, guidance_scale=scale,
                       guidance_interval=interval, generator=torch.Generator().manual_seed(1))
        return out, m

    guided, m = run(3.0)
    assert m.calls == [4] * 5
    assert torch.equal(run(3.0, [0.0, 1.0])[0], guided)
    unguided, _ = run(1.0)
    none, m = run(3.0, [0.3, 0.4])  # t/(T-1) = 0, .245, .51, .755, 1: none inside
    assert torch.equal(none, unguided) and m.calls == [2] * 5
    middle, m = run(3.0, [0.25, 0.8])  # guides t = 25 and 37 only (sampled from t = 49 down)
    assert m.calls == [2, 4, 4, 2, 2] and m.prepared == 2  # the 2N-row and the N-row conditioning, once each
    assert not torch.allclose(middle, guided) and not torch.allclose(middle, unguided)


def test_guidance_interval_validation():
    d = GaussianDiffusion(10)
    for bad in ([0.5, 0.2], [0.0, 1.5], [-0.1, 0.5], [0.1], "ab"):
        with pytest.raises(ValueError, match="guidance_interval"):
            d.sample(lambda x, t, **kw: x, (1, 2), guidance_interval=bad)


# ---- per-image generators and lean networks --------------------------------------------------------------


def test_per_row_generators_draw_each_group_on_its_own():
    gens = lambda: [torch.Generator().manual_seed(s) for s in (7, 8, 9)]  # noqa: E731
    x = _randn((6, 2, 3), gens(), "cpu", torch.float32)  # two rows per generator
    for i, g in enumerate(gens()):
        torch.testing.assert_close(x[2 * i:2 * i + 2], torch.randn((2, 2, 3), generator=g), rtol=0, atol=0)
    with pytest.raises(ValueError, match="equal groups"):
        _randn((4, 2), gens(), "cpu", torch.float32)


@pytest.mark.parametrize("sampler,eta", [("ddim", 1.0), ("ddpm", 0.0), ("dpmpp2m", 0.0)])
def test_a_row_samples_the_same_alone_or_in_a_batch(sampler, eta):
    """With one generator per row, a row's initial and per-step noise, hence its sample, does not depend
    on the batch it is in (a row-wise model)."""
    d = GaussianDiffusion(50, "cosine", objective="eps")
    model = lambda x, t, **kw: 0.5 * x  # noqa: E731
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    batch = d.sample(model, (3, 2, 2, 2), steps=6, sampler=sampler, eta=eta, generator=gens([5, 6, 7]))
    for i, seed in enumerate([5, 6, 7]):
        alone = d.sample(model, (1, 2, 2, 2), steps=6, sampler=sampler, eta=eta, generator=gens([seed]))
        torch.testing.assert_close(alone[0], batch[i], rtol=0, atol=1e-6)


class BF16Net(torch.nn.Module):
    """A network whose weights may be cast; fails loudly if its inputs are not in its weights' dtype."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)
        self.emb = torch.nn.Linear(4, 2)

    def forward(self, x_t, t, emb=None, cond_drop=None):
        assert x_t.dtype == self.conv.weight.dtype and emb.dtype == self.emb.weight.dtype
        h = self.emb(emb)
        if cond_drop is not None:
            h = torch.where(cond_drop[:, None], torch.zeros_like(h), h)
        return self.conv(x_t) * 0.1 + h[:, :, None, None]


def test_networks_with_bf16_weights_get_bf16_inputs_and_float32_arithmetic():
    """step_model hands a bf16 network its inputs in bf16 (channels_last when its weights are) and the
    sampler keeps float32: bf16 sampling stays near the float32 result."""
    torch.manual_seed(0)
    net = BF16Net()
    d = GaussianDiffusion(50, "cosine", objective="eps")
    kw = dict(emb=torch.randn(3, 4))
    run = lambda: d.sample(net, (3, 2, 4, 4), steps=5, sampler="dpmpp2m", model_kwargs=kw,  # noqa: E731
                           guidance_scale=2.0, clip_x0="static", generator=torch.Generator().manual_seed(0))
    fp32 = run()
    net.to(torch.bfloat16, memory_format=torch.channels_last)
    x = torch.randn(3, 2, 4, 4)
    seen = []
    net.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(args[0]), with_kwargs=True)
    step_model(net, 2.0, kw, 3)(x, torch.zeros(3, dtype=torch.long))
    assert seen[0].dtype == torch.bfloat16 and seen[0].is_contiguous(memory_format=torch.channels_last)
    bf16 = run()
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, atol=0.05, rtol=0.05)


def test_guidance_interval_config_is_checked_at_load_time():
    from dalle2.core.config import ConfigError, load_config
    assert load_config().sampling.guidance_interval == [0.0, 1.0]
    assert load_config(overrides=["sampling.guidance_interval=[0.2, 0.8]"]).sampling.guidance_interval == [0.2, 0.8]
    for bad in ("[0.8, 0.2]", "[0.2, 1.5]", "[0.5]", "[-0.1, 0.5]"):
        with pytest.raises(ConfigError, match="sampling.guidance_interval"):
            load_config(overrides=[f"sampling.guidance_interval={bad}"])
    with pytest.raises(ConfigError, match="sampling.sampler"):
        load_config(overrides=["sampling.sampler=euler"])
    assert load_config(overrides=["sampling.sampler=dpmpp2m"]).sampling.sampler == "dpmpp2m"
