#!/usr/bin/env python
"""SDPO's central comparison on one model: several presets × seeds, each evaluated at 1/2/4/8 steps, written as a
table of mean ± 95 % CI over seeds (base, final and the paired gain final − base).

    python experiments/step_table.py                                  # tiny_sdpo vs tiny_turbo_{ddpo,d3po,rebel}
    python experiments/step_table.py --presets tiny_sdpo tiny_ddpo --seeds 0 1 --jobs 2 -- algo.num_epochs=4

Each (preset, seed) runs `python train.py experiment=<preset> seed=<s>` in its own run directory under --runs;
a run whose metrics.json already has a final eval is reused, so an interrupted sweep resumes where it stopped.
Arguments after `--` are passed to every run (shortened budgets, say). Writes <out>.md and <out>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PRESETS = ["tiny_sdpo", "tiny_turbo_ddpo", "tiny_turbo_d3po", "tiny_turbo_rebel"]
# two-sided 95 % Student-t quantiles by degrees of freedom (no scipy dependency)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def ci95(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95 % t interval); half-width NaN for a single value."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return float(x.mean()), float("nan")
    t = T95.get(len(x) - 1, 1.96)
    return float(x.mean()), float(t * x.std(ddof=1) / math.sqrt(len(x)))


def run_one(preset: str, seed: int, runs: Path, extra: list[str], threads: int) -> Path:
    """Train one (preset, seed) unless its metrics already hold a final eval. Returns its metrics.json."""
    run_dir = runs / preset / f"seed{seed}"
    metrics = run_dir / "metrics.json"
    if metrics.is_file() and "final" in json.loads(metrics.read_text()).get("eval", {}):
        print(f"[reuse] {preset} seed {seed}", flush=True)
        return metrics
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, str(ROOT / "train.py"), f"experiment={preset}", f"seed={seed}", f"run_dir={run_dir}",
           "logger=quiet", "logger.save_images=false", "logger.plots=false", *extra]
    t0 = time.time()
    print(f"[start] {preset} seed {seed}: {' '.join(cmd[2:])}", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "stdout.log", "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"{preset} seed {seed} failed (exit {rc}); see {run_dir / 'stdout.log'}")
    print(f"[done]  {preset} seed {seed} in {time.time() - t0:.0f} s", flush=True)
    return metrics


def collect(paths: dict[tuple[str, int], Path], reward: str | None) -> dict:
    """{preset: {"base"|"final"|"gain": {steps: [per-seed means]}, "reward_queries": int, "wall_s": [..]}}."""
    out: dict = {}
    for (preset, seed), path in sorted(paths.items()):
        m = json.loads(path.read_text())
        name = reward or m["run"]["reward"]
        row = out.setdefault(preset, {"base": {}, "final": {}, "gain": {}, "seeds": [], "wall_s": [],
                                      "reward_queries": m["run"]["reward_queries"], "reward": name,
                                      "model": m["run"]["model"]})
        row["seeds"].append(seed)
        row["wall_s"].append(m["run"]["wall_time_s"])
        for steps, final in m["eval"]["final"][name].items():
            base = m["eval"]["base"][name][steps]["mean"]
            row["base"].setdefault(steps, []).append(base)
            row["final"].setdefault(steps, []).append(final["mean"])
            row["gain"].setdefault(steps, []).append(final["mean"] - base)
    return out


def fmt(values: list[float], signed: bool = False) -> str:
    mean, half = ci95(values)
    s = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return s if math.isnan(half) else f"{s} ± {half:.2f}"


def markdown(table: dict, args) -> str:
    presets = list(table)
    steps = sorted({s for row in table.values() for s in row["final"]}, key=int)
    lines = [f"Seeds {', '.join(map(str, table[presets[0]]['seeds']))}; mean ± 95 % CI (Student t over seeds); "
             f"reward `{table[presets[0]]['reward']}` on the fixed eval set (DDIM η = 0 for DDIM models).", ""]
    lines += ["| preset | model | reward queries | " + " | ".join(f"{s} step{'s' * (s != '1')}" for s in steps)
              + " | wall (s, mean) |", "|---|---|---|" + "---|" * len(steps) + "---|"]
    base_row = table[presets[0]]["base"]
    lines.append("| base (LoRA off) | " + table[presets[0]]["model"] + " | 0 | "
                 + " | ".join(fmt(base_row[s]) for s in steps) + " | |")
    for p in presets:
        r = table[p]
        lines.append(f"| `{p}` final | {r['model']} | {r['reward_queries']} | "
                     + " | ".join(fmt(r["final"][s]) for s in steps) + f" | {np.mean(r['wall_s']):.0f} |")
    lines += ["", "Gain final − base (paired, same eval seeds):", "",
              "| preset | " + " | ".join(steps) + " |", "|---|" + "---|" * len(steps)]
    for p in presets:
        lines.append(f"| `{p}` | " + " | ".join(fmt(table[p]["gain"][s], signed=True) for s in steps) + " |")
    if args.extra:
        lines += ["", f"Overrides passed to every run: `{' '.join(args.extra)}`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "step_table", help="run directories (resumable)")
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "step_table",
                    help="output stem: writes <out>.md and <out>.json")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel")
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per run")
    ap.add_argument("--reward", default=None, help="eval reward to tabulate (default: each run's training reward)")
    args = ap.parse_args(argv)
    args.extra = extra
    jobs = [(p, s) for s in args.seeds for p in args.presets]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {job: pool.submit(run_one, *job, args.runs, extra, args.threads) for job in jobs}
        paths = {job: f.result() for job, f in futures.items()}
    table = collect(paths, args.reward)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(table, indent=2))
    md = markdown(table, args)
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
