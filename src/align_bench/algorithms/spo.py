"""SPO — Step-aware Preference Optimization: Liang, Yuan, Gu, Chen, Wang, Zhang, Zhou, Jiang, Luo, Liu,
"Step-aware Preference Optimization: Aligning Preference with Denoising Performance at Each Step", CVPR 2025
(arXiv:2406.04314); reference code RockeyCoss/SPO. What it optimises, its equations and every difference from the
reference: docs/algos/spo.md.

Each sampling round: B prompts run ordinary stochastic DDIM steps until `sample.divert_start_step` D; from there
every parent x_t draws k children from ONE transition N(μ, σ²) (`scheduling.draw_children`). At the next step one
UNet call on the k·B children gives each child's x̂0 (decoded and scored by the step-aware preference model at the
child's noise level τ_{i}, or at 0 after the last step) AND the transition they continue with: the (best, worst)
children form a DPO pair for the step that produced them (stored timestep τ_{i−1}, the parent's) when the
comparator's margin passes; one child chosen at random (not the best: the trajectory stays on-policy) becomes the
next parent and branches again from its already computed transition. So a branching step costs k UNet calls per
prompt, not k + 1.

The SDXL variant (`sample.num_inner_step` m > 0): after branching, each child continues alone for m more steps; the
segment's end is scored, and every transition of the segment is stored with the segment's label (winner and loser
then have different parents). m = 0 is the SD 1.5 sampler.

Loss: per stored transition, the clipped DPO loss (`common.clipped_dpo_loss`) of winner vs loser against the
frozen initial policy (the LoRA-disabled UNet); log 2 at initialisation. Each round is followed at once by
⌈pairs / train.batch_size⌉ minibatches, one backward each; one optimizer step every
`train.gradient_accumulation_steps` of them (accumulation runs across rounds, as in the reference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import AlgoSchema, OptimSchema, SampleSchema
from ..core.rollout import PER_STEP, Trajectory, denoising_step, step_log_prob
from ..core.scheduling import StepOutput, draw_children, gaussian_log_prob
from ..models.conditioning import Conditioning
from .common import (Groups, clipped_dpo_loss, gather_variable, record_step, reference_log_probs,
                     training_guidance)


@dataclass
class BranchSampleSchema(SampleSchema):
    num_children: int
    divert_start_step: int
    num_inner_step: int
    threshold: float


@dataclass
class TrainSchema(OptimSchema):
    batch_size: int
    gradient_accumulation_steps: int
    cfg: bool
    beta: float
    eps: float


@dataclass
class Config(AlgoSchema):
    sample: BranchSampleSchema
    train: TrainSchema


# ------------------------------------------------------------------------------------------- pure functions
def compare(scores: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPO's comparator on the k children of each of B parents. scores (k, B) → best (B,) long, worst (B,) long,
    valid (B,) bool.

    With p = softmax(s_best, s_worst), a pair is kept iff p_best − p_worst > threshold, i.e.
    tanh((s_best − s_worst)/2) > threshold, i.e. Δs > 2·atanh(threshold) (0.619 for 0.3)."""
    best, worst = scores.argmax(0), scores.argmin(0)
    margin = scores.max(0).values - scores.min(0).values
    valid = torch.tanh(margin.float() / 2) > threshold
    return best, worst, valid


def margin_threshold(threshold: float) -> float:
    """The score difference Δs above which `compare` keeps a pair: 2·atanh(threshold)."""
    return 2.0 * math.atanh(threshold)


@dataclass
class Segment:
    """The transitions of k children since they branched, child-major (index c·B + b): per step j, input latents
    (k·B, C, h, w), outputs (k·B, C, h, w), their sampling log-probs (k·B,), τ and τ' (python ints)."""

    latents: list[torch.Tensor]
    next_latents: list[torch.Tensor]
    log_probs: list[torch.Tensor]
    timesteps: list[int]
    prev_timesteps: list[int]

    def add(self, latents, next_latents, log_probs, t: int, t_prev: int) -> None:
        self.latents.append(latents)
        self.next_latents.append(next_latents)
        self.log_probs.append(log_probs)
        self.timesteps.append(t)
        self.prev_timesteps.append(t_prev)


def segment_pairs(segment: Segment, best: torch.Tensor, worst: torch.Tensor, valid: torch.Tensor,
                  prompts: list[str], cond: Conditioning) -> tuple[Trajectory, Trajectory]:
    """The labelled pairs of one evaluation: for every valid prompt b, every transition of the segment, the
    winner's (child best[b]) against the loser's (child worst[b]). B = len(prompts); best, worst, valid (B,).
    Returns (winners, losers), each a one-step Trajectory of V·len(segment) items (transition-major; V = 0 when
    no prompt passed the comparator: empty trajectories of the right shapes)."""
    B = len(prompts)
    kept = valid.nonzero().flatten().cpu()
    out = []
    for child in (best, worst):
        rows = (child.cpu()[kept] * B + kept).tolist()  # child-major index of the chosen child of each kept prompt
        steps = []
        for j in range(len(segment.timesteps)):
            nxt = segment.next_latents[j][rows]
            steps.append(Trajectory(
                prompts=[prompts[b] for b in kept.tolist()], cond=cond.select(kept),
                timesteps=torch.full((len(rows), 1), segment.timesteps[j], dtype=torch.long, device=nxt.device),
                prev_timesteps=torch.full((len(rows), 1), segment.prev_timesteps[j], dtype=torch.long,
                                          device=nxt.device),
                latents=segment.latents[j][rows].unsqueeze(1), next_latents=nxt.unsqueeze(1),
                log_probs=segment.log_probs[j][rows].unsqueeze(1), final_latents=nxt))
        out.append(Trajectory.cat(steps))
    return out[0], out[1]


@torch.no_grad()
def branching_rollout(model, prompts: list[str], score_fn, *, num_steps: int, eta: float, guidance_scale: float,
                      num_children: int, divert_start_step: int, num_inner_step: int, threshold: float,
                      generator: torch.Generator, unet=None, progress: bool = False) -> tuple[Groups, dict]:
    """SPO's step-wise sampler over the shared `denoising_step`: B = len(prompts) trajectories, k children per
    parent from step `divert_start_step` D on, a segment of 1 + `num_inner_step` transitions per branching.

    score_fn(images (n,3,H,W) in [0,1], prompts (n), timesteps (n,) long) → (n,): the step-aware preference model
    (`ctx.score`). Returns (pairs: Groups of size 2, member 0 = winner, member 1 = loser, one step each, possibly
    none; diagnostics: mean score margin, fraction of evaluations kept, the batch size of every UNet call).
    Noise is drawn on CPU from `generator`, as `rollout` does."""
    B, k, m = len(prompts), num_children, num_inner_step
    cond = model.encode_prompts(prompts)
    cond_k = Conditioning.cat([cond] * k)
    prompts_k = list(prompts) * k
    grid = model.timesteps(num_steps)
    prev_grid = model.prev_timesteps(grid)
    x = model.initial_noise(B, generator).to(model.device, model.dtype)
    unet_batches: list[int] = []
    margins, kept, winners, losers, all_scores = [], [], [], [], []

    def noise(*shape):
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(model.device)

    def transition(latents, i, c) -> StepOutput:
        n = latents.shape[0]
        unet_batches.append(n)
        return denoising_step(model, latents, grid[i].expand(n), prev_grid[i].expand(n), c,
                              guidance_scale=guidance_scale, eta=eta, unet=unet, draw=False)

    def branch(parent, tr: StepOutput, i) -> tuple[torch.Tensor, Segment]:
        """k children of `parent` (B,…) from the one transition `tr`; a new segment starts with this step."""
        children, log_probs = draw_children(tr, noise(k, *parent.shape), model.dtype)
        children = children.flatten(0, 1)
        segment = Segment([], [], [], [], [])
        segment.add(parent.repeat(k, 1, 1, 1), children, log_probs.flatten(), int(grid[i]), int(prev_grid[i]))
        return children, segment

    def evaluate(segment: Segment, images, t: int) -> None:
        scores = score_fn(images, prompts_k, torch.full((k * B,), t, dtype=torch.long, device=images.device))
        scores = scores.reshape(k, B)
        all_scores.append(scores.float().flatten().cpu())
        best, worst, valid = compare(scores, threshold)
        margins.append((scores.max(0).values - scores.min(0).values).float().cpu())
        kept.append(valid.float().cpu())
        w, l_ = segment_pairs(segment, best, worst, valid, prompts, cond)
        winners.append(w)
        losers.append(l_)

    segment, left = None, 0
    for i in tqdm(range(num_steps), desc="branching", leave=False, disable=not progress):
        if i < divert_start_step:  # an ordinary step, one trajectory per prompt
            tr = transition(x, i, cond)
            x = (tr.mean + tr.std * noise(*x.shape)).to(model.dtype)
        elif i == divert_start_step:
            x, segment = branch(x, transition(x, i, cond), i)
            left = m
        else:
            tr = transition(x, i, cond_k)  # k·B children: their x̂0 and their own next transition, one UNet call
            # SDXL variant: the last step always continues the segment (the reference scores the final image then)
            if left > 0 or (m > 0 and i == num_steps - 1):
                nxt = (tr.mean + tr.std * noise(*x.shape)).to(model.dtype)
                segment.add(x, nxt, gaussian_log_prob(nxt, tr.mean, tr.std), int(grid[i]), int(prev_grid[i]))
                x, left = nxt, left - 1
                continue
            evaluate(segment, model.decode(tr.x0_pred.to(model.dtype)), int(grid[i]))  # the children's level τ_i
            # continue from a random child (on-policy), reusing its transition for the next k children
            pick = torch.randint(0, k, (B,), generator=generator).to(x.device) * B + torch.arange(B, device=x.device)
            chosen = StepOutput(None, None, tr.x0_pred[pick], tr.mean[pick], tr.std[pick])
            x, segment = branch(x[pick], chosen, i)
            left = m
    evaluate(segment, model.decode(x), 0)  # the last children are final samples: scored at t = 0

    info = {"score_mean": float(torch.cat(all_scores).mean()), "score_margin": float(torch.cat(margins).mean()),
            "kept_frac": float(torch.cat(kept).mean()), "unet_batches": unet_batches}
    return Groups(Trajectory.cat(winners + losers), 2), info


# ------------------------------------------------------------------------------------------- processes
def _pair_rows(pairs: Groups) -> dict[str, torch.Tensor]:
    """Every tensor of the pairs as (P, 2, ...) rows (winner, loser), for gathering along the pair axis."""
    traj = pairs.traj
    fields = {k: getattr(traj, k) for k in (*PER_STEP, "final_latents") if getattr(traj, k) is not None}
    fields.update({f"cond.{k}": v for k, v in traj.cond.state().items()})
    return {k: pairs.by_group(v) for k, v in fields.items()}


def _from_rows(rows: dict[str, torch.Tensor], prompts: list[str]) -> Groups:
    """Inverse of `_pair_rows` (prompts: one per pair)."""
    flat = {k: v.transpose(0, 1).flatten(0, 1) for k, v in rows.items()}
    cond = Conditioning(**{k[5:]: v for k, v in flat.items() if k.startswith("cond.")})
    traj = Trajectory(prompts=list(prompts) * 2, cond=cond,
                      **{k: v for k, v in flat.items() if not k.startswith("cond.")})
    return Groups(traj, 2)


def share_pairs(accelerator, pairs: Groups, permutation_seed: int) -> Groups:
    """All processes' pairs (their counts differ), permuted by a permutation every process draws from the same
    seed, then this process's contiguous equal share ⌊total / processes⌋ (the remainder is dropped, as in the
    reference). No pairs at all when there are fewer than processes (the round is skipped everywhere). Single
    process: the pairs unchanged."""
    if accelerator.num_processes == 1:
        return pairs
    from accelerate.utils import gather_object

    rows = {k: gather_variable(accelerator, v) for k, v in _pair_rows(pairs).items()}
    prompts = [p for ps in gather_object([pairs.prompts]) for p in ps]
    total, procs = len(prompts), accelerator.num_processes
    share = total // procs  # 0 when total < procs: an empty share on every process
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(permutation_seed))
    mine = perm[accelerator.process_index * share:(accelerator.process_index + 1) * share]
    return _from_rows({k: v[mine.to(v.device)].to(pairs.traj.latents.device) for k, v in rows.items()},
                      [prompts[i] for i in mine.tolist()])


# ------------------------------------------------------------------------------------------- algorithm API
def validate(cfg) -> None:
    s, t = cfg.algo.sample, cfg.algo.train
    if cfg.get("experiment") == "spo_sdxl" and cfg.model.family != "sdxl":
        raise ValueError(f"experiment=spo_sdxl is SPO's SDXL setting: add model=sdxl (got model={cfg.model.name})")
    if cfg.model.family == "lcm":
        raise ValueError("algo=spo branches the stochastic DDIM sampler; model.family=lcm is not supported")
    if s.eta <= 0:
        raise ValueError("spo needs a stochastic sampler for log-probabilities: algo.sample.eta must be > 0")
    if s.num_children < 2:
        raise ValueError(f"algo.sample.num_children must be ≥ 2 (a pair needs two children), got {s.num_children}")
    if not 0 <= s.divert_start_step < int(cfg.steps.train):
        raise ValueError(f"algo.sample.divert_start_step must be in [0, steps.train={cfg.steps.train}), got "
                         f"{s.divert_start_step}")
    if s.num_inner_step < 0:
        raise ValueError(f"algo.sample.num_inner_step must be ≥ 0 (0: the SD 1.5 sampler), got {s.num_inner_step}")
    if not 0 <= s.threshold < 1:
        raise ValueError(f"algo.sample.threshold must be in [0, 1) (a margin on softmax probabilities), got "
                         f"{s.threshold}")
    if t.beta <= 0:
        raise ValueError(f"algo.train.beta must be > 0, got {t.beta}")
    if not 0 < t.eps < 1:
        raise ValueError(f"algo.train.eps (ratio clip) must be in (0, 1), got {t.eps}")
    if t.batch_size < 1 or t.gradient_accumulation_steps < 1:
        raise ValueError("algo.train.batch_size and algo.train.gradient_accumulation_steps must be ≥ 1")


def gradient_accumulation_steps(cfg) -> int:
    return int(cfg.algo.train.gradient_accumulation_steps)


def init_state(ctx) -> dict:
    return {}


def train_epoch(ctx, state: dict, epoch: int) -> dict:
    cfg, acc = ctx.cfg.algo, ctx.accelerator
    s = cfg.sample
    guidance = training_guidance(ctx)
    logs: dict[str, list[float]] = {"loss": [], "log_ratio_abs": [], "clipfrac": [], "pref_acc": [], "grad_norm": []}
    scores, margins, kept_fracs, num_pairs, skipped = [], [], [], 0, 0
    bs = int(cfg.train.batch_size)
    for r in range(int(s.num_batches_per_epoch)):
        # ---- sample: the branching sampler, scored by the step-aware preference model through ctx.score
        ctx.unet.eval()
        prompts = ctx.prompt_sampler.sample(int(s.batch_size))
        pairs, info = branching_rollout(
            ctx.model, prompts, ctx.score, num_steps=int(ctx.cfg.steps.train), eta=float(s.eta),
            guidance_scale=ctx.guidance_scale, num_children=int(s.num_children),
            divert_start_step=int(s.divert_start_step), num_inner_step=int(s.num_inner_step),
            threshold=float(s.threshold), generator=ctx.generator, unet=ctx.unet, progress=ctx.progress)
        ctx.counters["images"] += len(prompts) * int(s.num_children)  # k final samples per prompt are decoded
        scores.append(info["score_mean"])
        margins.append(info["score_margin"])
        kept_fracs.append(info["kept_frac"])
        # every process draws the same permutation: the seed is shared, not the process's own
        pairs = share_pairs(acc, pairs, int(ctx.cfg.seed) * 100_003 + epoch * 1_009 + r)
        P = pairs.num_groups
        if P == 0:  # an empty round: no pair passed the comparator (on every process: the share is global)
            skipped += 1
            continue
        num_pairs += P
        pairs.traj.ref_log_probs = reference_log_probs(ctx, pairs.traj, guidance, chunk=max(2, 2 * bs))
        pairs = pairs.select(torch.randperm(P, generator=ctx.generator))

        # ---- DPO updates on this round's pairs
        ctx.unet.train()
        signs = torch.tensor([[1.0, -1.0]], device=pairs.traj.latents.device)
        for start in tqdm(range(0, P, bs), desc="training", leave=False, disable=not ctx.progress):
            mb = pairs.select(torch.arange(start, min(start + bs, P)))
            with acc.accumulate(ctx.unet):
                out = step_log_prob(ctx.model, mb.traj, 0, eta=float(s.eta), guidance_scale=guidance, unet=ctx.unet)
                loss, info = clipped_dpo_loss(mb.by_group(out.log_prob), mb.by_group(mb.traj.ref_log_probs[:, 0]),
                                              signs.expand(mb.num_groups, 2), float(cfg.train.beta),
                                              float(cfg.train.eps))
                grad_norm = ctx.backward(loss)
            record_step(logs, loss, info, grad_norm)

    summary = {k: float(np.nanmean(v)) for k, v in logs.items() if v and not np.all(np.isnan(v))}
    # reward_mean: the preference model's mean score over every child it judged (all noise levels)
    summary.update(reward_mean=float(np.mean(scores)), num_pairs=num_pairs, skipped_rounds=skipped,
                   score_margin=float(np.mean(margins)),
                   kept_frac=float(np.mean(kept_fracs)))
    return summary
