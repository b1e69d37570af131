"""Structured-config schemas: types only. Each Hydra group validates against one of these dataclasses, so a typo
or a wrong type in an override fails at compose time with Hydra's own message. Every default lives in conf/*.yaml
with its comment, never here: no field has a default (OmegaConf reads that as MISSING), so a YAML that forgets a
key fails to compose.

`register_configs` (called by `align_bench.main`) puts the schemas in Hydra's ConfigStore under `schema/<group>`,
out of the way of the user-facing groups, so `algo=` lists only real algorithms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class LoraSchema:
    rank: int
    alpha: float


@dataclass
class ModelSchema:
    name: str
    path: str
    family: str
    timestep_spacing: str
    steps_offset: int
    resolution: Optional[int]
    dtype: str
    guidance_scale: float
    lora: LoraSchema
    gradient_checkpointing: bool
    download_hint: str
    vae: Optional[str]


@dataclass
class RewardSchema:
    name: str
    kwargs: dict[str, Any]


@dataclass
class StepsSchema:
    train: int
    eval: list[int]


@dataclass
class PromptsSchema:
    train: str
    eval: str
    eval_max_prompts: Optional[int]
    eval_seeds_per_prompt: int


@dataclass
class WandbSchema:
    mode: str
    project: Optional[str]
    entity: Optional[str]


@dataclass
class LoggerSchema:
    progress: bool
    log_every: int
    save_images: bool
    plots: bool
    backends: list[str]
    wandb: Optional[WandbSchema]


@dataclass
class EvalSchema:
    every: int
    rewards: list[str]
    batch_size: int
    eta: float
    seed: int
    base: bool
    cache_base: bool


@dataclass
class CheckpointSchema:
    every: int
    keep: int
    every_minutes: float


@dataclass
class GuardsSchema:
    """Numerical-fault guards (runner: non-finite reward, log-prob, loss or grad norm)."""

    max_consecutive_faulty_epochs: int


@dataclass
class OptimSchema:
    """Optimiser keys shared by every algorithm (conf/algo/*.yaml: `train:` block)."""

    learning_rate: float
    adam_beta1: float
    adam_beta2: float
    adam_weight_decay: float
    adam_epsilon: float
    max_grad_norm: float


@dataclass
class LogProbTrainSchema(OptimSchema):
    """The `train:` block of the log-probability algorithms (DDPO, D3PO, REBEL): minibatches of stored
    trajectories, recomputed log-probs."""

    batch_size: int
    gradient_accumulation_steps: int
    num_inner_epochs: int
    cfg: bool


@dataclass
class SampleSchema:
    batch_size: int
    num_batches_per_epoch: int
    eta: float
    guidance_scale: Optional[float]


@dataclass
class StatTrackingSchema:
    """Per-prompt reward statistics (DDPO, REBEL: `per_prompt_stat_tracking:` block)."""

    enabled: bool
    buffer_size: int
    min_count: int


@dataclass
class AlgoSchema:
    """Keys every algorithm has; each algorithm module subclasses this with its own."""

    name: str
    num_epochs: int


@dataclass
class Config:
    algo: Any
    model: ModelSchema
    reward: RewardSchema
    steps: StepsSchema
    prompts: PromptsSchema
    logger: LoggerSchema
    eval: EvalSchema
    checkpoint: CheckpointSchema
    name: str
    seed: int
    device: str
    mixed_precision: str
    resume: str  # auto | true | false (checks.resume_mode; `resume=true` arrives as the string 'True')
    run_dir: Optional[str]
    experiment: Optional[str]
    guards: GuardsSchema
    dist_timeout_s: float


GROUP_SCHEMAS = {"model": ModelSchema, "reward": RewardSchema, "steps": StepsSchema, "prompts": PromptsSchema,
                 "logger": LoggerSchema}


def register_configs(algorithm_schemas: dict[str, type]) -> None:
    """Store the top-level schema as `config_schema`, each group's as `schema/<group>` and each algorithm's as
    `schema/algo/<name>` (conf/<group>/*.yaml list them first in their defaults)."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, node in GROUP_SCHEMAS.items():
        cs.store(group="schema", name=group, node=node)
    for name, node in algorithm_schemas.items():
        cs.store(group="schema/algo", name=name, node=node)
