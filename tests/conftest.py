"""Shared fixtures: tiny random-weight pipelines saved to a temp dir (loaded through the real from_pretrained
path), and Hydra composition of the real conf/ tree."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The base-eval cache (align_bench.core.eval_cache) of a test session lives and dies with it; subprocesses inherit it.
os.environ.setdefault("ALIGN_BENCH_CACHE", tempfile.mkdtemp(prefix="align_bench_cache_"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def one_thread():
    """Torch at one intra-op thread for the test: tiny tensors gain nothing from more, on a loaded machine their
    synchronisation dominates (the family matrix took 10× longer with 2 threads than with 1), and the tiny presets'
    documented numbers were measured at 1 thread (CPU numerics depend on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def random_pipeline_dir(tmp_path_factory):
    """A random SD-style pipeline (DDIM, trailing spacing), latents 4×8×8, images 16×16."""
    from align_bench.models.testing import build_random_pipeline

    return build_random_pipeline(tmp_path_factory.mktemp("random_sd") / "pipe")


@pytest.fixture(scope="session")
def random_lcm_dir(tmp_path_factory):
    """A random LCM-style pipeline (guidance embedding, LCMScheduler)."""
    from align_bench.models.testing import build_random_pipeline

    return build_random_pipeline(tmp_path_factory.mktemp("random_lcm") / "pipe", lcm=True)


@pytest.fixture
def load_model():
    """Load a pipeline directory through the real path, with the spec of conf/model/<model>.yaml (model.path and
    any `model.<key>=value` overrides applied): the YAML is the one source of a model's settings."""
    from align_bench.models import DiffusionModel, ModelSpec

    def _load(path, model: str = "tiny", **overrides):
        cfg = compose([f"model={model}", f"model.path={path}", *(f"model.{k}={v}" for k, v in overrides.items())])
        return DiffusionModel.from_pretrained(ModelSpec.from_config(cfg.model))

    return _load


def compose(overrides: list[str]):
    """Compose conf/config.yaml with overrides, exactly as `python train.py <overrides>` would."""
    from align_bench.main import compose as compose_config

    return compose_config(overrides)


# Overrides that make a whole run take seconds on the random pipeline.
FAST_RUN = [
    "reward=jpeg_compressibility", "prompts=simple_animals", "prompts.eval_max_prompts=2",
    "prompts.eval_seeds_per_prompt=1", "steps.train=3", "steps.eval=[1,2]", "logger=quiet",
    "logger.save_images=false", "logger.plots=false",
]


# A reference preset's GPU settings (fp16) are refused on a CPU before anything loads (checks.py); validating one here
# takes these on top.
ON_CPU = ["mixed_precision=no", "model.dtype=fp32"]


def tiny_world_missing(*parts: str) -> bool:
    """True unless every named part of the committed tiny world (``tiny``, ``tiny-lcm``, ``clip``, ``aesthetic``)
    is under assets/tiny-world: the skip condition of the end-to-end tiny runs."""
    from align_bench import resolve_path

    root = resolve_path("assets/tiny-world")
    return not all((root / p).is_dir() and any((root / p).iterdir()) for p in parts)
