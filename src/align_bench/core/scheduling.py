"""Pure scheduler-step kernels with log-probabilities, and timestep grids.

The DDIM step is eq. 12/16 of Song et al., "Denoising Diffusion Implicit Models" (ICLR 2021) with the log-prob
convention of DDPO (Black et al., ICLR 2024); the LCM step is RLCM's (Oertell et al., RLC 2024) stochastic
multistep consistency sampler. docs/architecture.md ("Step kernels") lists where they differ from diffusers.

Every function takes the schedule explicitly: no `set_timesteps` global state is read anywhere. Timesteps may be
per sample (shape (B,)), so minibatches that mix steps of different trajectories work.

Shapes: B batch, C latent channels, h/w latent size.
  model_output, sample, prev_sample, noise: (B, C, h, w)
  timestep, prev_timestep:                  (B,) long (a python int is broadcast)
  alphas_cumprod:                           (T,) float32, ᾱ of the training schedule
  log_prob:                                 (B,) float32, per-element MEAN of the Gaussian log density over (C,h,w)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class StepOutput:
    prev_sample: torch.Tensor | None  # (B,C,h,w) x_{t'} in the sample's dtype (None: asked with draw=False)
    log_prob: torch.Tensor | None  # (B,) float32, log π(prev_sample | sample), per-element mean
    x0_pred: torch.Tensor  # (B,C,h,w) float32, the model's clean-latent prediction (LCM: the denoised d)
    mean: torch.Tensor  # (B,C,h,w) float32, mean of the transition Gaussian
    std: torch.Tensor  # (B,1,1,1) float32, its standard deviation


# ---------------------------------------------------------------------------------------------------------- grids
def timestep_grid(
    num_steps: int, spacing: str = "trailing", num_train_timesteps: int = 1000, steps_offset: int = 0
) -> torch.Tensor:
    """Descending DDIM timesteps τ_0 > … > τ_{N−1}, as diffusers' DDIMScheduler.set_timesteps builds them. (N,) long.

    leading:  τ = (N−1−k)·⌊T/N⌋ + offset   (SD 1.5 configs: offset 1 ⇒ N=1 gives [1], i.e. a useless 1-step grid)
    trailing: τ = round(T − k·T/N) − 1     (N=1 gives [999]; the grid for few-step evaluation)
    linspace: round(linspace(0, T−1, N)) reversed
    """
    if num_steps < 1 or num_steps > num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    T, N = num_train_timesteps, num_steps
    if spacing == "leading":
        ts = torch.arange(N - 1, -1, -1, dtype=torch.float64) * (T // N) + steps_offset
    elif spacing == "trailing":
        ts = torch.round(T - torch.arange(N, dtype=torch.float64) * (T / N)) - 1
    elif spacing == "linspace":
        ts = torch.round(torch.linspace(0, T - 1, N, dtype=torch.float64)).flip(0)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected leading, trailing or linspace")
    return ts.long()


def lcm_timestep_grid(num_steps: int, original_inference_steps: int = 50,
                      num_train_timesteps: int = 1000) -> torch.Tensor:
    """LCM multistep grid (RLCM / diffusers ≤0.23): origin steps c·i−1 (c = T // original), reversed, stride
    ⌊original/N⌋, first N. N=4 → [999, 759, 519, 279]. (N,) long."""
    if not 1 <= num_steps <= original_inference_steps:
        raise ValueError(f"LCM num_steps must be in [1, {original_inference_steps}], got {num_steps}")
    c = num_train_timesteps // original_inference_steps
    origin = torch.arange(1, original_inference_steps + 1) * c - 1
    stride = original_inference_steps // num_steps
    return origin.flip(0)[::stride][:num_steps].long()


def previous_timesteps(timesteps: torch.Tensor, last: int = -1) -> torch.Tensor:
    """t' for each step of a descending grid: τ_{k+1}, and `last` for the final step (−1 = 'the final ᾱ'). (N,) long.

    The references compute t' = t − T/N, which equals this only on uniformly spaced grids."""
    return torch.cat([timesteps[1:], timesteps.new_tensor([last])])


def alphas_cumprod_scaled_linear(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """ᾱ_t of SD's 'scaled_linear' schedule, float32 (T,)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


# ------------------------------------------------------------------------------------------------------- kernels
def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-element mean over all non-batch dims of log N(x; mean, std²). (B,) float32."""
    x, mean, std = x.float(), mean.float(), std.float()
    lp = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI
    return lp.mean(dim=tuple(range(1, lp.ndim)))


def _per_sample(values: torch.Tensor, index: torch.Tensor | int, batch: int, device) -> torch.Tensor:
    """Gather values[index] for a (B,) or scalar index → (B,1,1,1) float32."""
    idx = torch.as_tensor(index, device=values.device).long().reshape(-1)
    if idx.numel() == 1:
        idx = idx.expand(batch)
    return values[idx].to(device=device, dtype=torch.float32).view(batch, 1, 1, 1)


def _x0_and_eps(model_output, sample, alpha, prediction_type: str):
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - (1 - alpha).sqrt() * eps) / alpha.sqrt()
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - alpha.sqrt() * x0) / (1 - alpha).sqrt()
    elif prediction_type == "v_prediction":
        x0 = alpha.sqrt() * sample - (1 - alpha).sqrt() * model_output
        eps = alpha.sqrt() * model_output + (1 - alpha).sqrt() * sample
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    return x0, eps


def _draw(mean, std, out_dtype, prev_sample, noise, generator):
    """(prev_sample, its log-prob): the given prev_sample, or mean + std·noise (noise drawn if None)."""
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        prev_sample = (mean + std * noise.float()).to(out_dtype)
    # The log-prob is taken of the stored (cast) sample so that recomputing it later reproduces it bit for bit.
    return prev_sample, gaussian_log_prob(prev_sample.detach(), mean, std)


def ddim_step(
    model_output: torch.Tensor,
    timestep: torch.Tensor | int,
    prev_timestep: torch.Tensor | int,
    sample: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    eta: float,
    final_alpha_cumprod: float,
    prediction_type: str = "epsilon",
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    draw: bool = True,
) -> StepOutput:
    """One stochastic DDIM step x_t → x_{t'} (DDIM eq. 12/16), with the log-prob of `prev_sample` (drawn if None).

    σ = η·√((1−ᾱ')/(1−ᾱ)·(1−ᾱ/ᾱ')), μ = √ᾱ'·x̂0 + √(1−ᾱ'−σ²)·ε̃. A prev_timestep < 0 means the final step, whose ᾱ'
    is `final_alpha_cumprod` (ᾱ_0 in every reference: they clamp t' to 0; 1.0 would make σ = 0 there).
    With η = 0 the step is deterministic and the log-prob is −inf/NaN: log-prob algorithms must use η > 0.
    `draw=False` returns the transition only (x̂0, mean, std; prev_sample and log_prob None).
    """
    B = sample.shape[0]
    alpha = _per_sample(alphas_cumprod, timestep, B, sample.device)
    prev_t = torch.as_tensor(prev_timestep, device=alphas_cumprod.device).long().reshape(-1)
    alpha_prev = torch.where(
        prev_t >= 0, alphas_cumprod[prev_t.clamp(min=0)], torch.tensor(final_alpha_cumprod, dtype=torch.float32)
    )
    alpha_prev = (alpha_prev.expand(B) if alpha_prev.numel() == 1 else alpha_prev).to(sample.device).view(B, 1, 1, 1)

    x0, eps = _x0_and_eps(model_output.float(), sample.float(), alpha, prediction_type)
    variance = (1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)
    std = eta * variance.clamp(min=0).sqrt()
    mean = alpha_prev.sqrt() * x0 + (1 - alpha_prev - std**2).clamp(min=0).sqrt() * eps
    if eta == 0 and prev_sample is None and draw:
        return StepOutput(mean.to(sample.dtype), torch.full((B,), float("nan"), device=sample.device), x0, mean, std)
    if not draw:
        return StepOutput(None, None, x0, mean, std)
    prev_sample, log_prob = _draw(mean, std, sample.dtype, prev_sample, noise, generator)
    return StepOutput(prev_sample, log_prob, x0, mean, std)


def lcm_boundary_scalings(timestep: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """LCM's consistency boundary condition: (c_skip, c_out) for timesteps (any shape, float32)."""
    s = timestep.float() * timestep_scaling
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s / (s**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def lcm_step(
    model_output: torch.Tensor,
    timestep: torch.Tensor | int,
    prev_timestep: torch.Tensor | int,
    sample: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    prediction_type: str = "epsilon",
    timestep_scaling: float = 10.0,
    deterministic: bool = False,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    draw: bool = True,
) -> StepOutput:
    """One stochastic LCM step: d = c_out·x̂0 + c_skip·x_t, x' ~ N(√ᾱ'·d, (1−ᾱ')·I).

    RLCM passes prev_timestep = timestep at the last step (re-noising to the last level; the image is decoded from
    d, so that sample is never seen by the reward). `deterministic` returns x' = d with no noise (RLCM's 1-step
    case, whose log-prob is meaningless: 1-step LCM has no stochastic policy)."""
    B = sample.shape[0]
    alpha = _per_sample(alphas_cumprod, timestep, B, sample.device)
    alpha_prev = _per_sample(alphas_cumprod, prev_timestep, B, sample.device)
    t = torch.as_tensor(timestep, device=sample.device).float().reshape(-1).expand(B).view(B, 1, 1, 1)
    c_skip, c_out = lcm_boundary_scalings(t, timestep_scaling=timestep_scaling)
    x0, _ = _x0_and_eps(model_output.float(), sample.float(), alpha, prediction_type)
    denoised = c_out * x0 + c_skip * sample.float()
    mean = alpha_prev.sqrt() * denoised
    std = (1 - alpha_prev).sqrt()
    if deterministic and prev_sample is None and draw:
        return StepOutput(denoised.to(sample.dtype), torch.full((B,), float("nan"), device=sample.device),
                          denoised, mean, std)
    if not draw:
        return StepOutput(None, None, denoised, mean, std)
    prev_sample, log_prob = _draw(mean, std, sample.dtype, prev_sample, noise, generator)
    return StepOutput(prev_sample, log_prob, denoised, mean, std)


def draw_children(step: StepOutput, noise: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """k samples of one transition (SPO's branching): every child shares the step's mean and std.

    noise (k, B, C, h, w) float32 → children (k, B, C, h, w) in `dtype`, log-probs (k, B) float32 (each child's
    per-element-mean log density, taken of the cast child as `_draw` does, so recomputing it reproduces it)."""
    if noise.ndim != step.mean.ndim + 1 or noise.shape[1:] != step.mean.shape:
        raise ValueError(f"noise must be (k, *mean.shape) = (k, {tuple(step.mean.shape)}), got {tuple(noise.shape)}")
    if not bool((step.std > 0).all()):
        raise ValueError("draw_children needs a stochastic step (std > 0): DDIM with eta = 0 has one child")
    children = (step.mean.unsqueeze(0) + step.std.unsqueeze(0) * noise.float()).to(dtype)
    log_probs = torch.stack([gaussian_log_prob(c.detach(), step.mean, step.std) for c in children])
    return children, log_probs
