"""Every registered algorithm runs on every model family: one short training run (one epoch, one update at least)
per (algorithm, family) on tiny random replicas of SD 1.5, SD-Turbo, LCM and SDXL (models/testing.py), through
`runner.run` with the family's own conf/model/<name>.yaml. The matrix iterates over the algorithm registry, so an
algorithm added to `algorithms.ALGORITHMS` is covered without editing this file.

Each algorithm starts from its `experiment=tiny_<algo>` preset (a configuration known to be valid), shrunk to two
samples, two steps and one epoch; if an algorithm refuses the shrunk sizes (its validate), the preset's own sizes
are used for that one epoch."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAST_RUN, compose
from omegaconf import OmegaConf

from align_bench.algorithms import ALGORITHMS
from align_bench.runner import run, validate

FAMILIES = {"sd15": "sd", "sd_turbo": "sd_turbo", "lcm": "lcm", "sdxl": "sdxl"}  # conf/model → replica kind
# key in cfg.algo → the value a one-update run needs (applied only where the key exists)
SHRINK = {"sample.batch_size": 2, "sample.num_batches_per_epoch": 1, "train.batch_size": 1,
          "train.gradient_accumulation_steps": 1, "train.num_inner_epochs": 1,
          "sample.divert_start_step": 0,  # SPO: branch from the first of the two steps,
          "sample.threshold": 0.0}        # and keep every pair (brightness differences of a random model are tiny)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    from align_bench.models.testing import build_random_pipeline

    root = tmp_path_factory.mktemp("matrix")
    return {kind: build_random_pipeline(root / kind, kind=kind) for kind in set(FAMILIES.values())}


def _config(algo: str, model: str, path, run_dir):
    from align_bench import REPO_ROOT

    preset = [f"experiment=tiny_{algo}"] if (REPO_ROOT / "conf/experiment" / f"tiny_{algo}.yaml").exists() else []
    overrides = [*preset, f"algo={algo}", f"model={model}", f"model.path={path}", "model.dtype=fp32",
                 "model.resolution=null", "model.vae=null", "model.gradient_checkpointing=false", *FAST_RUN,
                 "reward=brightness", "steps.train=2", "steps.eval=[1]", "prompts.eval_max_prompts=1",
                 "eval.base=false", "algo.num_epochs=1", "device=cpu", f"run_dir={run_dir}"]
    cfg = compose(overrides)
    shrunk = cfg.copy()
    for key, value in SHRINK.items():
        if OmegaConf.select(shrunk.algo, key) is not None:
            OmegaConf.update(shrunk.algo, key, value)
    try:
        validate(shrunk)
        return shrunk
    except (ValueError, KeyError):
        return cfg


@pytest.mark.parametrize("model", list(FAMILIES))
@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_every_algorithm_updates_on_every_family(algo, model, replicas, tmp_path):
    from safetensors.torch import load_file

    cfg = _config(algo, model, replicas[FAMILIES[model]], tmp_path)
    if algo == "spo" and model == "lcm":  # SPO is defined on the stochastic DDIM step (docs/algos/spo.md)
        with pytest.raises(ValueError, match="model.family=lcm is not supported"):
            validate(cfg)
        return
    metrics = run(cfg, tmp_path)
    assert metrics["run"]["optimizer_steps"] >= 1
    lora = load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    up = [v for k, v in lora.items() if "lora_B" in k or "lora.up" in k]
    # the up-projections start at zero: any non-zero one means an update reached the LoRA
    assert up and any(v.abs().sum() > 0 for v in up) and all(torch.isfinite(v).all() for v in lora.values())
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["run"]["model"] == model and written["run"]["reward_convention"] == "brightness"
    assert all(torch.isfinite(torch.tensor(v["mean"])) for v in written["eval"]["final"]["brightness"].values())
