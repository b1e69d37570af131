"""Checkpoints: LoRA weights in diffusers' format (stock `pipe.load_lora_weights(dir)` reads them) plus everything a
resume needs to continue bit for bit — optimizer (Adam moments, step, LR), every RNG stream of every process
(python, numpy, torch CPU and CUDA, the sampling generator, the prompt sampler), algorithm state (stat trackers),
counters, numerical-fault counts, accelerate's accumulation counter and the metrics so far.

Layout: <run_dir>/checkpoints/epoch_<E>/
    pytorch_lora_weights.safetensors   the LoRA (safetensors: no code)
    training_state.pt                  plain tensors, numbers, strings, lists, dicts: read with
                                       torch.load(weights_only=True), so nothing in a run dir can execute code
    meta.json                          epoch, the config the run was made with, sha256 and size of both files

Atomic: a checkpoint is written into `checkpoints/.partial-epoch_<E>` and renamed to `epoch_<E>` only once every
file is on disk (fsync'd), so a kill at any instant leaves either the complete checkpoint or none; pruning renames
a directory out of the way before deleting it. Only rank 0 writes; every rank's own streams are gathered to it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

LORA_FILE = "pytorch_lora_weights.safetensors"
STATE_FILE = "training_state.pt"
META_FILE = "meta.json"
FORMAT = 2

# Keys a resumed run may change without invalidating the checkpoint: run length, logging, checkpointing, where it
# runs, evaluation cadence. Every other key (algorithm, model, LoRA rank, reward, seed, prompts, steps, ...) must
# match, or the resumed run would not be the run that was interrupted.
RESUMABLE_CHANGES = ("algo.num_epochs", "logger.", "checkpoint.", "guards.", "resume", "run_dir", "name", "eval.every",
                     "dist_timeout_s", "device")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: the message names the file and what is wrong with it."""


# ------------------------------------------------------------------------------------------------ listing
def _root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _dirs(run_dir: Path) -> list[Path]:
    root = _root(run_dir)
    if not root.is_dir():
        return []
    done = [d for d in root.iterdir() if d.is_dir() and d.name.startswith("epoch_") and d.name[6:].isdigit()]
    return sorted(done, key=lambda d: int(d.name[6:]))


def latest(run_dir: Path) -> Path | None:
    """The newest checkpoint directory (only complete ones carry the name epoch_<E>), or None."""
    found = _dirs(run_dir)
    return found[-1] if found else None


def remove_all(run_dir: Path) -> int:
    """Delete every checkpoint of `run_dir` (resume=false starts over). Returns how many were removed."""
    found = _dirs(run_dir)
    if _root(run_dir).is_dir():
        shutil.rmtree(_root(run_dir))
    return len(found)


# ------------------------------------------------------------------------------------------------ config identity
def _flat(cfg) -> dict:
    container = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else cfg
    out: dict = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        else:
            out[prefix[:-1]] = node

    walk("", container)
    return out


def config_differences(saved: dict, cfg) -> list[str]:
    """`key (saved → now)` for every key that differs between a checkpoint's config (flattened, as in meta.json)
    and this run's, except the ones a resume may change (RESUMABLE_CHANGES)."""
    now = json.loads(json.dumps(_flat(cfg), default=str))  # the same JSON round trip the saved side went through
    diffs = []
    for key in sorted(set(saved) | set(now)):
        if key.startswith(RESUMABLE_CHANGES) or key in RESUMABLE_CHANGES:
            continue
        if saved.get(key, "<absent>") != now.get(key, "<absent>"):
            diffs.append(f"{key} ({saved.get(key, '<absent>')!r} → {now.get(key, '<absent>')!r})")
    return diffs


# ------------------------------------------------------------------------------------------------ state capture
def _rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                    int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(value):
    """States and metrics as weights_only-loadable types: numpy arrays and scalars become tensors and Python
    numbers, str subclasses (torch.__version__ is one) plain str; dict keys that are tuples stay tuples."""
    if isinstance(value, str):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return value.item()
    return value


def capture(ctx, state: dict, epoch: int, metrics: dict) -> dict:
    """Everything a resume at `epoch` (epochs completed) needs, copied (later training does not change it). Reads
    RNG states without drawing from them, so capturing changes nothing in the run."""
    return {
        "epoch": int(epoch),
        "lora": {k: v.detach().clone().cpu() for k, v in ctx.model.lora_state_dict().items()},
        "shared": {
            "optimizer": copy.deepcopy(ctx.optimizer.state_dict()),
            "algo_state": {k: _plain(copy.deepcopy(v.state_dict())) for k, v in state.items()
                           if hasattr(v, "state_dict")},
            "metrics": _plain(copy.deepcopy(metrics)),
        },
        "rank": {  # this process's own streams and counters
            "generator": ctx.generator.get_state(),
            "prompt_sampler": _plain(copy.deepcopy(ctx.prompt_sampler.state_dict())),
            "counters": dict(ctx.counters),
            "faults": copy.deepcopy(ctx.faults),
            "rng": _rng_state(),
            "accelerator_step": int(getattr(ctx.accelerator, "step", 0)),
        },
    }


# ------------------------------------------------------------------------------------------------ writing
def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write(run_dir: Path, snapshot: dict, ctx, keep: int) -> Path | None:
    """Write a `capture`d snapshot as checkpoint epoch_<E> (collective: every process calls it; rank 0 writes),
    then keep the newest `keep`. Returns the directory on rank 0, None elsewhere."""
    from safetensors.torch import save_file

    acc = ctx.accelerator
    ranks = [snapshot["rank"]]
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        ranks = gather_object(ranks)
    if not acc.is_main_process:
        return None
    root = _root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    epoch = snapshot["epoch"]
    final, partial = root / f"epoch_{epoch}", root / f".partial-epoch_{epoch}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    save_file({f"unet.{k}": v.contiguous() for k, v in snapshot["lora"].items()}, str(partial / LORA_FILE))
    payload = {"format": FORMAT, "epoch": epoch, **snapshot["shared"], "ranks": ranks}
    torch.save(payload, partial / STATE_FILE)
    for name in (LORA_FILE, STATE_FILE):
        with open(partial / name, "rb") as f:
            os.fsync(f.fileno())
    files = {n: {"sha256": _sha256(partial / n), "bytes": (partial / n).stat().st_size}
             for n in (LORA_FILE, STATE_FILE)}
    meta = {"format": FORMAT, "epoch": epoch, "num_processes": acc.num_processes, "config": _flat(ctx.cfg),
            "files": files}
    _fsync_write(partial / META_FILE, json.dumps(meta, indent=1, default=str).encode())
    if final.exists():  # the same epoch written again (a resumed run that checkpoints where it started)
        trash = root / f".trash-{final.name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(partial, final)
    _fsync_dir(root)
    prune(run_dir, keep)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints; drop leftovers of interrupted writes. An old checkpoint is renamed out
    of the epoch_<E> namespace first, so a kill while deleting never leaves a half-deleted 'newest' one."""
    root = _root(run_dir)
    for old in _dirs(run_dir)[:-keep] if keep > 0 else []:
        trash = root / f".trash-{old.name}"
        os.replace(old, trash)
    for leftover in root.glob(".trash-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def clean_partial(run_dir: Path) -> None:
    """Remove `.partial-*` directories a kill left behind (never complete, never read)."""
    root = _root(run_dir)
    if root.is_dir():
        for leftover in list(root.glob(".partial-*")) + list(root.glob(".trash-*")):
            shutil.rmtree(leftover, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ reading
def verify(directory: Path, cfg=None, num_processes: int | None = None) -> dict:
    """Check a checkpoint without loading any model: meta.json parses, both files are there with the recorded size
    and sha256, and (given `cfg`) it was made by the same configuration. Returns its meta; raises CheckpointError
    naming the file and what is wrong."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {directory}: {META_FILE} is missing (written by an older align_bench, or "
                              f"not a checkpoint); delete the directory or resume=false to start over")
    try:
        meta = json.loads(meta_path.read_text())
        files = meta["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {meta_path} is corrupted ({type(e).__name__}: {e}); delete "
                              f"{directory} to resume from the previous checkpoint") from None
    for name in (LORA_FILE, STATE_FILE):
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {directory}: {name} is missing; delete {directory} to resume from "
                                  f"the previous checkpoint")
        size = path.stat().st_size
        if size != files[name]["bytes"]:
            raise CheckpointError(f"checkpoint file {path} is truncated or overwritten ({size} bytes, "
                                  f"{files[name]['bytes']} written); delete {directory} to resume from the previous "
                                  f"checkpoint")
        if _sha256(path) != files[name]["sha256"]:
            raise CheckpointError(f"checkpoint file {path} is corrupted (sha256 differs from the one written); "
                                  f"delete {directory} to resume from the previous checkpoint")
    if cfg is not None:
        diffs = config_differences(meta.get("config", {}), cfg)
        if num_processes is not None and meta.get("num_processes") != num_processes:
            diffs.append(f"number of processes ({meta.get('num_processes')} → {num_processes})")
        if diffs:
            raise CheckpointError(f"checkpoint {directory} was made by a different config: {'; '.join(diffs)} — "
                                  f"resume=false starts over (deleting the checkpoints), or set name=/run_dir= for a "
                                  f"separate run")
    return meta


def load(directory: Path, ctx, state: dict) -> tuple[int, dict]:
    """Restore everything `write` saved into the live run (every process reads its own streams); returns (epochs
    completed, metrics so far). The files are verified first (`verify`)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    verify(directory, ctx.cfg, ctx.accelerator.num_processes)
    try:
        payload = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
        lora = load_file(str(directory / LORA_FILE))
    except Exception as e:  # noqa: BLE001 - any unpickling/parse failure means the same thing to the user
        raise CheckpointError(f"checkpoint {directory} does not load ({type(e).__name__}: {str(e)[:200]}); delete it "
                              f"to resume from the previous checkpoint") from None
    ctx.model.load_lora_state_dict(lora, source=str(directory / LORA_FILE))
    ctx.optimizer.load_state_dict(payload["optimizer"])
    for k, v in payload["algo_state"].items():
        state[k].load_state_dict(v)
    mine = payload["ranks"][ctx.accelerator.process_index]
    ctx.generator.set_state(mine["generator"])
    ctx.prompt_sampler.load_state_dict(mine["prompt_sampler"])
    ctx.counters.update(mine["counters"])
    ctx.faults.update(mine["faults"])
    if hasattr(ctx.accelerator, "step"):
        ctx.accelerator.step = int(mine["accelerator_step"])
    _set_rng_state(mine["rng"])
    return int(payload["epoch"]), payload["metrics"]
