#!/usr/bin/env python
"""`make bench`: speed of the shared core on the tiny world (or any `--model-path`), printed as a table.

Measures, after one warm-up: rollout throughput (images/s) at the training step count with CFG, the time of one
DDPO-style training micro-step (log-prob recompute + backward) per sample-step, and the evaluation sweep at
1/2/4/8 steps. Speed targets live here, not in the test suite. Other benchmarks: benchmarks/*.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from align_bench.core.rollout import rollout, step_log_prob  # noqa: E402
from align_bench.main import compose  # noqa: E402
from align_bench.models import DiffusionModel, ModelSpec  # noqa: E402


def timed(fn, repeat: int = 3) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tiny", help="conf/model/<name>.yaml whose settings apply")
    ap.add_argument("--model-path", default="assets/tiny-world/tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    spec = ModelSpec.from_config(compose([f"model={args.model}", f"model.path={args.model_path}"]).model)
    model = DiffusionModel.from_pretrained(spec, device=device)
    model.add_lora(4, 4)
    prompts = ["a red circle on a blue background"] * args.batch
    gen = torch.Generator().manual_seed(0)

    def sample():
        with torch.no_grad():
            return rollout(model, prompts, num_steps=args.steps, eta=1.0, guidance_scale=args.guidance, generator=gen)

    t_roll = timed(sample)
    traj = sample()

    def train_step():
        out = step_log_prob(model, traj, 0, eta=1.0, guidance_scale=args.guidance)
        out.log_prob.mean().backward()

    t_train = timed(train_step)

    def eval_sweep():
        with torch.no_grad():
            for n in (1, 2, 4, 8):
                rollout(model, prompts, num_steps=n, eta=0.0, guidance_scale=args.guidance, generator=gen)

    t_eval = timed(eval_sweep, repeat=1)
    unet_params = sum(p.numel() for p in model.unet.parameters())
    print(f"model {args.model_path}: UNet {unet_params / 1e6:.2f}M params, latents {model.latent_channels}×"
          f"{model.latent_size}², device {model.device}, {torch.get_num_threads()} threads")
    print("| measurement | value |\n|---|---|")
    print(f"| rollout, {args.batch} images × {args.steps} steps, CFG | {t_roll:.3f} s "
          f"({args.batch / t_roll:.1f} images/s) |")
    print(f"| train micro-step (log-prob + backward), batch {args.batch} | {t_train:.3f} s "
          f"({1e3 * t_train / args.batch:.2f} ms per sample-step) |")
    print(f"| eval sweep 1+2+4+8 steps, {args.batch} images | {t_eval:.3f} s |")


if __name__ == "__main__":
    main()
