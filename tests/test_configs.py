"""Every config in conf/ composes; schemas reject typos and wrong types; multirun works end to end."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST_RUN, compose
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ["algo", "model", "reward", "steps", "prompts", "logger", "experiment"]


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_config_composes(group, option):
    cfg = compose([f"{group}={option}"])
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # no MISSING left anywhere
    if group == "algo":
        assert cfg.algo.name == option


def test_registries_and_groups_match():
    from align_bench.algorithms import ALGORITHMS
    from align_bench.rewards import REWARDS

    assert set(_options("algo")) == set(ALGORITHMS)
    assert set(_options("reward")) <= set(REWARDS)


@pytest.mark.parametrize("override", ["algo.train.clip_rnge=0.1", "sed=1", "model.lora.rnk=3"])
def test_typos_fail_at_compose_time(override):
    with pytest.raises(ConfigCompositionException):
        compose([override])


def test_wrong_types_fail_at_compose_time():
    with pytest.raises(ConfigCompositionException):
        compose(["algo.train.batch_size=four"])
    with pytest.raises(ConfigCompositionException):
        compose(["steps.eval=[1,two]"])


def test_bad_values_fail_before_any_model_loads(tmp_path):
    from align_bench.runner import validate

    with pytest.raises(ValueError, match="eta must be > 0"):
        validate(compose(["algo.sample.eta=0"]))
    with pytest.raises(KeyError, match="unknown reward"):
        validate(compose(["eval.rewards=[nope]"]))
    with pytest.raises(ValueError, match="multiple of"):
        validate(compose(["algo.sample.batch_size=3", "algo.train.batch_size=2"]))


def test_run_dirs_are_deterministic_per_job():
    cfg = compose(["seed=3", "name=sweep"])
    assert "${now" not in OmegaConf.to_yaml(cfg)


@pytest.mark.slow
def test_multirun_two_seeds_end_to_end(random_pipeline_dir, tmp_path):
    args = [sys.executable, str(CONF.parent / "train.py"), "-m", "seed=0,1", f"model.path={random_pipeline_dir}",
            "algo.num_epochs=1", "algo.sample.batch_size=2", "algo.sample.num_batches_per_epoch=1",
            "algo.train.batch_size=2", "steps.eval=[1]", f"hydra.sweep.dir={tmp_path}", *FAST_RUN]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = sorted(tmp_path.rglob("metrics.json"))
    assert len(metrics) == 2
    import json

    seeds = sorted(json.loads(m.read_text())["run"]["seed"] for m in metrics)
    assert seeds == [0, 1]
