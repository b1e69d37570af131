"""Cache of the base model's evaluation (LoRA off): it depends only on the model, the eval set and the code, so a
sweep of many runs on one model computes it once. Keyed by a hash of everything the numbers depend on: the model
section of the config and its weight files (path, size, mtime), the (prompt, seed) items, step counts, rewards,
sampler settings, eval batch size (batch composition changes CPU numerics in the last bits), process count,
device, dtype, and the contents of the package's source files (a stricter key than the commit: uncommitted
edits count). A stale entry can never be served; a cache dir can always be deleted."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from .. import REPO_ROOT


def cache_dir() -> Path:
    """$ALIGN_BENCH_CACHE/base_eval, default ~/.cache/align_bench/base_eval."""
    root = os.environ.get("ALIGN_BENCH_CACHE") or Path.home() / ".cache" / "align_bench"
    return Path(root) / "base_eval"


def _source_digest() -> str:
    h = hashlib.sha256()
    for p in sorted((REPO_ROOT / "src" / "align_bench").rglob("*.py")):
        h.update(p.relative_to(REPO_ROOT).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _weights_fingerprint(path: str) -> list:
    root = Path(path)
    if not root.is_absolute():
        root = REPO_ROOT / root
    if not root.exists():
        return [str(path)]  # a hub id: the hub's own revision pinning applies
    return [[str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns]
            for p in sorted(root.rglob("*")) if p.is_file() and p.suffix in (".safetensors", ".bin", ".json")]


def base_eval_key(model_cfg: dict, items: list, eval_settings: dict) -> str:
    """sha256 over everything the base eval's numbers depend on (see module docstring)."""
    payload = {"model": model_cfg, "weights": _weights_fingerprint(model_cfg["path"]), "items": items,
               "eval": eval_settings, "source": _source_digest()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def load(key: str, grid_to: Path | None = None) -> dict | None:
    """The cached table for `key` (and its sample grid copied to `grid_to`), or None."""
    entry = cache_dir() / key
    try:
        table = json.loads((entry / "table.json").read_text())
    except (OSError, ValueError):
        return None
    if grid_to is not None and (entry / "grid.png").is_file():
        shutil.copyfile(entry / "grid.png", grid_to)
    return table


def store(key: str, table: dict, grid: Path | None = None) -> None:
    """Atomically add an entry (a concurrent run storing the same key is harmless: same content)."""
    entry = cache_dir() / key
    tmp = entry.with_name(f"{key}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "table.json").write_text(json.dumps(table))
    if grid is not None and Path(grid).is_file():
        shutil.copyfile(grid, tmp / "grid.png")
    try:
        os.replace(tmp, entry)
    except OSError:  # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)
