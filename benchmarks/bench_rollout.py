"""Section 1, rollout overhead: `core.rollout.rollout` (stochastic DDIM, η = 1, log-probs, every step's latents
stored, LoRA attached, no decode) against the stock diffusers pipeline's `__call__` on the same modules, batch,
steps, scheduler grid and CFG, with output_type="latent". Both encode their prompts inside the timed call."""

from __future__ import annotations

import torch

from bench_common import PROMPTS, Bench, fmt_s, interleaved, markdown_table, ratio


def measure(bench: Bench, batch: int, steps: list[int], repeats: int, guidance: float = 5.0,
            budget_s: float | None = None) -> list[dict]:
    from align_bench.core.rollout import rollout

    model, pipe = bench.model, bench.stock_pipeline()
    prompts = (PROMPTS * batch)[:batch]
    size = bench.image_size

    def ours(n):
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            return rollout(model, prompts, num_steps=n, eta=1.0, guidance_scale=guidance, generator=gen,
                           decode=False)

    def stock(n):
        gen = torch.Generator().manual_seed(0)
        return pipe(prompt=prompts, num_inference_steps=n, guidance_scale=guidance, eta=1.0, output_type="latent",
                    generator=gen, height=size, width=size).images

    ours(1), stock(1)  # warm-up (allocator, lazy inits, the cached unconditional embedding)
    rows = []
    for n in steps:
        t = interleaved({"ours": lambda n=n: ours(n), "stock": lambda n=n: stock(n)}, repeats, warmup=0,
                        budget_s=budget_s)
        rows.append({"model": bench.name, "batch": batch, "steps": n, "ours_s": t["ours"], "stock_s": t["stock"],
                     "ratio": t["ours"] / t["stock"]})
    return rows


def table(rows: list[dict]) -> list[str]:
    return markdown_table(
        ["model", "batch", "steps", "**align_bench / stock**", "align_bench", "stock pipeline", "per step (ours)"],
        [[r["model"], r["batch"], r["steps"], f"**{ratio(r['ours_s'], r['stock_s'])}**", fmt_s(r["ours_s"]),
          fmt_s(r["stock_s"]), fmt_s(r["ours_s"] / r["steps"])] for r in rows])
