"""Section 5, end to end: one tiny-world epoch of each algorithm at its preset (experiment=tiny_<algo>), after one
untimed warm-up epoch, with the time split by wrapping the seams every algorithm goes through with timers
(exclusive time: a call nested in another counts for itself only):

  sampling     ctx.rollout (the UNet steps of trajectory sampling) and SPO's branching sampler
  decode       DiffusionModel.decode (VAE), wherever it is called (in ctx.rollout, SDPO's x̂0, SPO's children)
  reward       ctx.score
  reference    common.reference_log_probs (D3PO, SPO: the LoRA-off pass)
  log-prob fwd step_log_prob as each algorithm calls it (with grad, or REBEL's no-grad residual pass)
  backward     ctx.backward (backward, clipping, optimizer step)
  bookkeeping  the rest of train_epoch: advantages, shuffling, selection, logging"""

from __future__ import annotations

import importlib
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from bench_common import markdown_table

CATEGORIES = ("sampling", "decode", "reward", "reference", "log-prob fwd", "backward", "bookkeeping")


class Profile:
    def __init__(self):
        self.exclusive: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list] = []

    def wrap(self, category: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            self._stack.append([category, 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                cat, children = self._stack.pop()
                self.exclusive[cat] += dt - children
                self.calls[cat] += 1
                if self._stack:
                    self._stack[-1][1] += dt

        return timed


def _instrument(ctx, algo, prof: Profile) -> dict:
    """Wrap the seams; returns the algorithm module's original names (to put back)."""
    ctx.rollout = prof.wrap("sampling", ctx.rollout)
    ctx.score = prof.wrap("reward", ctx.score)
    ctx.backward = prof.wrap("backward", ctx.backward)
    ctx.model.decode = prof.wrap("decode", ctx.model.decode)
    mod = importlib.import_module(algo.__name__)
    originals = {}
    for name, cat in (("step_log_prob", "log-prob fwd"), ("reference_log_probs", "reference"),
                      ("branching_rollout", "sampling")):
        if hasattr(mod, name):
            originals[name] = getattr(mod, name)
            setattr(mod, name, prof.wrap(cat, originals[name]))
    return originals


def _restore(algo, originals: dict) -> None:
    mod = importlib.import_module(algo.__name__)
    for name, fn in originals.items():
        setattr(mod, name, fn)


def measure(algos: list[str]) -> list[dict]:
    from bench_update import make_ctx

    rows = []
    for name in algos:
        ctx, algo = make_ctx(f"tiny_{name}", accumulation=0)
        ctx.run_dir = Path(tempfile.mkdtemp(prefix="bench_epoch_"))
        state = algo.init_state(ctx)
        algo.train_epoch(ctx, state, 0)  # warm-up (allocator, lazy inits, trackers past their first epoch)
        prof = Profile()
        counts = dict(ctx.counters)
        originals = _instrument(ctx, algo, prof)
        try:
            t0 = time.perf_counter()
            algo.train_epoch(ctx, state, 1)
            total = time.perf_counter() - t0
        finally:
            _restore(algo, originals)
        shares = {c: prof.exclusive.get(c, 0.0) for c in CATEGORIES if c != "bookkeeping"}
        shares["bookkeeping"] = max(0.0, total - sum(shares.values()))
        rows.append({"algo": name, "model": ctx.cfg.model.name, "total_s": total, "shares": shares,
                     "images": ctx.counters["images"] - counts["images"],
                     "reward_queries": ctx.counters["reward_queries"] - counts["reward_queries"]})
    return rows


def table(rows: list[dict]) -> list[str]:
    return markdown_table(
        ["algorithm", "model", "epoch", "images", *CATEGORIES],
        [[r["algo"], r["model"], f"{r['total_s']:.2f} s", r["images"],
          *(f"{100 * r['shares'][c] / r['total_s']:.0f} %" if r["shares"][c] > 0 else "—" for c in CATEGORIES)]
         for r in rows])
