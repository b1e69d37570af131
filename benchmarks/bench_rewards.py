"""Section 3, rewards: images/s of every registered reward, batched, on the tiny world's rewards and on the random
replicas of the real scorers' checkpoints (rewards/testing.py: the real loaders and code paths, the real
preprocessing at the given image size, but a few-thousand-parameter network instead of a ViT-L/H). No grad."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from bench_common import PROMPTS, interleaved, markdown_table

PLAIN = ("jpeg_compressibility", "jpeg_incompressibility", "brightness", "tiny_aesthetic", "tiny_pickscore",
         "tiny_spm", "tiny_colour_accuracy", "tiny_shape_accuracy", "tiny_true_aesthetic", "combo")
REPLICAS = ("aesthetic", "pickscore", "hpsv2", "imagereward")


def _builders():
    from align_bench.main import compose
    from align_bench.rewards import REWARDS, build_reward
    from align_bench.rewards.testing import BUILDERS

    out = {}
    for name in PLAIN:
        if name in REWARDS:
            kwargs = dict(compose(["reward=combo"]).reward.kwargs) if name == "combo" else {}
            out[name] = ("tiny / built-in", lambda name=name, kwargs=kwargs: build_reward(name, **kwargs))
    tmp = Path(tempfile.mkdtemp(prefix="bench_rewards_"))
    for name in REPLICAS:
        out[name] = ("random replica", lambda name=name: build_reward(name, **BUILDERS[name](tmp / name)))
    skipped = sorted(set(REWARDS) - set(out))
    return out, skipped


def measure(batch: int, sizes: dict[str, int], repeats: int, budget_s: float | None = None) -> tuple[list[dict], list]:
    builders, skipped = _builders()
    rows = []
    gen = torch.Generator().manual_seed(0)
    for name, (kind, build) in builders.items():
        reward = build()
        size = sizes["replica"] if kind == "random replica" else sizes["tiny"]
        images = torch.rand(batch, 3, size, size, generator=gen)
        prompts = (PROMPTS * batch)[:batch]
        timesteps = torch.full((batch,), 500, dtype=torch.long)

        def score(reward=reward, images=images, prompts=prompts, timesteps=timesteps):
            with torch.no_grad():
                return reward(images, prompts, timesteps)

        t = interleaved({"score": score}, repeats, warmup=1, budget_s=budget_s)["score"]
        rows.append({"reward": name, "kind": kind, "size": size, "batch": batch, "s": t, "ips": batch / t,
                     "differentiable": bool(reward.differentiable)})
    return rows, skipped


def table(rows: list[dict], skipped: list) -> list[str]:
    out = markdown_table(
        ["reward", "weights", "image size", "batch", "**images/s**", "per batch", "differentiable"],
        [[r["reward"], r["kind"], f"{r['size']}²", r["batch"], f"**{r['ips']:.0f}**", f"{r['s'] * 1e3:.1f} ms",
          "yes" if r["differentiable"] else "no"] for r in rows])
    if skipped:
        out.append(f"\nNot measured (no offline replica builder): {', '.join(skipped)}.")
    return out
