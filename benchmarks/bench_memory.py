"""Section 4, memory: peak RSS of one tiny-world epoch of each algorithm at its preset (experiment=tiny_<algo>),
each in a fresh subprocess (glibc's mmap threshold pinned so freed tensors leave RSS, as
benchmarks/alignprop_memory.py does). Reported: the process's peak RSS (ru_maxrss: weights, libraries and all) and
the peak above the RSS after the models loaded (what the algorithm itself adds). On CUDA: max allocated."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_common import ROOT, markdown_table

HERE = Path(__file__).resolve().parent


def child(experiment: str, threads: int) -> dict:
    """In the subprocess: load the run (models, LoRA, reward) as runner.run does, then time one epoch of the
    algorithm under an RSS sampler."""
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(HERE))
    from alignprop_memory import _PeakRSS, _rss_bytes
    from bench_update import make_ctx

    ctx, algo = make_ctx(experiment, accumulation=0)
    ctx.run_dir = Path(tempfile.mkdtemp(prefix="bench_mem_"))
    state = algo.init_state(ctx)
    cuda = torch.cuda.is_available()
    base = torch.cuda.memory_allocated() if cuda else _rss_bytes()
    with _PeakRSS() as peak:
        algo.train_epoch(ctx, state, 0)
    above = (torch.cuda.max_memory_allocated() - base) if cuda else peak.peak - base
    return {"experiment": experiment, "algo": ctx.cfg.algo.name, "model": ctx.cfg.model.name,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "loaded_rss_mib": base / 2**20, "above_loaded_mib": above / 2**20}


def measure(algos: list[str], threads: int) -> list[dict]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT / "src"),
           "OMP_NUM_THREADS": str(threads)}
    rows = []
    for name in algos:
        code = (f"import sys, json; sys.path.insert(0, {str(HERE)!r}); import bench_memory; "
                f"print('ROW ' + json.dumps(bench_memory.child('tiny_{name}', {threads})))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("ROW ")]
        if not line:
            print(out.stderr[-3000:], file=sys.stderr)
            rows.append({"experiment": f"tiny_{name}", "algo": name, "error": "failed"})
            continue
        rows.append(json.loads(line[0][4:]))
    return rows


def table(rows: list[dict]) -> list[str]:
    return markdown_table(
        ["algorithm", "model", "**epoch peak above loaded (MiB)**", "process peak RSS, loading included (MiB)",
         "RSS after load (MiB)"],
        [[r["algo"], "—", "failed", "", ""] if "error" in r else
         [r["algo"], r["model"], f"**{r['above_loaded_mib']:.0f}**", f"{r['peak_rss_mib']:.0f}",
          f"{r['loaded_rss_mib']:.0f}"] for r in rows])
