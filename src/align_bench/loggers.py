"""One logging interface over the run's backends (`logger.backends`): `csv` (train.csv in the run dir; always there
beside metrics.json), `tensorboard` (event files under <run_dir>/tensorboard) and `wandb` (offline by default,
online when `logger.wandb.mode=online`). The runner calls `train`, `eval`, `image` and `close`; nothing else in
the codebase knows a backend. Only the main process builds one (others get `NullLogger`)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

BACKENDS = ("csv", "tensorboard", "wandb")


def _scalars(summary: dict) -> dict[str, float]:
    """The numeric entries of an epoch summary (booleans and strings are not curves)."""
    return {k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _eval_scalars(table: dict) -> dict[str, float]:
    """{reward: {steps: {mean, std, n}}} → {"eval/<reward>/<steps>steps": mean}."""
    return {f"eval/{rw}/{s}steps": float(v["mean"]) for rw, by in table.items() for s, v in by.items()}


class CsvBackend:
    """train.csv: one row per epoch, columns = the union of keys seen so far (algorithms add their own). Rewritten
    through a temp file so that a kill never leaves a half-written file."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "train.csv"
        self.rows: list[dict] = []

    def resume(self, train: list[dict]) -> None:
        self.rows = [_scalars(r) for r in train]  # the epochs before the checkpoint, from metrics.json

    def train(self, step: int, summary: dict) -> None:
        self.rows.append(_scalars(summary))
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.path)

    def eval(self, step: int, tag: str, table: dict) -> None:
        pass  # eval tables live in metrics.json

    def image(self, step: int, tag: str, path: Path) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardBackend:
    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError("logger=tensorboard needs the tensorboard package: pip install -e .[loggers]") from e
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def train(self, step: int, summary: dict) -> None:
        for k, v in _scalars(summary).items():
            self.writer.add_scalar(f"train/{k}", v, step)

    def eval(self, step: int, tag: str, table: dict) -> None:
        for k, v in _eval_scalars(table).items():
            self.writer.add_scalar(f"{k}/{tag}", v, step)

    def image(self, step: int, tag: str, path: Path) -> None:
        import numpy as np
        from PIL import Image

        self.writer.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandbBackend:
    def __init__(self, run_dir: Path, config: dict, settings: dict, name: str):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("logger=wandb needs the wandb package: pip install -e .[loggers]") from e
        mode = settings.get("mode", "offline")
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.wandb.mode must be offline, online or disabled, got {mode!r}")
        self.wandb = wandb
        self.run = wandb.init(project=settings.get("project"), entity=settings.get("entity"), name=name,
                              mode=mode, dir=str(run_dir), config=config, reinit="finish_previous")

    def train(self, step: int, summary: dict) -> None:
        self.run.log({f"train/{k}": v for k, v in _scalars(summary).items()}, step=step)

    def eval(self, step: int, tag: str, table: dict) -> None:
        rows = [[rw, int(s), v["mean"], v["std"], v["n"]] for rw, by in table.items() for s, v in by.items()]
        self.run.log({f"eval_{tag}": self.wandb.Table(columns=["reward", "steps", "mean", "std", "n"], data=rows),
                      **{f"{k}/{tag}": v for k, v in _eval_scalars(table).items()}}, step=step)

    def image(self, step: int, tag: str, path: Path) -> None:
        self.run.log({tag: self.wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()


class RunLogger:
    """Fans each call out to the configured backends. `step` is the epoch (the x axis of every backend)."""

    def __init__(self, backends: list):
        self.backends = backends

    def resume(self, train: list[dict]) -> None:
        """A resumed run: backends that rewrite whole files (csv) take the epochs already done; streaming ones
        (tensorboard, wandb) append to what they wrote before."""
        for b in self.backends:
            if hasattr(b, "resume"):
                b.resume(train)

    def train(self, step: int, summary: dict) -> None:
        for b in self.backends:
            b.train(step, summary)

    def eval(self, step: int, tag: str, table: dict) -> None:
        for b in self.backends:
            b.eval(step, tag, table)

    def image(self, step: int, tag: str, path: Path) -> None:
        if Path(path).is_file():
            for b in self.backends:
                b.image(step, tag, path)

    def close(self) -> None:
        for b in self.backends:
            b.close()


NullLogger = RunLogger  # RunLogger([]) on non-main processes: every call is a no-op


def check_backends(names) -> None:
    """One-line error for an unknown backend (called before any model loads)."""
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ValueError(f"logger.backends: unknown {unknown}; valid: {list(BACKENDS)}")


def build_logger(logger_cfg, run_dir: Path, config: dict, name: str, main: bool) -> RunLogger:
    """The run's logger from `cfg.logger` (backends, wandb settings); a no-op one off the main process."""
    names = list(logger_cfg.backends)
    check_backends(names)
    if not main:
        return RunLogger([])
    out = []
    for n in names:
        if n == "csv":
            out.append(CsvBackend(run_dir))
        elif n == "tensorboard":
            out.append(TensorBoardBackend(run_dir))
        else:
            out.append(WandbBackend(run_dir, config, dict(logger_cfg.wandb or {}), name))
    return RunLogger(out)
