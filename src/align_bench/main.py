"""Hydra entry point: `python train.py algo=ddpo reward=jpeg_compressibility` (see conf/config.yaml)."""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from . import REPO_ROOT, checks
from .algorithms import ALGORITHMS
from .config import register_configs

register_configs({name: module.Config for name, module in ALGORITHMS.items()})
# `${or:a,b}` = a unless it is null (oc.select returns a null value as is); used by hydra.run.dir.
if not OmegaConf.has_resolver("or"):
    OmegaConf.register_new_resolver("or", lambda a, b: b if a is None else a)
CONFIG_DIR = str(REPO_ROOT / "conf")


def compose(overrides: list[str]) -> DictConfig:
    """conf/config.yaml with `overrides`, exactly as `python train.py <overrides>` composes it (for scripts,
    benchmarks and tests that need a config without running Hydra's app)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    from .runner import NumericalFaultError, Preempted, run, validate

    # The run dir is deterministic (conf/config.yaml: hydra.run.dir / hydra.sweep.subdir), so every accelerate
    # rank lands in the same one; only rank 0 writes there.
    run_dir = cfg.run_dir or HydraConfig.get().runtime.output_dir
    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        validate(cfg, run_dir)  # every setting that cannot work fails here, in one line, before any weight loads
        metrics = run(cfg, run_dir, checked=True)
    except Preempted as e:
        print(f"align_bench: {e}", file=sys.stderr)
        sys.exit(128 + int(e.signum))
    except (ValueError, KeyError, FileNotFoundError, NotImplementedError, MemoryError, NumericalFaultError,
            ImportError) as e:
        # Configuration, input and numerical errors: one line, no traceback (HYDRA_FULL_ERROR=1 shows it).
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:
        if not _lost_peer(e) or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: lost contact with another process ({_first_line(e)}): it died or hangs; after "
              f"dist_timeout_s={cfg.dist_timeout_s} s this one gives up. Rerun the same command: resume=auto continues "
              f"from the newest checkpoint", file=sys.stderr)
        sys.exit(3)
    final = metrics["eval"]["final"][cfg.reward.name]
    return float(final[str(max(int(n) for n in cfg.steps.eval))]["mean"])  # objective for sweepers


def _lost_peer(e: BaseException) -> bool:
    """A collective that failed because another process died or stopped answering (gloo / NCCL wording)."""
    text = str(e).lower()
    return type(e).__name__ == "DistBackendError" or any(w in text for w in (
        "timed out", "timeout", "connection closed by peer", "connection reset", "broken pipe", "gloo"))


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def cli() -> None:
    """`python train.py ...`: Hydra's app, after a preflight that reports a config that cannot compose (unknown
    option, typo in a key, wrong type) in one line instead of Hydra's multi-line report."""
    error = checks.preflight(sys.argv[1:], compose)
    if error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
