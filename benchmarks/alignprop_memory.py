"""Peak memory of one AlignProp micro-step (sample with grad → decode → reward → backward) for K = 1, 5 and full
backprop at 8 steps, with and without gradient checkpointing; plus K = 1 at 4× the steps to show that the peak
does not depend on N. On CUDA: max allocated bytes above the post-load baseline; on CPU: peak RSS above the
post-load baseline (each configuration runs in a fresh process, glibc's mmap threshold pinned so freed tensors
leave RSS). Next to each measurement: the estimate that AlignProp's memory guard would plan with.

    .venv/bin/python benchmarks/alignprop_memory.py                      # tiny world if built, else a random SD
    .venv/bin/python benchmarks/alignprop_memory.py --model random --latent-size 32 --batch-size 4
    .venv/bin/python benchmarks/alignprop_memory.py --model assets/tiny-world/tiny --reward tiny_aesthetic
    .venv/bin/python benchmarks/alignprop_memory.py --device cuda --model random --latent-size 64   # on a GPU

Prints a markdown table; --json writes the rows too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """Samples this process's RSS every `interval` s in a thread (torch ops release the GIL)."""

    def __init__(self, interval: float = 0.001):
        self.interval, self.peak, self._stop = interval, _rss_bytes(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_bytes())


def _build_reward(name: str, device, kwargs: dict):
    from align_bench.rewards import build_reward

    return build_reward(name, device, **kwargs)


def measure(args) -> dict:
    """One configuration, in this process: returns the row."""
    import torch

    from align_bench.algorithms import alignprop as ap
    from align_bench.core.rollout import rollout
    from align_bench.main import compose
    from align_bench.models import DiffusionModel, ModelSpec

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model_cfg = compose(["model=tiny", f"model.path={args.model_path}", f"model.dtype={args.dtype}"]).model
    model = DiffusionModel.from_pretrained(ModelSpec.from_config(model_cfg), device=device)
    model.add_lora(4, 4)
    reward = _build_reward(args.reward, device, json.loads(args.reward_kwargs))
    prompts = ["a red circle on a blue background"] * args.batch_size
    gen = torch.Generator().manual_seed(0)
    per = ap.probe_per_sample_bytes(model, reward, prompts[0], guidance_scale=5.0, eta=1.0)
    estimate = ap.estimate_activation_bytes(args.batch_size, args.k, args.checkpointing, per)

    def step():
        traj = rollout(model, prompts, num_steps=args.steps, eta=1.0, guidance_scale=5.0, generator=gen,
                       grad_from_step=args.steps - args.k, gradient_checkpointing=args.checkpointing)
        r = reward(traj.images, prompts)
        ap.alignprop_loss(r, "negative", None).backward()

    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        t0 = time.time()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device) - base
        kind = "CUDA max allocated"
    else:
        base = _rss_bytes()
        t0 = time.time()
        with _PeakRSS() as m:
            step()
        peak = m.peak - base
        kind = "CPU peak RSS"
    return {"K": args.k, "steps": args.steps, "checkpointing": args.checkpointing, "batch": args.batch_size,
            "peak_mib": peak / 2**20, "estimate_mib": estimate / 2**20, "seconds": time.time() - t0,
            "measure": kind, "model": args.model_path, "reward": args.reward}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="auto", help="auto | random | a diffusers pipeline dir")
    p.add_argument("--reward", default=None, help="registered differentiable reward (default: tiny_aesthetic for "
                                                  "the tiny world, brightness otherwise)")
    p.add_argument("--reward-kwargs", default="{}", help='JSON, e.g. \'{"clip_dir": "...", "head_dir": "..."}\'')
    p.add_argument("--latent-size", type=int, default=32, help="random model: latent side (images 2× that)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 5, 8])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    p.add_argument("--json", default=None)
    # internal: run one configuration
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--model-path", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        args.checkpointing = bool(args.checkpointing)
        print("ROW " + json.dumps(measure(args)))
        return

    tmp = None
    if args.model == "auto":
        args.model = "assets/tiny-world/tiny" if (ROOT / "assets/tiny-world/tiny").exists() else "random"
    if args.model == "random":
        from align_bench.models.testing import build_random_pipeline

        tmp = tempfile.mkdtemp(prefix="alignprop_mem_")
        model_path = str(build_random_pipeline(Path(tmp) / "pipe", latent_size=args.latent_size))
        reward = args.reward or "brightness"
    else:
        model_path = args.model
        reward = args.reward or ("tiny_aesthetic" if "tiny-world" in args.model else "brightness")

    configs = [(k, ckpt, args.steps) for k in args.ks for ckpt in (True, False) if k <= args.steps]
    configs.append((1, True, 4 * args.steps))  # K = 1 with checkpointing at 4× the steps: same peak
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT / "src")}
    rows = []
    for k, ckpt, steps in configs:
        cmd = [sys.executable, __file__, "--one", "--k", str(k), "--checkpointing", str(int(ckpt)), "--steps",
               str(steps), "--model-path", model_path, "--reward", reward, "--reward-kwargs", args.reward_kwargs,
               "--batch-size", str(args.batch_size),
               "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("ROW ")]
        if not line:
            print(out.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"configuration K={k} checkpointing={ckpt} steps={steps} failed")
        rows.append(json.loads(line[0][4:]))
        r = rows[-1]
        print(f"  K={k} steps={steps} ckpt={ckpt}: {r['peak_mib']:.1f} MiB ({r['seconds']:.1f} s)", file=sys.stderr)

    print(f"\nAlignProp micro-step memory — model {model_path}, reward {reward}, batch {args.batch_size}, "
          f"device {args.device} ({rows[0]['measure']} above the post-load baseline)\n")
    print("| K | steps | checkpointing | peak (MiB) | guard estimate (MiB) | time (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        k = f"{r['K']} (full)" if r["K"] == r["steps"] else str(r["K"])
        print(f"| {k} | {r['steps']} | {'yes' if r['checkpointing'] else 'no'} | {r['peak_mib']:.1f} | "
              f"{r['estimate_mib']:.1f} | {r['seconds']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
