#!/usr/bin/env python
"""`make bench`: how close align_bench runs to what the hardware allows, as RATIOS measured in one process with the
compared variants interleaved (A, B, A, B, …; medians), so that a loaded machine shifts both sides alike.

Sections (`--sections`, default all):
  rollout  core.rollout.rollout (log-probs, stored latents, LoRA) / the stock diffusers pipeline call (latents out),
           same modules, batch, steps, grid and CFG: tiny world, SD 1.5- and SDXL-architecture random UNets
  update   one training micro-step of each algorithm / a bare LoRA-UNet forward + backward (AlignProp: per image,
           against its K steps + decoder + reward)
  rewards  images/s of every registered reward (tiny world; random replicas of the real scorers)
  memory   peak RSS of one epoch of each tiny preset, each in a fresh process
  epoch    one tiny-world epoch per algorithm, its time split over sampling / decode / reward / reference /
           log-prob forward / backward / bookkeeping by timers on those seams
Writes the Markdown to benchmarks/results/<machine>.md (--out to change) and prints it. Absolute times are context
only; read the ratios. docs/performance.md explains the table.

    python benchmarks/run_all.py                    # ~10 min on a loaded 2-core CPU
    python benchmarks/run_all.py --quick            # tiny world only, fewer repeats (~4 min)
    python benchmarks/run_all.py --full             # + 8 and 20 steps on the real architectures, more repeats
    python benchmarks/run_all.py --sections rollout update --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402

SECTIONS = ("rollout", "update", "rewards", "memory", "epoch")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    ap.add_argument("--quick", action="store_true", help="tiny world only, fewer repeats")
    ap.add_argument("--full", action="store_true", help="every step count on the real architectures, more repeats")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: see docs/performance.md)")
    ap.add_argument("--algos", nargs="+", default=None, help="algorithms of the update/memory/epoch sections")
    ap.add_argument("--batch", type=int, default=16, help="rollout batch on the tiny world")
    ap.add_argument("--out", default=None, help="results file (default benchmarks/results/<machine>.md; '-': none)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # diffusers' deprecation notes (the tiny world's steps_offset=0) and the like
    _quiet()
    from bench_update import ALGOS

    algos = args.algos or list(ALGOS)
    repeats = 3 if args.quick else (9 if args.full else 5)
    update_repeats = 2 * repeats + 1  # a tiny micro-step is ~0.1 s: more rounds, steadier medians
    t_start = time.time()
    body: list[str] = []

    def section(title: str, lines: list[str], note: str = "") -> None:
        body.extend([f"## {title}", "", *([note, ""] if note else []), *lines, ""])
        print("\n".join([f"## {title}", *lines, ""]), flush=True)

    if "rollout" in args.sections:
        import bench_rollout

        rows = bench_rollout.measure(bc.load_tiny("tiny"), args.batch, [1, 2, 4, 8, 20], repeats)
        rows += bench_rollout.measure(bc.load_tiny("tiny"), 2, [1, 8], repeats)
        notes = []
        if not args.quick:
            real_steps = [1, 2, 4, 8, 20] if args.full else [1, 2, 4]
            for build in (bc.build_sd15_arch, bc.build_sdxl_arch):
                bench = build(latent_size=8)
                notes.append(f"{bench.name}: {bench.note}.")
                rows += bench_rollout.measure(bench, 1, real_steps, 3 if not args.full else 5, budget_s=60)
                del bench
        section("1. Rollout overhead (target ≤ 1.05×)", bench_rollout.table(rows),
                "align_bench's `rollout` (η = 1, log-probs, every step's latents kept, LoRA rank 4 attached, no "
                "decode) against `StableDiffusionPipeline` / `StableDiffusionXLPipeline.__call__` (DDIM, η = 1, "
                "output_type=\"latent\") on the same modules, CFG 5, prompts encoded inside both calls. "
                + " ".join(notes))

    if "update" in args.sections:
        import bench_update

        rows = bench_update.measure(algos, update_repeats)
        section("2. Update cost (target ≤ 1.15× for the log-prob algorithms)", bench_update.table(rows),
                "One micro-step as the algorithm's inner loop runs it (its loss over `step_log_prob`, `ctx.backward` "
                "in `accelerator.accumulate`, `record_step`), against a bare forward + backward of the same LoRA-UNet "
                "on the same batch and guidance. No optimizer step on either side.")

    if "rewards" in args.sections:
        import bench_rewards

        rows, skipped = bench_rewards.measure(32, {"tiny": 32, "replica": 256}, 3 if args.quick else 5)
        section("3. Rewards", bench_rewards.table(rows, skipped),
                "No grad, one batch per call. Replicas: the real loaders, preprocessing and heads over a few-thousand-"
                "parameter network (rewards/testing.py); their images/s shows the code path's overhead, not a ViT's "
                "speed.")

    if "memory" in args.sections:
        import bench_memory

        section("4. Memory (one epoch of each tiny preset, fresh process)",
                bench_memory.table(bench_memory.measure(algos, args.threads)))

    if "epoch" in args.sections:
        import bench_epoch

        section("5. End to end: where one tiny-world epoch goes", bench_epoch.table(bench_epoch.measure(algos)),
                "Shares of one epoch (after a warm-up epoch) by timers on the seams (exclusive time); "
                "benchmarks/bench_epoch.py lists what each column covers.")

    cmd = "python benchmarks/run_all.py " + " ".join(sys.argv[1:])
    header = [f"# `make bench` on {bc.machine_slug()}", "",
              "Ratios are the result; absolute times are context (a shared machine's load moves them). "
              "docs/performance.md explains each section.", "",
              f"- command: `{cmd.strip()}`",
              f"- commit: {bc.git_commit()}",
              f"- versions: {bc.versions()}",
              f"- torch threads: {torch.get_num_threads()}; device: "
              f"{'cuda ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}; "
              f"load average at the end: {bc.load_average()} on {__import__('os').cpu_count()} cores",
              f"- wall time: {time.time() - t_start:.0f} s; repeats per variant: {repeats} (medians, interleaved)", ""]
    text = "\n".join(header + body)
    if args.out != "-":
        out = Path(args.out) if args.out else bc.ROOT / "benchmarks" / "results" / f"{bc.machine_slug()}.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"written: {out}")


def _quiet() -> None:
    import logging

    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("align_bench").setLevel(logging.WARNING)


if __name__ == "__main__":
    main()
