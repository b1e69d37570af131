"""Hydra entry point: `python train.py algo=ddpo reward=jpeg_compressibility` (see conf/config.yaml)."""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from . import REPO_ROOT
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

    from .runner import run

    # The run dir is deterministic (conf/config.yaml: hydra.run.dir / hydra.sweep.subdir), so every accelerate
    # rank lands in the same one; only rank 0 writes there.
    run_dir = cfg.run_dir or HydraConfig.get().runtime.output_dir
    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        metrics = run(cfg, run_dir)
    except (ValueError, KeyError, FileNotFoundError, NotImplementedError, ImportError) as e:
        # Configuration and input errors: one line, no traceback (HYDRA_FULL_ERROR=1 shows it).
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    final = metrics["eval"]["final"][cfg.reward.name]
    return float(final[str(max(int(n) for n in cfg.steps.eval))]["mean"])  # objective for sweepers


if __name__ == "__main__":
    main()
