"""The one denoising step, and the sampling loop built on it. Every algorithm draws its trajectories here; none
keeps its own copy. A step-wise sampler (SPO's branching) writes its own short loop over `denoising_step`.

A `Trajectory` stores, per sample and per step k (x_{τ_k} → x_{τ_{k+1}}):
  prompts         list[str] (B)
  cond            Conditioning of B samples (what the UNet is conditioned on)
  timesteps       (B, N) long   τ_k
  prev_timesteps  (B, N) long   τ_{k+1} (−1: final ᾱ; LCM: τ_k at the last step)
  latents         (B, N, C, h, w)  input of step k
  next_latents    (B, N, C, h, w)  output of step k
  log_probs       (B, N) float32   log π(next | latent) under the sampling weights (NaN when η = 0)
  final_latents   (B, C, h, w)     what is decoded (LCM: the last step's denoised d)
  images          (B, 3, H, W) in [0, 1], or None when decode=False or dropped
  x0_preds        (B, N, C, h, w) or None (kept when asked: SDPO's dense rewards)
  ref_log_probs   (B, N) float32 or None: log π_ref of each step under the frozen initial policy (D3PO, SPO)
The per-step fields move together under `with_steps` (time shuffling), the per-sample ones under `select`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch.utils.checkpoint import checkpoint

from ..models.conditioning import Conditioning
from ..models.diffusion import DiffusionModel
from .scheduling import StepOutput

PER_STEP = ("timesteps", "prev_timesteps", "latents", "next_latents", "log_probs", "x0_preds", "ref_log_probs")


@dataclass
class Trajectory:
    prompts: list[str]
    cond: Conditioning
    timesteps: torch.Tensor
    prev_timesteps: torch.Tensor
    latents: torch.Tensor
    next_latents: torch.Tensor
    log_probs: torch.Tensor
    final_latents: torch.Tensor
    images: torch.Tensor | None = None
    x0_preds: torch.Tensor | None = None
    ref_log_probs: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[1]

    def select(self, index: torch.Tensor | slice | list[int]) -> "Trajectory":
        """Sub-batch along the sample axis (index tensor, list or slice)."""
        idx = list(range(len(self)))[index] if isinstance(index, slice) else torch.as_tensor(index).tolist()
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                out[f.name] = None
            elif f.name == "prompts":
                out[f.name] = [v[i] for i in idx]
            elif f.name == "cond":
                out[f.name] = v.select(idx_t)
            else:
                out[f.name] = v[idx_t.to(v.device)]
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
            elif f.name == "cond":
                out[f.name] = Conditioning.cat(vals)
            else:
                out[f.name] = torch.cat(vals)
        return Trajectory(**out)

    def with_steps(self, order: torch.Tensor) -> "Trajectory":
        """Reorder the per-step axis per sample: order (B, N') long (N' ≤ N selects a subset)."""
        def take(x):
            idx = order.to(x.device).view(*order.shape, *([1] * (x.ndim - 2))).expand(*order.shape, *x.shape[2:])
            return torch.gather(x, 1, idx)

        return replace(self, **{k: take(getattr(self, k)) for k in PER_STEP if getattr(self, k) is not None})

    def state(self) -> dict:
        """Plain dict of tensors, strings and None (loads with torch.load(weights_only=True)); images dropped."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("cond", "images")}
        out["cond"] = self.cond.state()
        return out

    @staticmethod
    def from_state(state: dict, device=None) -> "Trajectory":
        """Inverse of `state`, moved to `device`. Also reads files written before `cond` existed (`prompt_embeds`)."""
        state = dict(state)
        cond = state.pop("cond", None) or {"prompt_embeds": state.pop("prompt_embeds")}
        state.pop("images", None)
        move = lambda v: v.to(device) if torch.is_tensor(v) else v  # noqa: E731
        return Trajectory(cond=Conditioning(**cond).to(device), **{k: move(v) for k, v in state.items()})


def denoising_step(
    model: DiffusionModel,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    prev_timesteps: torch.Tensor,
    cond: Conditioning,
    *,
    guidance_scale: float,
    eta: float,
    unet: torch.nn.Module | None = None,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    deterministic: bool = False,
    draw: bool = True,
    checkpointed: bool = False,
) -> StepOutput:
    """x_t → x_{t'}: the guided UNet prediction (CFG or guidance embedding) and the family's scheduler step.

    latents (B,C,h,w); timesteps, prev_timesteps (B,) long; cond of B samples. With `prev_sample` the step scores
    that sample (log-prob recomputation); otherwise it draws mean + std·noise. `draw=False` returns the transition
    only (mean, std, x̂0: SPO draws k children from it). `checkpointed` recomputes the UNet call in backward.
    `unet`: the module to forward through (the accelerate-prepared one in every differentiable call)."""
    if checkpointed:
        out = checkpoint(model.predict, latents, timesteps, cond, guidance_scale, unet, use_reentrant=False)
    else:
        out = model.predict(latents, timesteps, cond, guidance_scale, unet=unet)
    return model.step(out, timesteps, prev_timesteps, latents, eta=eta, noise=noise, prev_sample=prev_sample,
                      deterministic=deterministic, draw=draw)


def rollout(
    model: DiffusionModel,
    prompts: list[str],
    *,
    num_steps: int,
    eta: float,
    guidance_scale: float,
    generator: torch.Generator | None = None,
    initial_noise: torch.Tensor | None = None,
    cond: Conditioning | None = None,
    unet: torch.nn.Module | None = None,
    keep_x0_preds: bool = False,
    decode: bool = True,
    grad_from_step: int | None = None,
    gradient_checkpointing: bool = False,
    checkpoint_decode: bool = False,
) -> Trajectory:
    """Sample B trajectories of N steps, recording what every algorithm needs.

    initial_noise: (B,C,h,w) x_T (shared between the members of a group: D3PO, SDPO); drawn from `generator` if None.
    cond: the prompts' conditioning if already encoded; encoded here if None.
    grad_from_step: None ⇒ everything under no_grad (the RL algorithms). b ⇒ steps k ≥ b and the decode run with
        grad (AlignProp's truncated backprop; earlier steps are no-grad and their output detached).
    gradient_checkpointing: recompute each grad-enabled UNet call in backward (activation memory of one call).
    checkpoint_decode: with grad, also recompute the VAE decode in backward (at 512² the decoder's activations
        exceed one UNet call's; off by default, as in AlignProp's reference).
    With grad the returned `final_latents` and `images` carry the graph; every other field is detached.
    Noise: one (B,C,h,w) draw per step from `generator`, on CPU, whether the step uses it or not, so a seed gives
    the same samples on any device and the stream does not depend on η.
    """
    B = len(prompts)
    if cond is None:
        cond = model.encode_prompts(prompts)
    x = initial_noise if initial_noise is not None else model.initial_noise(B, generator)
    x = x.to(model.device, model.dtype)
    grid = model.timesteps(num_steps)
    prev_grid = model.prev_timesteps(grid)
    # RLCM's 1-step LCM emits d without noise (no stochastic policy there; core/scheduling.lcm_step).
    lcm_one_step = model.is_lcm and num_steps == 1

    latents, next_latents, log_probs, x0_preds = [], [], [], []
    final = None
    for k in range(num_steps):
        with_grad = grad_from_step is not None and k >= grad_from_step
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(model.device)
        with torch.set_grad_enabled(with_grad):
            step = denoising_step(model, x, grid[k].expand(B), prev_grid[k].expand(B), cond,
                                  guidance_scale=guidance_scale, eta=eta, unet=unet, noise=noise,
                                  deterministic=lcm_one_step, checkpointed=with_grad and gradient_checkpointing)
        nxt = step.prev_sample
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
        cond=cond.detach(),
        timesteps=grid.expand(B, -1).clone(),
        prev_timesteps=prev_grid.expand(B, -1).clone(),
        latents=torch.stack(latents, 1),
        next_latents=torch.stack(next_latents, 1),
        log_probs=torch.stack(log_probs, 1),
        final_latents=final.detach() if grad_from_step is None else final,
        images=images,
        x0_preds=torch.stack(x0_preds, 1) if keep_x0_preds else None,
    )


def step_log_prob(model: DiffusionModel, traj: Trajectory, k: int, *, eta: float, guidance_scale: float,
                  unet: torch.nn.Module | None = None) -> StepOutput:
    """log π_θ of the stored transition k of every sample of `traj` (column k: after `with_steps`, each sample's
    own k-th step), under the current weights and grad mode. Returns the step's output; `.log_prob` is (B,)."""
    if not model.is_lcm and eta <= 0:
        raise ValueError("log-probabilities need a stochastic sampler: eta must be > 0 (eta=0 gives σ=0)")
    return denoising_step(model, traj.latents[:, k], traj.timesteps[:, k], traj.prev_timesteps[:, k], traj.cond,
                          guidance_scale=guidance_scale, eta=eta, unet=unet, prev_sample=traj.next_latents[:, k])
