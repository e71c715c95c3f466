"""Gaussian diffusion: one process for the prior (x: (N, D)) and the decoder (x: (N, C, H, W)).

In the style of openai/guided-diffusion, the process never owns the network. Every method that needs
one takes a model function `model(x_t, t, **model_kwargs) -> out` as an argument, where `t` is the
integer timestep (N,) of the ORIGINAL T-step schedule and `out` is the network's prediction of the
configured objective ("eps", "x0" or "v"). All per-timestep arrays are float64 tensors on the CPU,
gathered and broadcast to any rank by `_extract`; arithmetic runs in float32 (float64 when x is
float64), also when the model runs under autocast.

    diffusion = GaussianDiffusion(timesteps=1000, schedule="cosine", objective="v")
    loss = diffusion.training_loss(model, x0, model_kwargs={"text": tokens}).mean()
    x0 = diffusion.sample(model, (16, 3, 32, 32), steps=50, model_kwargs=..., guidance_scale=3.0)

Fast sampling uses a respaced copy of the process (`respace(steps)`, guided-diffusion's SpacedDiffusion):
it keeps alpha-bar at a subset of timesteps, so the same trained model serves any number of steps.

References: DDPM (Ho et al. 2020), DDIM (Song et al. 2021), improved DDPM (Nichol & Dhariwal 2021),
v-prediction (Salimans & Ho 2022), Imagen dynamic thresholding (Saharia et al. 2022),
Min-SNR weighting (Hang et al. 2023), classifier-free guidance (Ho & Salimans 2022), DPM-Solver++
(Lu et al. 2022), guidance in a limited interval (Kynkaanniemi et al. 2024).
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Optional, Protocol, runtime_checkable

import torch

from dalle2.core.config import DiffusionConfig

OBJECTIVES = ("eps", "x0", "v")
SCHEDULES = ("cosine", "linear")
LOSS_WEIGHTINGS = ("plain", "min_snr")
SAMPLERS = ("ddim", "ddpm", "dpmpp2m")
CLIPPINGS = (None, "none", "static", "dynamic")  # "none" (the config's spelling) = None


# ----------------------------------------------------------------------------------------------------
# Schedules and helpers


def make_beta_schedule(schedule: str, timesteps: int) -> torch.Tensor:
    """Betas (T,) float64.

    cosine: Nichol & Dhariwal 2021 eq. 17, abar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2) with s = 0.008,
        beta_t = 1 - abar(t+1)/abar(t) clipped to 0.999 (the end of the schedule would otherwise be
        singular).
    linear: Ho et al. 2020, 1e-4..0.02 for T = 1000, scaled by 1000/T so that any T gives a similar
        abar curve (guided-diffusion). Clipped to 0.999 too, which only matters for T <= 20.
    """
    if schedule == "cosine":
        s = 0.008
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = 1 - f[1:] / f[:-1]
    elif schedule == "linear":
        scale = 1000 / timesteps
        betas = torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return betas.clamp(max=0.999)


def respaced_timesteps(T: int, steps: int) -> torch.Tensor:
    """The original timesteps kept by a `steps`-step sampler, increasing, (steps,) int64.

    k_i = round(i * (T - 1) / (steps - 1)), i = 0..steps-1: evenly spaced, always including T-1 (the
    first sampling step, where x_T ~ N(0, I) is a good approximation) and 0 (the last step, where the
    model's x0 prediction is most accurate). steps == T keeps every step; steps == 1 keeps only T-1.
    Integer arithmetic (round half up), so the values are exact and distinct for any 1 <= steps <= T.
    """
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got {steps}")
    if steps == 1:
        return torch.tensor([T - 1], dtype=torch.long)
    i = torch.arange(steps, dtype=torch.long)
    return (2 * i * (T - 1) + (steps - 1)) // (2 * (steps - 1))


def _on(arr: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    """`arr` on `device` in `dtype`, converted once per array. The schedule arrays live on the CPU in
    float64; converting them on every call would put a host-to-device copy into every training and
    sampling step (and a pageable copy makes the CPU wait for the GPU). The copies are kept in a plain
    dict on the array itself: torch.compile traces that lookup, so a compiled training step has no
    graph break here (a WeakIdKeyDictionary, used before, broke the graph at every call)."""
    copies = getattr(arr, "_device_copies", None)
    if copies is None:
        copies = arr._device_copies = {}
    key = (torch.device(device), dtype)
    if key not in copies:
        copies[key] = arr.to(device=device, dtype=dtype)
    return copies[key]


def _extract(arr: torch.Tensor, t: torch.Tensor, x_shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gather arr[t] and reshape to broadcast against x. arr: (T,) float64 on CPU; t: (N,) long.
    Returns (N, 1, ..., 1) with len(x_shape) dims, in `dtype` on t's device."""
    out = _on(arr, t.device, dtype)[t]
    return out.view(t.shape[0], *([1] * (len(x_shape) - 1)))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # float32 for half/bfloat16/float32 inputs (autocast-safe); float64 stays float64 (exact tests).
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _randn(shape, generator, device, dtype) -> torch.Tensor:
    # Draw on the generator's device so a CPU generator gives the same numbers whatever the model's
    # device is, then move. A list of G generators draws rows in G equal groups, group g from
    # generator g (one generator per image: its noise does not depend on the rest of the batch).
    if isinstance(generator, (list, tuple)):
        if not generator or shape[0] % len(generator):
            raise ValueError(f"{len(generator)} generators cannot draw {shape[0]} rows in equal groups")
        rows = (shape[0] // len(generator), *tuple(shape)[1:])
        return torch.cat([torch.randn(rows, generator=g, device=g.device, dtype=dtype) for g in generator]).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device)


def dynamic_threshold(x0: torch.Tensor, quantile: float = 0.995) -> torch.Tensor:
    """Imagen dynamic thresholding (Saharia et al. 2022, Sec. 2.3). x0: (N, ...).
    s = quantile of |x0| per sample, s = max(s, 1); x0 -> clamp(x0, -s, s) / s. Samples already within
    [-1, 1] give s = 1 and are returned unchanged."""
    flat = x0.reshape(x0.shape[0], -1).abs()  # (N, K)
    s = torch.quantile(flat.float(), quantile, dim=1).to(x0.dtype).clamp(min=1.0)
    s = s.view(-1, *([1] * (x0.dim() - 1)))  # (N, 1, ..., 1)
    return torch.maximum(torch.minimum(x0, s), -s) / s


def check_guidance_interval(interval) -> tuple[float, float]:
    """(lo, hi) from None (the whole schedule: (0, 1)) or a pair 0 <= lo <= hi <= 1; else ValueError."""
    if interval is None:
        return 0.0, 1.0
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"guidance_interval must be [lo, hi], got {interval!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"guidance_interval must have 0 <= lo <= hi <= 1, got {list(interval)}")
    return lo, hi


def _dpmpp2m_step(x: torch.Tensor, x0: torch.Tensor, abar: float, abar_next: float, previous):
    """One step of DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2: multistep, second order, data
    prediction) from noise level abar to the less noisy abar_next, both < 1, python floats (float64).

    With alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma) and h = lambda_next -
    lambda > 0: x_next = (sigma_next / sigma) x - alpha_next (e^-h - 1) D, where D = x0 on the first step
    (first order, which is DDIM with eta = 0) and afterwards D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev with
    r = h_prev / h, x0_prev the previous step's (clipped) x0 prediction. x, x0: (N, ...). `sample` also
    takes the update into t = 0 first order and returns the x0 predicted there.
    previous: None on the first step, else what the last call returned. Returns (x_next, previous)."""
    lam, lam_next = (0.5 * math.log(a / (1.0 - a)) for a in (abar, abar_next))
    h = lam_next - lam
    d = x0
    if previous is not None:
        x0_prev, h_prev = previous
        r = h_prev / h
        d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
    ratio = math.sqrt((1.0 - abar_next) / (1.0 - abar))
    return ratio * x - math.sqrt(abar_next) * math.expm1(-h) * d, (x0, h)


def _input_format(model: Callable):
    """(dtype, channels_last) the network's weights ask of its floating inputs: dtype is the half/bf16
    dtype of the weights (sampling casts the networks, `DALLE2.lean`), None for float32/float64 weights
    and plain functions (inputs keep theirs); channels_last: its 4-d weights are in that memory format."""
    params = getattr(model, "parameters", None)
    if not callable(params):
        return None, False
    dtype, channels_last = None, False
    for i, p in enumerate(params()):
        if i == 0 and p.dtype in (torch.float16, torch.bfloat16):
            dtype = p.dtype
        if p.dim() == 4:
            cl, contiguous = p.is_contiguous(memory_format=torch.channels_last), p.is_contiguous()
            if cl != contiguous:  # (a 1x1 kernel is both: it does not tell)
                channels_last = cl
                break
    return dtype, channels_last


@runtime_checkable
class PreparesConditioning(Protocol):
    """The conditioning contract between the sampler and a network (the prior's and the decoder's follow
    it): `prepare_conditioning(**model_kwargs)` does, once per sample, the work that does not depend on
    x_t or t (caption encoders, context keys/values) and returns a dict; each step is then
    `net(x_t, t, cond=that dict)`. A network without it is called `net(x_t, t, **model_kwargs)`."""

    def prepare_conditioning(self, **model_kwargs) -> dict: ...

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, *, cond: dict) -> torch.Tensor: ...


def step_model(model: Callable, scale: float, model_kwargs: Optional[dict], n: int) -> Callable:
    """The function a sampling loop calls at every step, fn(x_t, t, guide=True) -> out, for `model(x_t, t,
    **model_kwargs, cond_drop=...)` with classifier-free guidance (Ho & Salimans 2022) at `scale`.

    Guidance is ONE batched forward: every tensor kwarg with leading dim N is concatenated with itself
    (2N rows), other kwargs pass through, and cond_drop = [False]*N + [True]*N makes the second half
    unconditional (a `cond_drop` already in model_kwargs is kept for the conditional half); fn returns
    out_u + scale * (out_c - out_u), whatever the objective. scale == 1 is one plain conditional call.
    guide=False (a step outside the guidance interval, Kynkaanniemi et al. 2024) is that plain
    conditional call on the N rows only, as at scale 1.

    A model that follows `PreparesConditioning` (the prior and the decoder) has the work that does not
    depend on x_t or t (caption encoders, context keys/values) done once here; every step is then
    `model(x_t, t, cond=cond)`. A network with bf16/half weights gets its floating inputs in that
    dtype (and 4-d x_t in channels_last when its weights are), so no autocast is needed around it.
    """
    kwargs = dict(model_kwargs or {})
    in_dtype, channels_last = _input_format(model)
    if in_dtype is not None:
        kwargs = {k: v.to(in_dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}

    def net_input(x):  # one conversion kernel at most; none for float32 networks
        fmt = torch.channels_last if channels_last and x.dim() == 4 else torch.preserve_format
        return x.to(dtype=in_dtype or x.dtype, memory_format=fmt)

    plain = kwargs  # the conditional rows alone (scale 1, or steps outside the guidance interval)
    if scale != 1.0:
        # On the conditioning's device (the model's, or the CPU for a model without tensor kwargs).
        device = next((v.device for v in kwargs.values() if torch.is_tensor(v)), torch.device("cpu"))
        cond_drop = kwargs.pop("cond_drop", None)
        cond_drop = torch.zeros(n, dtype=torch.bool, device=device) if cond_drop is None else cond_drop.bool()
        kwargs = {k: torch.cat([v, v]) if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n else v
                  for k, v in kwargs.items()}
        kwargs["cond_drop"] = torch.cat([cond_drop, torch.ones_like(cond_drop)])  # (2N,)
    prepare = model.prepare_conditioning if isinstance(model, PreparesConditioning) else None
    if prepare is not None:
        kwargs = {"cond": prepare(**kwargs)}
    if scale == 1.0:
        return lambda x_t, t, guide=True: model(net_input(x_t), t, **kwargs)

    prepared_plain = []  # prepared on the first unguided step only (none when every step is guided)

    def guided(x_t, t, guide=True):
        if not guide:
            if not prepared_plain:
                prepared_plain.append({"cond": prepare(**plain)} if prepare is not None else plain)
            return model(net_input(x_t), t, **prepared_plain[0])
        x_in = net_input(x_t)
        out = model(torch.cat([x_in, x_in]), torch.cat([t, t]), **kwargs)
        if out.dtype in (torch.float16, torch.bfloat16):
            out = out.float()  # the difference out_c - out_u is small: take it in float32
        out_c, out_u = out.chunk(2)
        return out_u + scale * (out_c - out_u)

    return guided


def classifier_free_guidance(model: Callable, scale: float) -> Callable:
    """`step_model` for one call: fn(x_t, t, **kwargs) -> the guided output (see step_model)."""
    def fn(x_t, t, **kwargs):
        return step_model(model, scale, kwargs, x_t.shape[0])(x_t, t)
    return fn


# ----------------------------------------------------------------------------------------------------
# The process


class GaussianDiffusion:
    """The forward process q(x_t | x_0), its posterior, the training loss and the DDPM, DDIM and
    DPM-Solver++(2M) samplers.

    timesteps: T, the number of diffusion steps of the training process.
    schedule: "cosine" (Nichol & Dhariwal 2021) or "linear" (Ho et al. 2020), see make_beta_schedule.
    objective: what the model predicts: "eps" (noise), "x0" (clean data) or "v" = sqrt(abar) eps -
        sqrt(1 - abar) x0 (Salimans & Ho 2022).
    loss_weighting: "plain" (unweighted MSE on the objective) or "min_snr" (Hang et al. 2023: the loss
        weight in x0 space is min(snr, gamma), i.e. min(snr, gamma)/snr for eps, min(snr, gamma) for x0,
        min(snr, gamma)/(snr + 1) for v).
    min_snr_gamma: gamma of Min-SNR weighting.

    A respaced copy (`respace`) has num_timesteps = its number of steps, indices 0..steps-1 into its own
    chain, and `timestep_map` giving the original timestep of each index: the model always receives
    original timesteps.
    """

    def __init__(self, timesteps: int = DiffusionConfig.timesteps, schedule: str = DiffusionConfig.schedule,
                 objective: str = DiffusionConfig.objective, loss_weighting: str = DiffusionConfig.loss_weighting,
                 min_snr_gamma: float = DiffusionConfig.min_snr_gamma):  # defaults: one source, the config
        if int(timesteps) != timesteps or timesteps < 1:
            raise ValueError(f"timesteps must be a positive integer, got {timesteps!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {loss_weighting!r}")
        if not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma!r}")
        self.schedule = schedule
        self.objective = objective
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = float(min_snr_gamma)
        timesteps = int(timesteps)
        self._set_alphas(1.0 - make_beta_schedule(schedule, timesteps), torch.arange(timesteps))

    def _set_alphas(self, alphas: torch.Tensor, timestep_map: torch.Tensor) -> None:
        """Precompute every per-step array (T,) float64 from alpha_t = 1 - beta_t (DDPM eqs. 4, 6, 7).
        Taking alphas rather than betas keeps tiny alpha-bars exact to float64 precision after respacing."""
        alphas = alphas.to(torch.float64)
        self.betas = 1.0 - alphas
        self.timestep_map = timestep_map.long()
        self.num_timesteps = len(alphas)
        self._respaced = {}
        abar = torch.cumprod(alphas, dim=0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        self.alphas_cumprod, self.alphas_cumprod_prev = abar, abar_prev
        self.sqrt_alphas_cumprod = abar.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - abar).sqrt()
        self.snr = abar / (1.0 - abar)

        # q(x_{t-1} | x_t, x_0) = N(c0 x_0 + ct x_t, var) (DDPM eq. 7). var_0 = 0, so its log is clipped
        # to var_1 (guided-diffusion); it is only used where t > 0 anyway.
        self.posterior_variance = self.betas * (1.0 - abar_prev) / (1.0 - abar)
        if self.num_timesteps > 1:
            var = torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        else:
            var = self.posterior_variance.clamp(min=1e-20)
        self.posterior_log_variance_clipped = var.log()
        self.posterior_mean_coef_x0 = self.betas * abar_prev.sqrt() / (1.0 - abar)
        self.posterior_mean_coef_xt = (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar)

        # Model output -> (x0, eps) as x0 = a x_t + b out, eps = c x_t + d out, precomputed per step so the
        # samplers handle every objective with the same two lines.
        sa, s1 = self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod
        zero, one = torch.zeros_like(sa), torch.ones_like(sa)
        if self.objective == "eps":
            coefs = (1.0 / sa, -s1 / sa, zero, one)
        elif self.objective == "x0":
            coefs = (zero, one, 1.0 / s1, -sa / s1)
        else:  # v = sa eps - s1 x0, x_t = sa x0 + s1 eps  =>  x0 = sa x_t - s1 v, eps = s1 x_t + sa v
            coefs = (sa, -s1, s1, sa)
        self._out_to_x0, self._out_to_eps = coefs[:2], coefs[2:]

    def respace(self, steps: int) -> "GaussianDiffusion":
        """A copy of this process on `respaced_timesteps(T, steps)` (cached). It keeps alpha-bar at the kept
        steps and recomputes the betas between them: beta_i = 1 - abar[k_i] / abar[k_{i-1}], beta_0 =
        1 - abar[k_0] (guided-diffusion's SpacedDiffusion; DDIM, Song et al. 2021, Sec. 4.2)."""
        if steps == self.num_timesteps:
            return self
        if steps not in self._respaced:
            kept = respaced_timesteps(self.num_timesteps, steps)
            abar = self.alphas_cumprod[kept]
            spaced = copy.copy(self)
            spaced._set_alphas(abar / torch.cat([abar.new_ones(1), abar[:-1]]), self.timestep_map[kept])
            self._respaced[steps] = spaced
        return self._respaced[steps]

    def _model_t(self, t: torch.Tensor) -> torch.Tensor:
        """Indices of this chain -> original timesteps (N,) given to the model."""
        return _on(self.timestep_map, t.device, torch.long)[t]

    # ---- forward process --------------------------------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x0, (1 - abar_t) I) (DDPM eq. 4).
        x0: (N, ...); t: (N,) long; noise: like x0 (standard normal if None). Returns like x0."""
        if noise is None:
            noise = torch.randn_like(x0)
        dt = _compute_dtype(x0)
        return (_extract(self.sqrt_alphas_cumprod, t, x0.shape, dt) * x0
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape, dt) * noise)

    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor):
        """Moments of q(x_t | x_0). Returns mean like x0 and variance (N, 1, ..., 1)."""
        dt = _compute_dtype(x0)
        return (_extract(self.sqrt_alphas_cumprod, t, x0.shape, dt) * x0,
                _extract(1.0 - self.alphas_cumprod, t, x0.shape, dt))

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Moments of q(x_{t-1} | x_t, x_0) (DDPM eqs. 6-7). x0, x_t: (N, ...); t: (N,).
        Returns (mean like x0, variance (N, 1, ..., 1), clipped log-variance (N, 1, ..., 1))."""
        dt = _compute_dtype(x_t)
        mean = (_extract(self.posterior_mean_coef_x0, t, x_t.shape, dt) * x0
                + _extract(self.posterior_mean_coef_xt, t, x_t.shape, dt) * x_t)
        return (mean, _extract(self.posterior_variance, t, x_t.shape, dt),
                _extract(self.posterior_log_variance_clipped, t, x_t.shape, dt))

    # ---- conversions between x0, eps and v (x_t = sqrt(abar) x0 + sqrt(1 - abar) eps) -----------------

    def predict_x0_from_eps(self, x_t, t, eps):
        dt = _compute_dtype(x_t)
        return (x_t - _extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape, dt) * eps) \
            / _extract(self.sqrt_alphas_cumprod, t, x_t.shape, dt)

    def predict_eps_from_x0(self, x_t, t, x0):
        dt = _compute_dtype(x_t)
        return (x_t - _extract(self.sqrt_alphas_cumprod, t, x_t.shape, dt) * x0) \
            / _extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape, dt)

    def predict_x0_from_v(self, x_t, t, v):
        dt = _compute_dtype(x_t)
        return (_extract(self.sqrt_alphas_cumprod, t, x_t.shape, dt) * x_t
                - _extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape, dt) * v)

    def predict_v(self, x0, t, noise):
        """v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022, Sec. 4)."""
        dt = _compute_dtype(x0)
        return (_extract(self.sqrt_alphas_cumprod, t, x0.shape, dt) * noise
                - _extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape, dt) * x0)

    def model_output_to_x0_eps(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor):
        """The model's raw output for this objective -> (predicted x0, predicted eps), both like x_t.
        t indexes this chain."""
        dt = _compute_dtype(x_t)
        out = out.to(dt)
        a, b = (_extract(c, t, x_t.shape, dt) for c in self._out_to_x0)
        c, d = (_extract(c, t, x_t.shape, dt) for c in self._out_to_eps)
        return a * x_t + b * out, c * x_t + d * out

    # ---- training -----------------------------------------------------------------------------------

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weight (N,) float32 for timesteps t of this chain (1 for "plain")."""
        if self.loss_weighting == "plain":
            return torch.ones(t.shape[0], device=t.device)
        snr = _on(self.snr, t.device, self.snr.dtype)[t]
        clipped = snr.clamp(max=self.min_snr_gamma)
        weight = {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[self.objective]
        return weight.float()

    def training_loss(self, model: Callable, x0: torch.Tensor, t: Optional[torch.Tensor] = None,
                      noise: Optional[torch.Tensor] = None, model_kwargs: Optional[dict] = None,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Per-sample weighted MSE between the model output and the objective's target. x0: (N, ...);
        t: (N,) (uniform in [0, T) if None); noise: like x0 (standard normal if None); generator draws
        t and noise. Returns (N,) float32; take .mean() for the batch loss."""
        model_kwargs = model_kwargs or {}
        n, device, dt = x0.shape[0], x0.device, _compute_dtype(x0)
        x0 = x0.to(dt)
        if t is None:
            gen_device = generator.device if generator is not None else device
            t = torch.randint(0, self.num_timesteps, (n,), generator=generator, device=gen_device).to(device)
        if noise is None:
            noise = _randn(x0.shape, generator, device, dt)
        noise = noise.to(dt)
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, self._model_t(t), **model_kwargs).to(dt)
        if self.objective == "eps":
            target = noise
        elif self.objective == "x0":
            target = x0
        else:
            target = self.predict_v(x0, t, noise)
        mse = ((out - target) ** 2).mean(dim=tuple(range(1, x0.dim())))  # (N,)
        return mse.float() * self.loss_weight(t)

    # ---- sampling -----------------------------------------------------------------------------------

    def _predict(self, model_fn, x, i: int, clip_x0, quantile, guide: bool = True):
        """One model call at index i of this chain -> (x0, eps), x0 clipped if asked and eps made consistent
        with the clipped x0 (so DDIM and DDPM move towards the clipped prediction). guide: see step_model."""
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        out = model_fn(x, self._model_t(t), guide)
        x0, eps = self.model_output_to_x0_eps(x, t, out)
        if clip_x0 not in (None, "none"):
            x0 = x0.clamp(-1.0, 1.0) if clip_x0 == "static" else dynamic_threshold(x0, quantile)
            eps = self.predict_eps_from_x0(x, t, x0)
        return t, x0, eps

    @staticmethod
    def _device(model, device, noise, generator):
        if device is not None:
            return torch.device(device)
        if noise is not None:
            return noise.device
        if isinstance(generator, (list, tuple)):  # per-image generators: where they draw says nothing
            generator = None
        params = getattr(model, "parameters", None)
        if callable(params):
            p = next(iter(params()), None)
            if p is not None:
                return p.device
        return generator.device if generator is not None else torch.device("cpu")

    @torch.no_grad()
    def sample(self, model: Callable, shape, *, steps: Optional[int] = None, sampler: str = "ddim",
               eta: float = 0.0, model_kwargs: Optional[dict] = None, generator: Optional[torch.Generator] = None,
               noise: Optional[torch.Tensor] = None, clip_x0: Optional[str] = None,
               dynamic_threshold_quantile: float = 0.995, guidance_scale: float = 1.0, progress: bool = False,
               return_x0: bool = False, device=None, guidance_interval=None,
               callback: Optional[Callable[[int], None]] = None):
        """Draw samples x0 of `shape` (N, ...) by running the reverse process from x_T ~ N(0, I).

        steps: number of respaced steps (None = all of this chain), any value 1..T; the model always gets
            original timesteps. sampler: "ddim" (Song et al. 2021 eq. 12 with eta; eta = 0 is
            deterministic given the initial noise), "ddpm" (ancestral sampling from the posterior
            q(x_{i-1} | x_i, x0_hat) of the respaced chain) or "dpmpp2m" (DPM-Solver++(2M), Lu et al.
            2022, deterministic, second order; see `_dpmpp2m_step`); eta is DDIM's only. The last step
            returns the predicted x0.
        clip_x0: None or "none", "static" (clamp predicted x0 to [-1, 1]) or "dynamic" (Imagen thresholding at
            `dynamic_threshold_quantile`); only the predicted x0 is clipped, never x_t.
        generator: draws the initial noise (unless `noise` is given) and the per-step noise, batched, on
            the generator's device; or a list of G generators, one per group of N/G consecutive rows (one
            per image: its noise is then the same whatever else is in the batch).
            guidance_scale and the per-step model calls: see `step_model`.
        guidance_interval: (lo, hi), guidance only at the steps whose original timestep t has
            lo <= t / (T - 1) <= hi (Kynkaanniemi et al. 2024); elsewhere one conditional call on N rows.
            None = (0, 1), every step.
        callback: called with the chain index i after each step (progress bars).
        device: where x_t lives (default: noise's device, else the model's parameters', else generator's).
        return_x0: also return the predicted x0 of every step, (S, *shape) on the CPU, first step first.
        Returns x0 (float32, or float64 if `noise` is float64), or (x0, predicted x0s) if return_x0.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if clip_x0 not in CLIPPINGS:
            raise ValueError(f"clip_x0 must be one of {CLIPPINGS}, got {clip_x0!r}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if noise is not None and tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
        lo, hi = check_guidance_interval(guidance_interval)
        proc = self if steps is None else self.respace(steps)
        model_fn = step_model(model, guidance_scale, model_kwargs, shape[0])
        device = self._device(model, device, noise, generator)
        dt = torch.float64 if noise is not None and noise.dtype == torch.float64 else torch.float32
        x = noise.to(device, dt) if noise is not None else _randn(shape, generator, device, dt)

        indices = range(proc.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm
            indices = tqdm(indices, desc=f"{sampler} sampling")
        kept = proc.timestep_map.tolist()  # original timesteps, python ints: no device sync per step
        guided = [lo <= k / max(kept[-1], 1) <= hi for k in kept]
        abar = proc.alphas_cumprod.tolist() if sampler == "dpmpp2m" else None
        preds, previous = [], None
        for i in indices:
            t, x0, eps = proc._predict(model_fn, x, i, clip_x0, dynamic_threshold_quantile, guided[i])
            if return_x0:
                preds.append(x0.cpu())
            if i == 0:
                x = x0  # the final step returns the (clipped) predicted x0
            elif sampler == "ddpm":
                mean, var, _ = proc.q_posterior(x0, x, t)  # var > 0 for i > 0
                x = mean + var.sqrt() * _randn(x.shape, generator, device, dt)
            elif sampler == "dpmpp2m":
                # The update into index 0 is first order too (diffusers' lower_order_final): t = 0 is
                # nearly clean, lambda jumps there, and extrapolating x0 linearly across the jump is far
                # worse (Gaussian data, exact denoiser, 20 cosine steps: 6x the error of first order).
                x, previous = _dpmpp2m_step(x, x0, abar[i], abar[i - 1], previous if i > 1 else None)
            else:
                x = proc._ddim_step(x0, eps, t, eta, generator)
            if callback is not None:
                callback(i)
        return (x, torch.stack(preds)) if return_x0 else x

    def _ddim_step(self, x0, eps, t, eta: float, generator):
        """DDIM update from index t to t-1 (Song et al. 2021 eqs. 12 and 16):
        x_{t-1} = sqrt(abar_{t-1}) x0 + sqrt(1 - abar_{t-1} - sigma^2) eps + sigma z,
        sigma = eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1})."""
        dt = x0.dtype
        abar = _extract(self.alphas_cumprod, t, x0.shape, dt)
        abar_prev = _extract(self.alphas_cumprod_prev, t, x0.shape, dt)
        x = abar_prev.sqrt() * x0
        if eta == 0:
            return x + (1.0 - abar_prev).sqrt() * eps
        sigma = eta * ((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev)).sqrt()
        x = x + (1.0 - abar_prev - sigma ** 2).clamp(min=0.0).sqrt() * eps
        return x + sigma * _randn(x0.shape, generator, x0.device, dt)

    @torch.no_grad()
    def ddim_invert(self, model: Callable, x0: torch.Tensor, *, steps: Optional[int] = None,
                    model_kwargs: Optional[dict] = None, guidance_scale: float = 1.0,
                    progress: bool = False) -> torch.Tensor:
        """Deterministic DDIM inversion (eta = 0): encode data x0 (N, ...) into the x_T from which
        `sample(..., sampler="ddim", eta=0, steps=steps, noise=x_T)` approximately reproduces it.

        The reverse of the DDIM step i -> i-1 needs the model at the unknown x_i; as usual we use it at the
        known x_{i-1} instead (Song et al. 2021, Sec. 4.3, and guided-diffusion's ddim_reverse_sample):
        x_i = sqrt(abar_i) x0_hat(x_{i-1}) + sqrt(1 - abar_i) eps_hat(x_{i-1}). The first step starts from
        the clean data (abar = 1), so x0_hat is the data itself and eps_hat comes from the model at k_0.
        The error vanishes as the steps get finer; with an exact denoiser it is zero.
        """
        proc = self if steps is None else self.respace(steps)
        model_fn = step_model(model, guidance_scale, model_kwargs, x0.shape[0])
        dt = _compute_dtype(x0)
        x = x0.to(dt)
        indices = range(proc.num_timesteps)
        if progress:
            from tqdm.auto import tqdm
            indices = tqdm(indices, desc="DDIM inversion")
        for i in indices:
            t_in = torch.full((x.shape[0],), max(i - 1, 0), device=x.device, dtype=torch.long)
            out = model_fn(x, proc._model_t(t_in))
            x0_hat, eps = proc.model_output_to_x0_eps(x, t_in, out)
            if i == 0:
                x0_hat = x  # clean data: x0 is known exactly
            t = torch.full_like(t_in, i)
            x = (_extract(proc.sqrt_alphas_cumprod, t, x.shape, dt) * x0_hat
                 + _extract(proc.sqrt_one_minus_alphas_cumprod, t, x.shape, dt) * eps)
        return x
