"""The one sampling loop. Every algorithm draws its trajectories here; none keeps its own copy.

A `Trajectory` stores, per sample and per step k (x_{τ_k} → x_{τ_{k+1}}):
  prompts         list[str] (B)
  prompt_embeds   (B, L, D)
  timesteps       (B, N) long   τ_k
  prev_timesteps  (B, N) long   τ_{k+1} (−1: final ᾱ; LCM: τ_k at the last step)
  latents         (B, N, C, h, w)  input of step k
  next_latents    (B, N, C, h, w)  output of step k
  log_probs       (B, N) float32   log π(next | latent) under the sampling weights (NaN when η = 0)
  x0_preds        (B, N, C, h, w) or None (kept when asked: SDPO's dense rewards)
  final_latents   (B, C, h, w)     what is decoded (LCM: the last step's denoised d)
  images          (B, 3, H, W) in [0, 1], or None when decode=False
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from ..models.diffusion import DiffusionModel
from .scheduling import StepOutput


@dataclass
class Trajectory:
    prompts: list[str]
    prompt_embeds: torch.Tensor
    timesteps: torch.Tensor
    prev_timesteps: torch.Tensor
    latents: torch.Tensor
    next_latents: torch.Tensor
    log_probs: torch.Tensor
    final_latents: torch.Tensor
    images: torch.Tensor | None = None
    x0_preds: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[1]

    def select(self, index: torch.Tensor | slice | list[int]) -> "Trajectory":
        """Sub-batch along the sample axis (index tensor, list or slice)."""
        if isinstance(index, slice):
            idx = list(range(len(self)))[index]
        else:
            idx = torch.as_tensor(index).tolist()
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                out[f.name] = None
            elif f.name == "prompts":
                out[f.name] = [v[i] for i in idx]
            else:
                out[f.name] = v[torch.as_tensor(idx, device=v.device, dtype=torch.long)]
        return Trajectory(**out)

    @staticmethod
    def cat(items: list["Trajectory"]) -> "Trajectory":
        out = {}
        for f in fields(Trajectory):
            vals = [getattr(t, f.name) for t in items]
            if any(v is None for v in vals):
                out[f.name] = None
            elif f.name == "prompts":
                out[f.name] = [p for v in vals for p in v]
            else:
                out[f.name] = torch.cat(vals)
        return Trajectory(**out)

    def with_steps(self, order: torch.Tensor) -> "Trajectory":
        """Reorder the per-step axis per sample: order (B, N') long (N' ≤ N selects a subset)."""
        def take(x):
            idx = order.to(x.device).view(*order.shape, *([1] * (x.ndim - 2))).expand(*order.shape, *x.shape[2:])
            return torch.gather(x, 1, idx)

        per_step = {k: take(getattr(self, k)) for k in ("timesteps", "prev_timesteps", "latents", "next_latents",
                                                      "log_probs")}
        if self.x0_preds is not None:
            per_step["x0_preds"] = take(self.x0_preds)
        return replace(self, **per_step)


# A hook called after each step: hook(k, x_t, step_output) → replacement next latent (B,C,h,w) or None.
# SPO uses it to branch k children from the same mean/std, score them and continue from one.
StepHook = Callable[[int, torch.Tensor, StepOutput], torch.Tensor | None]


def rollout(
    model: DiffusionModel,
    prompts: list[str],
    *,
    num_steps: int,
    eta: float,
    guidance_scale: float,
    generator: torch.Generator | None = None,
    initial_noise: torch.Tensor | None = None,
    prompt_embeds: torch.Tensor | None = None,
    unet: torch.nn.Module | None = None,
    keep_x0_preds: bool = False,
    decode: bool = True,
    grad_from_step: int | None = None,
    gradient_checkpointing: bool = False,
    step_hook: StepHook | None = None,
    checkpoint_decode: bool = False,
) -> Trajectory:
    """Sample B trajectories of N steps, recording what every algorithm needs.

    initial_noise: (B,C,h,w) x_T to share between the members of a pair (D3PO, SDPO); drawn from `generator` if None.
    grad_from_step: None ⇒ everything under no_grad (the RL algorithms). b ⇒ steps k ≥ b and the decode run with
        grad (AlignProp's truncated backprop; earlier steps are no-grad and their output detached).
    gradient_checkpointing: recompute each grad-enabled UNet call in backward (activation memory of one call).
    checkpoint_decode: with grad, also recompute the VAE decode in backward (at 512² the decoder's activations
        exceed one UNet call's; off by default, as in AlignProp's reference).
    With grad the returned `final_latents` and `images` carry the graph; every other field is detached.
    Noise for the η-steps is drawn on CPU from `generator` so a seed gives the same samples on any device.
    """
    B = len(prompts)
    if prompt_embeds is None:
        prompt_embeds = model.encode_prompts(prompts)
    x = initial_noise if initial_noise is not None else model.initial_noise(B, generator)
    x = x.to(model.device, model.dtype)
    grid = model.timesteps(num_steps)
    prev_grid = model.prev_timesteps(grid)
    # RLCM's 1-step LCM emits d without noise (no stochastic policy there; see algorithms.md §1.2).
    lcm_one_step = model.is_lcm and num_steps == 1

    latents, next_latents, log_probs, x0_preds = [], [], [], []
    final = None
    for k in range(num_steps):
        with_grad = grad_from_step is not None and k >= grad_from_step
        t = grid[k].expand(B)
        with torch.set_grad_enabled(with_grad):
            if with_grad and gradient_checkpointing:
                out = checkpoint(model.predict, x, t, prompt_embeds, guidance_scale, unet, use_reentrant=False)
            else:
                out = model.predict(x, t, prompt_embeds, guidance_scale, unet=unet)
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(model.device)
            step = model.step(out, t, prev_grid[k].expand(B), x, eta=eta, noise=noise, deterministic_last=lcm_one_step)
        nxt = step.prev_sample
        if step_hook is not None:
            replaced = step_hook(k, x, step)
            if replaced is not None:
                nxt = replaced
        latents.append(x.detach())
        next_latents.append(nxt.detach())
        log_probs.append(step.log_prob.detach())
        if keep_x0_preds:
            x0_preds.append(step.x0_pred.detach().to(model.dtype))
        final = step.x0_pred.to(model.dtype) if model.is_lcm else nxt
        x = nxt if with_grad else nxt.detach()

    images = None
    if decode:
        with torch.set_grad_enabled(grad_from_step is not None):
            if grad_from_step is not None and checkpoint_decode and final.requires_grad:
                images = checkpoint(model.decode, final, use_reentrant=False)
            else:
                images = model.decode(final)
    return Trajectory(
        prompts=list(prompts),
        prompt_embeds=prompt_embeds.detach(),
        timesteps=grid.expand(B, -1).clone(),
        prev_timesteps=prev_grid.expand(B, -1).clone(),
        latents=torch.stack(latents, 1),
        next_latents=torch.stack(next_latents, 1),
        log_probs=torch.stack(log_probs, 1),
        final_latents=final.detach() if grad_from_step is None else final,
        images=images,
        x0_preds=torch.stack(x0_preds, 1) if keep_x0_preds else None,
    )


def step_log_prob(
    model: DiffusionModel,
    latents: torch.Tensor,
    next_latents: torch.Tensor,
    timesteps: torch.Tensor,
    prev_timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    *,
    eta: float,
    guidance_scale: float,
    unet: torch.nn.Module | None = None,
) -> StepOutput:
    """Recompute log π_θ(next_latents | latents) under the current weights (with grad). Inputs are one step per
    sample: latents/next_latents (B,C,h,w), timesteps/prev_timesteps (B,), prompt_embeds (B,L,D)."""
    if not model.is_lcm and eta <= 0:
        raise ValueError("log-probabilities need a stochastic sampler: eta must be > 0 (eta=0 gives σ=0)")
    out = model.predict(latents, timesteps, prompt_embeds, guidance_scale, unet=unet)
    return model.step(out, timesteps, prev_timesteps, latents, eta=eta, prev_sample=next_latents)
