"""Structured-config schemas. Each Hydra group validates against one of these dataclasses, so a typo or a wrong
type in an override fails at compose time with Hydra's own message. Defaults live in conf/*.yaml, not here:
fields are declared MISSING (or given the neutral value a yaml may omit)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class LoraSchema:
    rank: int = MISSING
    alpha: float = MISSING


@dataclass
class ModelSchema:
    name: str = MISSING
    path: str = MISSING
    family: str = MISSING
    timestep_spacing: str = MISSING
    steps_offset: int = 0
    resolution: Optional[int] = None
    dtype: str = "fp32"
    guidance_scale: float = MISSING
    lora: LoraSchema = field(default_factory=LoraSchema)
    gradient_checkpointing: bool = False
    download_hint: str = ""


@dataclass
class RewardSchema:
    name: str = MISSING
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepsSchema:
    train: int = MISSING
    eval: list[int] = MISSING


@dataclass
class PromptsSchema:
    train: str = MISSING
    eval: str = MISSING
    eval_max_prompts: Optional[int] = None
    eval_seeds_per_prompt: int = 1


@dataclass
class LoggerSchema:
    progress: bool = True
    log_every: int = 1
    save_images: bool = True
    plots: bool = True


@dataclass
class EvalSchema:
    every: int = 0
    rewards: list[str] = field(default_factory=list)
    batch_size: int = 32
    eta: float = 0.0
    seed: int = 1234
    base: bool = True


@dataclass
class CheckpointSchema:
    every: int = 0
    keep: int = 2


@dataclass
class OptimSchema:
    """Optimiser keys shared by every algorithm (conf/algo/*.yaml: `train:` block)."""

    learning_rate: float = MISSING
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0


@dataclass
class SampleSchema:
    batch_size: int = MISSING
    num_batches_per_epoch: int = MISSING
    eta: float = 1.0
    guidance_scale: Optional[float] = None  # None: the model's default


@dataclass
class StatTrackingSchema:
    """Per-prompt reward statistics (DDPO, REBEL: `per_prompt_stat_tracking:` block)."""

    enabled: bool = MISSING
    buffer_size: int = MISSING
    min_count: int = MISSING


@dataclass
class AlgoSchema:
    """Keys every algorithm has; each algorithm module subclasses this with its own."""

    name: str = MISSING
    num_epochs: int = MISSING


@dataclass
class Config:
    algo: Any = MISSING
    model: ModelSchema = MISSING
    reward: RewardSchema = MISSING
    steps: StepsSchema = MISSING
    prompts: PromptsSchema = MISSING
    logger: LoggerSchema = MISSING
    eval: EvalSchema = field(default_factory=EvalSchema)
    checkpoint: CheckpointSchema = field(default_factory=CheckpointSchema)
    name: str = "default"
    seed: int = 0
    device: str = "auto"
    mixed_precision: str = "no"
    resume: bool = False
    run_dir: Optional[str] = None
    experiment: Optional[str] = None


def register_configs() -> None:
    """Put every schema in Hydra's ConfigStore (one `<name>_schema` per algorithm, mirroring the registry)."""
    from .algorithms import ALGORITHMS

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="model", name="model_schema", node=ModelSchema)
    cs.store(group="reward", name="reward_schema", node=RewardSchema)
    cs.store(group="steps", name="steps_schema", node=StepsSchema)
    cs.store(group="prompts", name="prompts_schema", node=PromptsSchema)
    cs.store(group="logger", name="logger_schema", node=LoggerSchema)
    for name, module in ALGORITHMS.items():
        cs.store(group="algo", name=f"{name}_schema", node=module.Config)
