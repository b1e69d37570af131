"""Step-generalisation evaluation: fixed held-out prompts × fixed seeds, sampled at each step count in
`steps.eval` with a deterministic sampler (DDIM η = 0 on the model's spacing; LCM multistep), scored by every
evaluation reward on the decoded images. The same seeds and batches are used before and after training, so
base/final differences are paired."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ..models.diffusion import DiffusionModel
from .rollout import rollout


def eval_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def initial_noise_for(model: DiffusionModel, seeds: list[int]) -> torch.Tensor:
    """x_T for each sample from its own seed: independent of batch size and order. (B,C,h,w)."""
    return torch.cat([model.initial_noise(1, eval_generator(s)) for s in seeds])


def eval_items(prompts: list[str], seeds_per_prompt: int, seed: int) -> list[tuple[str, int]]:
    """The fixed (prompt, seed) pairs of the evaluation set, in a global order that any sharding preserves."""
    return [(p, seed + i * seeds_per_prompt + j) for i, p in enumerate(prompts) for j in range(seeds_per_prompt)]


@torch.no_grad()
def evaluate(
    model: DiffusionModel,
    rewards: dict,
    items: list[tuple[str, int]],
    steps_list: list[int],
    *,
    guidance_scale: float,
    batch_size: int = 32,
    eta: float = 0.0,
    unet=None,
    progress: bool = True,
    keep_images: int = 0,
) -> tuple[dict, dict]:
    """Returns ({reward: {steps: scores (n,) ndarray}}, {steps: first `keep_images` images (K,3,H,W)}).
    `summarize` turns the scores into the metrics.json table."""
    scores = {name: {n: [] for n in steps_list} for name in rewards}
    kept: dict[int, torch.Tensor] = {}
    bar = tqdm(total=len(steps_list) * len(items), desc="eval", leave=False, disable=not progress)
    for n in steps_list:
        imgs_n = []
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            batch_prompts = [p for p, _ in chunk]
            seeds = [s for _, s in chunk]
            traj = rollout(model, batch_prompts, num_steps=n, eta=eta, guidance_scale=guidance_scale,
                           generator=eval_generator(seeds[0] * 7919 + n), initial_noise=initial_noise_for(model, seeds),
                           unet=unet)
            for name, fn in rewards.items():
                r = fn(traj.images, batch_prompts)
                scores[name][n].append(r.float().cpu())
            if sum(x.shape[0] for x in imgs_n) < keep_images:
                imgs_n.append(traj.images.cpu())
            bar.update(len(chunk))
        if keep_images:
            kept[n] = torch.cat(imgs_n)[:keep_images]
    bar.close()
    raw = {name: {n: torch.cat(v).numpy() for n, v in per_n.items()} for name, per_n in scores.items()}
    return raw, kept


def summarize(raw: dict) -> dict:
    """{reward: {steps: scores}} → {reward: {str(steps): {"mean", "std", "n"}}} (the metrics.json shape)."""
    return {name: {str(n): {"mean": float(np.mean(x)), "std": float(np.std(x)), "n": int(x.size)}
                   for n, x in per_n.items()} for name, per_n in raw.items()}


def merge_scores(parts: list[dict]) -> dict:
    """Concatenate per-process raw score dicts (same keys) into one."""
    return {name: {n: np.concatenate([p[name][n] for p in parts]) for n in parts[0][name]} for name in parts[0]}


def format_table(evals: dict[str, dict]) -> str:
    """Markdown table: one row per (phase, reward), one column per step count. evals: {phase: eval table}."""
    phases = list(evals)
    first = evals[phases[0]]
    steps = sorted({int(s) for r in first.values() for s in r}, key=int)
    lines = ["| phase | reward | " + " | ".join(f"{s} step{'s' if s > 1 else ''}" for s in steps) + " |",
             "|---|---|" + "---|" * len(steps)]
    for phase in phases:
        for reward, per_step in evals[phase].items():
            cells = [f"{per_step[str(s)]['mean']:.4f} ± {per_step[str(s)]['std']:.3f}" for s in steps]
            lines.append(f"| {phase} | {reward} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
