"""`make gpu-smoke`: one DDPO update of every real model × real reward whose checkpoints are on this machine, on a
GPU, through the same `runner.run` as `train.py`; plus, per reward, a gradient check of its differentiable path on
real decoded images. Prints a table and says what it skipped and why (no GPU, a missing checkpoint, a missing
extra). Exit status 1 if any check that could run failed.

    python tests/scripts/gpu_smoke.py [--models sd15,sdxl] [--rewards pickscore] [--out runs/gpu-smoke]

Checkpoints are looked up as train.py looks them up (a local directory or the Hugging Face cache;
HF_HUB_OFFLINE=1 is honoured), so download them first, e.g. `huggingface-cli download stabilityai/sd-turbo`.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import traceback

MODELS = ("sd15", "sd_turbo", "lcm", "sdxl", "sdxl_turbo")
REWARDS = ("aesthetic", "pickscore", "hpsv2", "imagereward")
# one update: one rollout batch of 2 trajectories, one minibatch, one epoch; evaluation at 1 step on 1 prompt
RUN = ["algo=ddpo", "prompts=simple_animals", "prompts.eval_max_prompts=1", "prompts.eval_seeds_per_prompt=1",
       "steps.eval=[1]", "algo.num_epochs=1", "algo.sample.batch_size=2", "algo.sample.num_batches_per_epoch=1",
       "algo.train.batch_size=2", "algo.train.gradient_accumulation_steps=1", "eval.batch_size=2", "logger=quiet",
       "logger.save_images=false", "logger.plots=false"]
TRAIN_STEPS = {"sd15": 10, "sd_turbo": 2, "lcm": 4, "sdxl": 10, "sdxl_turbo": 2}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rewards", default=",".join(REWARDS))
    parser.add_argument("--out", default="runs/gpu-smoke")
    parser.add_argument("--cpu", action="store_true", help="run without a GPU (to check the script itself)")
    args = parser.parse_args()
    models, rewards = args.models.split(","), args.rewards.split(",")
    import torch

    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print(f"gpu-smoke: no CUDA device — skipped all {len(models) * len(rewards)} model × reward updates")
        return 0
    from align_bench.main import compose
    from align_bench.models import ModelSpec
    from align_bench.models.diffusion import _check_path
    from align_bench.models.hub import MissingCheckpointError
    from align_bench.rewards import build_reward
    from align_bench.rewards.pretrained import MissingRewardDependency
    from align_bench.runner import run

    skipped, rows, failed = [], [], False
    present_models = []
    for m in models:
        cfg = compose([f"model={m}"])
        try:
            _check_path(ModelSpec.from_config(cfg.model))
            present_models.append(m)
        except MissingCheckpointError as e:
            skipped.append(str(e))
    present_rewards = []
    for r in rewards:
        cfg = compose([f"reward={r}"])
        try:
            reward = build_reward(r, device, **cfg.reward.kwargs)
        except (MissingCheckpointError, MissingRewardDependency) as e:
            skipped.append(str(e))
            continue
        images = torch.rand(2, 3, 512, 512, device=device, requires_grad=True)
        scores = reward(images, ["a photo of a cat", "a watercolor of a fox"])
        scores.sum().backward()
        ok = bool(torch.isfinite(scores).all() and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0)
        rows.append((f"reward={r} gradient", "ok" if ok else "FAILED", f"{scores.detach().cpu().tolist()}",
                     reward.convention))
        failed |= not ok
        present_rewards.append(r)
        del reward, images
        if device == "cuda":
            torch.cuda.empty_cache()

    for m in present_models:
        for r in present_rewards:
            out = os.path.join(args.out, f"{m}-{r}")
            t0 = time.time()
            try:
                cfg = compose([f"model={m}", f"reward={r}", *RUN, f"steps.train={TRAIN_STEPS.get(m, 4)}",
                               f"run_dir={out}", f"device={'cpu' if args.cpu else 'auto'}"])
                metrics = run(cfg, out)
                final = metrics["eval"]["final"][r]["1"]["mean"]
                base = metrics["eval"].get("base", {}).get(r, {}).get("1", {}).get("mean", float("nan"))
                ok = metrics["run"]["optimizer_steps"] >= 1
                peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
                rows.append((f"{m} × {r}", "ok" if ok else "FAILED", f"eval@1 base {base:.4g} → final {final:.4g}",
                             f"{time.time() - t0:.0f} s, {peak:.1f} GiB peak"))
                failed |= not ok
            except Exception as e:  # noqa: BLE001 - report every combination, then fail at the end
                traceback.print_exc()
                rows.append((f"{m} × {r}", "FAILED", f"{type(e).__name__}: {e}"[:200], ""))
                failed = True
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()

    print("\ngpu-smoke results")
    for row in rows:
        print(" | ".join(row))
    for line in skipped:
        print(f"skipped: {line}")
    if not rows:
        print("gpu-smoke: nothing could run (see the skipped lines for what to download or install)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
