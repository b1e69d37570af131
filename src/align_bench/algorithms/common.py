"""What the log-probability algorithms share (DDPO, D3PO, REBEL; the step-wise and group algorithms build on the
same pieces): config checks and counts; groups of trajectories sampled together (a pair is a group of two) with
shared or independent x_T; log-probs under the frozen initial policy; the clipped DPO loss; and the process-level
helpers (this process's slice of gathered values, a gather of unequal lengths). One place, one wording."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.rollout import Trajectory, step_log_prob


# ------------------------------------------------------------------------------------------- checks and counts
def num_train_timesteps(cfg) -> int:
    """Steps trained per trajectory per inner epoch: ⌊N · timestep_fraction⌋, at least 1."""
    return max(1, int(int(cfg.steps.train) * float(cfg.algo.train.get("timestep_fraction", 1.0))))


def validate_log_prob_policy(cfg) -> None:
    """The sampler must define a stochastic policy whose log-probs training can recompute."""
    name, s, t = cfg.algo.name, cfg.algo.sample, cfg.algo.train
    if cfg.model.family != "lcm" and s.eta <= 0:
        raise ValueError(f"{name} needs a stochastic sampler for log-probabilities: algo.sample.eta must be > 0")
    if cfg.model.family == "lcm":
        if int(cfg.steps.train) < 2:
            raise ValueError(f"{name} on an LCM needs steps.train ≥ 2: a 1-step LCM sample is deterministic "
                             f"(no policy)")
        if not t.cfg:
            raise ValueError(f"{name} on an LCM needs algo.train.cfg=true: its guidance embedding is part of the "
                             f"sampled policy")
    if not 0 < float(t.get("timestep_fraction", 1.0)) <= 1:
        raise ValueError(f"algo.train.timestep_fraction must be in (0, 1], got {t.timestep_fraction}")


def validate_minibatches(cfg, unit: str = "trajectories") -> None:
    """sample.batch_size splits into train.batch_size minibatches, and those into whole optimizer steps."""
    s, t = cfg.algo.sample, cfg.algo.train
    if s.batch_size % t.batch_size:
        raise ValueError(f"algo.sample.batch_size ({s.batch_size}) must be a multiple of algo.train.batch_size "
                         f"({t.batch_size}) (both count {unit})")
    minibatches = int(s.batch_size) * int(s.num_batches_per_epoch) // int(t.batch_size)
    if minibatches % t.gradient_accumulation_steps:
        raise ValueError(f"{minibatches} minibatches of {unit} per epoch is not a multiple of "
                         f"algo.train.gradient_accumulation_steps ({t.gradient_accumulation_steps})")


def training_guidance(ctx) -> float:
    """Guidance of the training forward: the sampling guidance when `algo.train.cfg`, else none (1.0)."""
    return ctx.guidance_scale if ctx.cfg.algo.train.cfg else 1.0


def record_step(logs: dict[str, list[float]], loss: torch.Tensor, info: dict[str, torch.Tensor],
                grad_norm: float | None) -> None:
    """Append one micro-step's loss and diagnostics, and the grad norm when it was an optimizer step."""
    logs["loss"].append(loss.item())
    for k, v in info.items():
        logs[k].append(v.item())
    if grad_norm is not None:
        logs["grad_norm"].append(grad_norm)


# ------------------------------------------------------------------------------------------- groups
@dataclass
class Groups:
    """P groups of G trajectories that were sampled together, held in ONE trajectory in member-major order:
    member m of group g sits at index m·P + g. Member m is then the contiguous block [m·P, (m+1)·P), a selection of
    groups keeps that layout, and one UNet call on `traj` covers every member (no split-then-rejoin)."""

    traj: Trajectory
    size: int  # G, members per group

    def __post_init__(self):
        if self.size < 1 or len(self.traj) % self.size:
            raise ValueError(f"{len(self.traj)} trajectories do not split into groups of {self.size}")

    @property
    def num_groups(self) -> int:
        return len(self.traj) // self.size

    @property
    def prompts(self) -> list[str]:
        """The P groups' prompts (every member of a group shares it)."""
        return self.traj.prompts[:self.num_groups]

    def member(self, m: int) -> Trajectory:
        """Member m of every group, group g at index g. (P samples)"""
        P = self.num_groups
        return self.traj.select(slice(m * P, (m + 1) * P))

    def select(self, groups: torch.Tensor) -> "Groups":
        """The groups at indices `groups` (P',) long, all their members, in the same layout."""
        P = self.num_groups
        return Groups(self.traj.select(torch.cat([groups + m * P for m in range(self.size)])), self.size)

    def with_steps(self, order: torch.Tensor) -> "Groups":
        """Reorder each group's steps by `order` (P, N'): the same order for every member of a group."""
        return Groups(self.traj.with_steps(order.repeat(self.size, 1)), self.size)

    def by_group(self, values: torch.Tensor) -> torch.Tensor:
        """(G·P, ...) values in member-major order → (P, G, ...): row g holds group g's members."""
        P = self.num_groups
        return values.reshape(self.size, P, *values.shape[1:]).transpose(0, 1).contiguous()

    @staticmethod
    def cat(items: list["Groups"]) -> "Groups":
        """Groups of several sampling calls → one, member-major over all of them."""
        size = items[0].size
        if any(g.size != size for g in items):
            raise ValueError("cannot concatenate groups of different sizes")
        return Groups(Trajectory.cat([g.member(m) for m in range(size) for g in items]), size)


def sample_groups(ctx, num_groups: int, group_size: int, *, shared_x_T: bool, **rollout_kwargs) -> Groups:
    """`num_groups` training prompts, each sampled `group_size` times in ONE batched rollout. shared_x_T: the
    members of a group start from the same x_T and diverge only through the sampler's noise (D3PO, SDPO); else
    every member draws its own (REBEL). `rollout_kwargs` go to `ctx.rollout` (keep_x0_preds, decode, …)."""
    prompts = ctx.prompt_sampler.sample(num_groups)
    if shared_x_T:
        x_T = ctx.model.initial_noise(num_groups, ctx.generator).repeat(group_size, 1, 1, 1)
    else:
        x_T = ctx.model.initial_noise(num_groups * group_size, ctx.generator)
    return Groups(ctx.rollout(prompts * group_size, initial_noise=x_T, **rollout_kwargs), group_size)


def collect_groups(ctx, num_batches: int, groups_per_batch: int, group_size: int, *,
                   shared_x_T: bool) -> tuple[Groups, torch.Tensor]:
    """An epoch of `num_batches` sampling calls of `groups_per_batch` groups, each member's final image scored by
    the training reward. Returns (groups, images dropped: training needs latents only; rewards (P, G))."""
    batches, rewards = [], []
    for _ in tqdm(range(num_batches), desc="sampling", leave=False, disable=not ctx.progress):
        groups = sample_groups(ctx, groups_per_batch, group_size, shared_x_T=shared_x_T)
        rewards.append(groups.by_group(ctx.score(groups.traj.images, groups.traj.prompts)))
        groups.traj.images = None
        batches.append(groups)
    return Groups.cat(batches), torch.cat(rewards)


# ------------------------------------------------------------------------------------------- reference policy
@torch.no_grad()
def reference_log_probs(ctx, traj: Trajectory, guidance_scale: float, chunk: int) -> torch.Tensor:
    """log π_ref of every stored step under the frozen initial policy: the same peft UNet with its LoRA disabled
    (no second UNet in memory), `chunk` samples per UNet call. (B, N) float32."""
    out = torch.empty_like(traj.log_probs)
    eta = float(ctx.cfg.algo.sample.eta)
    with ctx.model.lora_disabled(ctx.unet):
        for start in range(0, len(traj), chunk):
            mb = traj.select(slice(start, start + chunk))
            for k in range(traj.num_steps):
                out[start:start + len(mb), k] = step_log_prob(ctx.model, mb, k, eta=eta, guidance_scale=guidance_scale,
                                                              unet=ctx.unet).log_prob
    return out


def clipped_dpo_loss(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, signs: torch.Tensor, beta: float,
                     eps: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO on one step of each pair with clipped likelihood ratios against the reference policy (D3PO, SPO).
    log_prob, ref_log_prob, signs: (B, 2) (member 0, member 1); signs +1 for the winner, −1 for the loser, 0 0
    for no preference.

    L = −mean_b log σ( β Σ_i s_i·log clamp(exp(log π_θ,i − log π_ref,i), 1−ε, 1+ε) ). Once a member's ratio leaves
    [1−ε, 1+ε] its gradient is zero (the ratio is clamped, not the log-ratio difference). At π_θ = π_ref the loss
    is log 2 and ∂L/∂log π_w = −β/(2B)."""
    log_ratio = log_prob - ref_log_prob
    # log clamp(r, 1−ε, 1+ε) computed in log space: the same value and gradient, but exp(log_ratio) overflowing to
    # inf (|log_ratio| > 88 once the policy has moved far at a low-noise step) would give 0·inf = NaN gradients.
    log_clipped = log_ratio.clamp(math.log(1.0 - eps), math.log(1.0 + eps))
    logits = beta * (signs * log_clipped).sum(dim=1)
    loss = -F.logsigmoid(logits).mean()
    preferred = signs[:, 0] != 0
    info = {
        "log_ratio_abs": log_ratio.detach().abs().mean(),
        "clipfrac": ((torch.exp(log_ratio.detach()) - 1.0).abs() > eps).float().mean(),
        # fraction of preference pairs whose winner currently has the larger ratio (ties excluded)
        "pref_acc": (logits.detach() > 0).float()[preferred].mean() if preferred.any()
        else torch.tensor(float("nan")),
    }
    return loss, info


# ------------------------------------------------------------------------------------------- processes
def process_slice(accelerator, values) -> torch.Tensor:
    """This process's share of values gathered over all processes in process order (equal shares). (n / procs,)
    float32 on the accelerator's device."""
    everything = torch.as_tensor(values, dtype=torch.float32)
    return everything.reshape(accelerator.num_processes, -1)[accelerator.process_index].to(accelerator.device)


def gather_variable(accelerator, values: torch.Tensor) -> torch.Tensor:
    """Every process's `values` (n_p, ...) concatenated in process order, when n_p differs between processes
    (SPO's filtered pairs). An empty tensor on a process contributes nothing."""
    if accelerator.num_processes == 1:
        return values
    local = values.to(accelerator.device)
    sizes = accelerator.gather(torch.tensor([local.shape[0]], device=accelerator.device)).tolist()
    longest = max(sizes)
    if longest == 0:
        return local
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[:local.shape[0]] = local
    everything = accelerator.gather(padded)
    return torch.cat([everything[p * longest:p * longest + n] for p, n in enumerate(sizes)])
