"""One training run, top to bottom: validate → load → evaluate base → epochs of the chosen algorithm → evaluate
final → metrics.json. The algorithm module supplies `train_epoch`; everything else is shared here.

No trainer class: `RunContext` is a bag of the run's objects plus the helpers every algorithm uses: `rollout`
(sample with the current policy), `score` (the training reward; the only place that counts reward queries),
`backward` and `gather`."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import platform
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from . import REPO_ROOT, __version__
from .algorithms import get_algorithm
from . import checks
from .core import checkpoint as ckpt
from .core.evaluation import eval_items, evaluate, format_table, merge_scores, summarize
from .core.rollout import Trajectory, rollout
from .loggers import build_logger, check_backends
from .models.diffusion import DiffusionModel, ModelSpec
from .prompts import PromptSampler, load_prompts
from .rewards import build_reward, differentiable_rewards, reward_info

log = logging.getLogger("align_bench")


@dataclass
class RunContext:
    cfg: DictConfig
    accelerator: object
    model: DiffusionModel
    unet: torch.nn.Module  # the accelerate-prepared UNet: forward through it in every differentiable call
    optimizer: torch.optim.Optimizer
    reward_fn: object
    prompt_sampler: PromptSampler
    generator: torch.Generator  # CPU generator for sampling noise (checkpointed)
    run_dir: Path
    counters: dict = field(default_factory=lambda: {"reward_queries": 0, "images": 0, "optimizer_steps": 0})
    # Numerical faults (non-finite reward, log-prob, loss, grad norm) and the updates skipped because of them
    # (checkpointed; metrics.json "run.faults").
    faults: dict = field(default_factory=lambda: {"reward": 0, "log_prob": 0, "loss": 0, "grad_norm": 0,
                                                  "skipped_optimizer_steps": 0, "skipped_epochs": 0})
    epoch: int = 0
    stop_signal: int | None = None  # set by the SIGTERM/SIGINT handler: stop after the current optimizer step
    _epoch_faulty: bool = False  # a sampled quantity of this epoch is non-finite: every update of it is skipped
    _window_faulty: bool = False  # a backward of the current accumulation window was skipped

    @property
    def guidance_scale(self) -> float:
        g = self.cfg.algo.sample.get("guidance_scale")
        return float(self.cfg.model.guidance_scale if g is None else g)

    @property
    def progress(self) -> bool:
        return bool(self.cfg.logger.progress) and self.accelerator.is_main_process

    def rollout(self, prompts: list[str], **rollout_kwargs) -> Trajectory:
        """Sample `prompts` with the current policy through the prepared UNet: the training step count, η, guidance
        and noise stream unless `rollout_kwargs` (any of `core.rollout.rollout`'s) say otherwise. Counts the
        trajectories in `images`. Runs the UNet in train mode only when sampling with grad (AlignProp)."""
        kwargs = dict(num_steps=int(self.cfg.steps.train), eta=float(self.cfg.algo.sample.eta),
                      guidance_scale=self.guidance_scale, generator=self.generator, unet=self.unet)
        kwargs.update(rollout_kwargs)
        self.unet.train(kwargs.get("grad_from_step") is not None)
        traj = rollout(self.model, prompts, **kwargs)
        self.counters["images"] += len(prompts)
        stochastic = traj.num_steps > 1 if self.model.is_lcm else float(kwargs["eta"]) > 0
        if stochastic:  # a deterministic sampler's log-probs are NaN by design (σ = 0)
            bad = ~torch.isfinite(traj.log_probs)
            if bool(bad.any()):
                steps = sorted(set(torch.nonzero(bad)[:, 1].tolist()))
                self._fault("log_prob", f"{int(bad.any(1).sum())} of {len(prompts)} sampled trajectories at "
                                        f"step(s) {steps}", sampled=True)
        return traj

    def score(self, images: torch.Tensor, prompts: list[str], timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """The training reward of B images (B,) float32: final samples, or x̂0 predictions at `timesteps` (B,) for
        a step-aware reward (plain rewards ignore them). The only place that counts reward queries. Gradients
        reach `images` when the reward is differentiable and grad is on (AlignProp)."""
        rewards = self.reward_fn(images, prompts, timesteps)
        self.counters["reward_queries"] += len(images)
        bad = ~torch.isfinite(rewards.detach())
        if bool(bad.any()):
            self._fault("reward", f"{int(bad.sum())} of {len(rewards)} images, prompts "
                                  f"{sorted({prompts[i] for i in torch.nonzero(bad).flatten().tolist()})[:3]}",
                        sampled=True)
        return rewards

    def backward(self, loss: torch.Tensor) -> float | None:
        """Inside `accelerator.accumulate(unet)`: backward, and at sync steps clip, step, zero. Returns the grad
        norm at a sync step that updated the weights, else None.

        Guards: a non-finite loss is not backpropagated, and an optimizer step whose window saw one, whose grad norm
        is non-finite, or whose epoch sampled a non-finite reward / log-prob, is skipped (gradients dropped, weights
        and Adam state untouched). Processes agree on every skip (one small all-reduce per optimizer step), and a
        skipped backward still runs a zero one so that DDP's reducer stays in step with the other processes.
        After SIGTERM/SIGINT, raises StopRequested once the optimizer step is done."""
        acc = self.accelerator
        if not self._epoch_faulty and not bool(torch.isfinite(loss.detach()).all()):  # (else: a consequence)
            self._fault("loss", f"optimizer step {self.counters['optimizer_steps'] + 1}")
            self._window_faulty = True
        if self._window_faulty or self._epoch_faulty:
            acc.backward(sum((p * 0.0).sum() for p in self.model.lora_parameters()))  # zero grads, DDP in step
        else:
            acc.backward(loss)
        if not acc.sync_gradients:
            return None
        grad_norm = float(acc.clip_grad_norm_(self.model.lora_parameters(), self.cfg.algo.train.max_grad_norm))
        if not math.isfinite(grad_norm) and not (self._window_faulty or self._epoch_faulty):
            self._fault("grad_norm", f"optimizer step {self.counters['optimizer_steps'] + 1} (norm {grad_norm})")
            self._window_faulty = True
        skip, stop = self._agree(self._window_faulty or self._epoch_faulty, self.stop_signal is not None)
        if skip:
            self.faults["skipped_optimizer_steps"] += 1
            grad_norm = None
        else:
            self.optimizer.step()
            self.counters["optimizer_steps"] += 1
        self.optimizer.zero_grad(set_to_none=True)
        self._window_faulty = False
        if stop:
            raise StopRequested()
        return grad_norm

    def _fault(self, quantity: str, where: str, sampled: bool = False) -> None:
        """Count a non-finite `quantity` and say where; `sampled` ones (rewards, sampled log-probs) poison the
        whole epoch's advantages, so every update of the epoch is skipped."""
        self.faults[quantity] += 1
        self.faults["last"] = f"non-finite {quantity} in epoch {self.epoch}: {where}"
        if sampled:
            self._epoch_faulty = True
        log.warning("%s — skipping %s", self.faults["last"], "this epoch's updates" if sampled else "this update")

    def _agree(self, *flags: bool) -> list[bool]:
        """Each flag true on any process → true on all (one all-reduce; nothing to do with one process)."""
        if self.accelerator.num_processes == 1:
            return list(flags)
        import torch.distributed as dist

        t = torch.tensor([float(f) for f in flags], device=self.accelerator.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def gather(self, prompts: list[str], values: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """All processes' prompts and values, concatenated in process order (for advantages and logging)."""
        from accelerate.utils import gather_object

        if self.accelerator.num_processes == 1:
            return list(prompts), values
        return gather_object(list(prompts)), self.accelerator.gather(values.to(self.accelerator.device)).cpu()


class StopRequested(Exception):
    """Raised by `RunContext.backward` after the optimizer step during which SIGTERM/SIGINT arrived."""


class Preempted(Exception):
    """The run stopped on SIGTERM/SIGINT after checkpointing; `main` prints it in one line (exit 128 + signal)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class NumericalFaultError(RuntimeError):
    """Too many epochs in a row with non-finite values: the run stops; the last good checkpoint is kept."""


# ------------------------------------------------------------------------------------------------ validation
def validate(cfg: DictConfig, run_dir: str | Path | None = None) -> None:
    """Fail fast, in one line, on settings that cannot work — before any weight is loaded (`checks.check_config`:
    keys, ranges, step counts, files, devices, the checkpoint to resume from)."""
    checks.check_config(cfg, run_dir)
    algo = get_algorithm(cfg.algo.name)
    reward_cls = reward_info(cfg.reward.name)
    if getattr(algo, "REQUIRES_DIFFERENTIABLE_REWARD", False) and not reward_cls.differentiable:
        raise ValueError(f"algo={cfg.algo.name} backpropagates through the reward, but reward={cfg.reward.name} is "
                         f"not differentiable; differentiable rewards: {differentiable_rewards()}")
    check_backends(cfg.logger.backends)
    algo.validate(cfg)


# ------------------------------------------------------------------------------------------------ the run
def run(cfg: DictConfig, run_dir: str | Path, *, checked: bool = False) -> dict:
    """One run in `run_dir`. `checked`: `validate(cfg, run_dir)` already ran (main.py does it right after
    composing)."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    t_start = time.time()
    run_dir = Path(run_dir)
    if not checked:
        validate(cfg, run_dir)
    _quiet_libraries()
    algo = get_algorithm(cfg.algo.name)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=algo.gradient_accumulation_steps(cfg),
        # Without CUDA, cpu=True lets torchrun/accelerate-launched processes form a gloo (MULTI_CPU) group.
        cpu=cfg.device == "cpu" or not torch.cuda.is_available(),
        # A process that dies leaves the others waiting in a collective: they give up after this long.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=float(cfg.dist_timeout_s)))],
    )
    main = accelerator.is_main_process
    resume = checks.resume_mode(cfg)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.clean_partial(run_dir)
        if resume == "false" and ckpt.latest(run_dir) is not None:
            log.warning("resume=false: removing %d old checkpoint(s) in %s", ckpt.remove_all(run_dir), run_dir)
        _atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    accelerator.wait_for_everyone()
    # Before seeding and loading: a backend's own randomness (wandb's run id) cannot shift the run's RNG streams,
    # and a missing logger package fails before the weights load.
    logger = build_logger(cfg.logger, run_dir, OmegaConf.to_container(cfg, resolve=True),
                          f"{cfg.algo.name}-{cfg.model.name}-{cfg.reward.name}-seed{cfg.seed}", main)
    # Device-specific seeds: each process draws different samples, all reproducible from cfg.seed.
    seed = int(cfg.seed) + 1000 * accelerator.process_index
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)

    model = DiffusionModel.from_pretrained(ModelSpec.from_config(cfg.model), device=accelerator.device)
    if cfg.model.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    model.add_lora(int(cfg.model.lora.rank), float(cfg.model.lora.alpha))
    tc = cfg.algo.train
    optimizer = torch.optim.AdamW(model.lora_parameters(), lr=tc.learning_rate, betas=(tc.adam_beta1, tc.adam_beta2),
                                  weight_decay=tc.adam_weight_decay, eps=tc.adam_epsilon)
    unet, optimizer = accelerator.prepare(model.unet, optimizer)

    reward_fn = build_reward(cfg.reward.name, accelerator.device, **cfg.reward.kwargs)
    eval_rewards = {cfg.reward.name: reward_fn}
    for name in cfg.eval.rewards:
        if name not in eval_rewards:
            eval_rewards[name] = build_reward(name, accelerator.device)
    train_prompts = load_prompts(cfg.prompts.train)
    eval_prompts = load_prompts(cfg.prompts.eval)[: cfg.prompts.eval_max_prompts]
    eval_set = eval_items(eval_prompts, int(cfg.prompts.eval_seeds_per_prompt), int(cfg.eval.seed))
    ctx = RunContext(cfg, accelerator, model, unet, optimizer, reward_fn, PromptSampler(train_prompts, seed),
                     torch.Generator().manual_seed(seed), run_dir)
    state = algo.init_state(ctx)

    if main:
        _log_sizes(cfg, algo, accelerator, len(train_prompts), len(eval_prompts))
    metrics = {"eval": {}, "train": [], "eval_history": [], "run": {}}

    def run_eval(tag: str, step: int, lora: bool = True) -> dict:
        ctxm = model.lora_disabled(unet) if not lora else _null()
        with ctxm:
            shard = eval_set[accelerator.process_index::accelerator.num_processes]
            raw, images = evaluate(model, eval_rewards, shard, list(cfg.steps.eval),
                                   guidance_scale=float(cfg.model.guidance_scale),
                                   batch_size=int(cfg.eval.batch_size), eta=float(cfg.eval.eta), unet=unet,
                                   progress=ctx.progress, keep_images=16 if cfg.logger.save_images else 0)
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            raw = merge_scores(gather_object([raw]))
        if main and images and cfg.logger.save_images:
            from .plots import save_image_grid

            save_image_grid(images, run_dir / f"samples_{tag}.png", title=f"{tag}: {cfg.algo.name} / {cfg.model.name}")
            logger.image(step, f"samples_{tag}", run_dir / f"samples_{tag}.png")
        table = summarize(raw)
        logger.eval(step, tag, table)
        return table

    num_epochs = int(cfg.algo.num_epochs)
    keep = int(cfg.checkpoint.keep)
    start_epoch, resumed_from = 0, None
    if resume != "false" and ckpt.latest(run_dir) is not None:
        resumed_from = ckpt.latest(run_dir)
        start_epoch, metrics = ckpt.load(resumed_from, ctx, state)
        metrics["run"]["resumes"] = int(metrics["run"].get("resumes", 0)) + 1
        logger.resume(metrics["train"])
        log.info("resumed from %s: %d of %d epochs done", resumed_from, start_epoch, num_epochs)
    elif cfg.eval.base:
        metrics["eval"]["base"] = _base_eval(cfg, eval_set, accelerator, run_dir,
                                             lambda: run_eval("base", 0, lora=False))
        log.info("base eval (LoRA off):\n%s", format_table({"base": metrics["eval"]["base"]}))

    previous_handlers = _install_stop_handlers(ctx)
    try:
        _train(ctx, algo, state, metrics, run_eval, start_epoch, num_epochs, keep, t_start, logger)
        # A signal from here on changes nothing: training is done and checkpointed; the run finishes its eval.
        metrics["eval"]["final"] = run_eval("final", num_epochs)
    finally:
        _restore_handlers(previous_handlers)
    ctx.counters["lora_in_sync"] = _lora_in_sync(ctx)
    if main:
        _save_final_lora(model, run_dir / "lora")
        _write_metrics(run_dir, metrics, cfg, t_start, ctx)
        if cfg.logger.plots:
            from .plots import plot_run

            plot_run(metrics, run_dir)
        log.info("eval (%s, %s, %s):\n%s", cfg.algo.name, cfg.model.name, cfg.reward.name,
                 format_table({k: metrics["eval"][k] for k in ("base", "final") if k in metrics["eval"]}))
        if any(ctx.faults[k] for k in ("reward", "log_prob", "loss", "grad_norm")):
            log.warning("numerical faults: %s", {k: v for k, v in ctx.faults.items() if k != "last"})
        log.info("run dir: %s (%.0f s)", run_dir, time.time() - t_start)
    logger.close()
    accelerator.end_training()
    return metrics


def _train(ctx: RunContext, algo, state: dict, metrics: dict, run_eval, start_epoch: int, num_epochs: int, keep: int,
           t_start: float, logger) -> None:
    """The epoch loop with its guards: a snapshot of the resumable state at the start of every epoch (written as
    the checkpoint on SIGTERM/SIGINT, and the algorithm state to restore after an epoch that sampled non-finite
    values), checkpoints by epochs and by wall time, and the numerical-fault stop."""
    cfg, acc, run_dir = ctx.cfg, ctx.accelerator, ctx.run_dir
    main = acc.is_main_process
    every, every_s = int(cfg.checkpoint.every), float(cfg.checkpoint.every_minutes) * 60
    max_faulty = int(cfg.guards.max_consecutive_faulty_epochs)
    last_ckpt_time, consecutive_faulty = time.time(), 0
    bar = tqdm(range(start_epoch, num_epochs), desc=f"{cfg.algo.name} epochs", initial=start_epoch,
               total=num_epochs, disable=not ctx.progress)
    for epoch in bar:
        ctx.epoch = epoch
        snapshot = ckpt.capture(ctx, state, epoch, metrics)
        if ctx._agree(ctx.stop_signal is not None)[0]:  # the signal came between epochs (e.g. in the base eval)
            _stop(ctx, snapshot, keep)
        t0 = time.time()
        faults_before = dict(ctx.faults)
        try:
            summary = algo.train_epoch(ctx, state, epoch)
        except StopRequested:
            _stop(ctx, snapshot, keep)
        sampled_faulty, faulty = ctx._agree(ctx._epoch_faulty, ctx._epoch_faulty or ctx.faults[
            "skipped_optimizer_steps"] > faults_before["skipped_optimizer_steps"])
        if sampled_faulty:  # the epoch's statistics (fed gathered values) saw the non-finite values: forget them
            for k, v in snapshot["shared"]["algo_state"].items():
                state[k].load_state_dict(copy.deepcopy(v))
        ctx._epoch_faulty = False
        epoch_faults = {k: ctx.faults[k] - faults_before[k] for k in ctx.faults if k != "last"
                        and ctx.faults[k] != faults_before[k]}
        summary = {"epoch": epoch, **summary, **ctx.counters, "epoch_time_s": time.time() - t0,
                   "wall_time_s": time.time() - t_start, **({"faults": epoch_faults} if epoch_faults else {})}
        metrics["train"].append(summary)
        logger.train(epoch, summary)
        if faulty:
            ctx.faults["skipped_epochs"] += 1
            consecutive_faulty += 1
            if consecutive_faulty >= max_faulty:
                if main:
                    _write_metrics(run_dir, metrics, cfg, t_start, ctx)
                last = ckpt.latest(run_dir)
                raise NumericalFaultError(
                    f"{consecutive_faulty} epochs in a row with non-finite values (guards."
                    f"max_consecutive_faulty_epochs={max_faulty}); last: {ctx.faults.get('last')}; counts "
                    f"{ {k: v for k, v in ctx.faults.items() if k != 'last'} }; last good checkpoint: "
                    f"{last if last is not None else 'none'}")
        else:
            consecutive_faulty = 0
        if main and (epoch % max(1, int(cfg.logger.log_every)) == 0 or epoch == num_epochs - 1):
            log.info("epoch %d | %s", epoch, _fmt(summary))
        bar.set_postfix(reward=f"{summary.get('reward_mean', float('nan')):.4f}")
        if cfg.eval.every and (epoch + 1) % int(cfg.eval.every) == 0 and epoch + 1 < num_epochs:
            metrics["eval_history"].append({"epoch": epoch + 1, **ctx.counters,
                                            "eval": run_eval(f"epoch{epoch + 1}", epoch + 1)})
        # Checkpoint every `every` epochs, when `every_minutes` have passed (rank 0's clock decides), after the last
        # epoch (a kill during the final eval resumes straight into it), and before stopping on a signal. Never
        # after a faulty epoch: the newest checkpoint stays the last good one.
        due = (every > 0 and (epoch + 1) % every == 0) or epoch + 1 == num_epochs or (
            every_s > 0 and main and time.time() - last_ckpt_time >= every_s)
        due, stop = ctx._agree(due, ctx.stop_signal is not None)
        if (due or stop) and not faulty:
            written = ckpt.write(run_dir, ckpt.capture(ctx, state, epoch + 1, metrics), ctx, keep)
            last_ckpt_time = time.time()
            if written is not None:
                log.debug("checkpoint %s", written)
        if main:
            _write_metrics(run_dir, metrics, cfg, t_start, ctx)
        if stop and epoch + 1 < num_epochs:
            _stop(ctx, None, keep)
    bar.close()


def _stop(ctx: RunContext, snapshot: dict | None, keep: int) -> None:
    """Checkpoint `snapshot` (None: the newest checkpoint is already current) and raise Preempted."""
    if snapshot is not None:
        ckpt.write(ctx.run_dir, snapshot, ctx, keep)
    signum = ctx.stop_signal or signal.SIGTERM
    latest = ckpt.latest(ctx.run_dir)
    epoch = latest.name.removeprefix("epoch_") if latest is not None else "0"
    raise Preempted(f"stopped by {signal.Signals(signum).name}: checkpoint {latest} ({epoch} of "
                    f"{int(ctx.cfg.algo.num_epochs)} epochs done); run the same command again (resume=auto) to "
                    f"continue", signum)


def _install_stop_handlers(ctx: RunContext) -> dict:
    """SIGTERM (Slurm preemption, `scancel`, torchrun) and SIGINT (Ctrl-C): finish the current optimizer step,
    checkpoint, exit. A second signal aborts at once (the newest checkpoint stays)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):
        if ctx.stop_signal is not None:
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborting without a checkpoint")
        ctx.stop_signal = signum
        log.warning("received %s: finishing the current optimizer step, then checkpointing and exiting (send it "
                    "again to abort at once)", signal.Signals(signum).name)

    previous = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous[signum] = signal.signal(signum, handler)
    return previous


def _restore_handlers(previous: dict) -> None:
    for signum, h in previous.items():
        signal.signal(signum, h)


# ------------------------------------------------------------------------------------------------ helpers
def _base_eval(cfg: DictConfig, eval_set: list, accelerator, run_dir: Path, compute) -> dict:
    """The base model's eval table: from the cache when `eval.cache_base` and an entry matches, else computed (and
    stored by the main process). Evaluation draws from its own generators only, so skipping it leaves every RNG
    stream of the run where it would have been."""
    from .core import eval_cache

    # Single process only: with several, one rank finding an entry another lacks would skip the eval's collective
    # gather and hang the others.
    if not cfg.eval.cache_base or accelerator.num_processes > 1:
        return compute()
    settings = {"steps": list(cfg.steps.eval), "rewards": [cfg.reward.name, *cfg.eval.rewards],
                "reward_kwargs": OmegaConf.to_container(cfg.reward.kwargs, resolve=True), "eta": float(cfg.eval.eta),
                "guidance": float(cfg.model.guidance_scale), "batch_size": int(cfg.eval.batch_size),
                "processes": accelerator.num_processes, "device": str(accelerator.device),
                "mixed_precision": cfg.mixed_precision}
    key = eval_cache.base_eval_key(OmegaConf.to_container(cfg.model, resolve=True), eval_set, settings)
    grid = run_dir / "samples_base.png"
    cached = eval_cache.load(key, grid if accelerator.is_main_process and cfg.logger.save_images else None)
    if cached is not None:
        log.info("base eval: cached (%s)", eval_cache.cache_dir() / key)
        return cached
    table = compute()
    if accelerator.is_main_process:
        eval_cache.store(key, table, grid if grid.is_file() else None)
    return table


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _lora_in_sync(ctx: RunContext) -> bool:
    """True iff every process ends with identical LoRA weights — i.e. gradients were all-reduced (the references'
    forward through the unwrapped UNet silently breaks this under DDP; docs/architecture.md)."""
    acc = ctx.accelerator
    if acc.num_processes == 1:
        return True
    flat = torch.cat([p.detach().float().flatten() for p in ctx.model.lora_parameters()])
    everyone = acc.gather(flat.unsqueeze(0).to(acc.device))  # (processes, P)
    in_sync = bool(torch.allclose(everyone, everyone[:1].expand_as(everyone), rtol=0, atol=1e-6))
    if not in_sync:
        log.error("LoRA weights differ between processes: gradients were not synchronised")
    return in_sync


def _quiet_libraries() -> None:
    """Library progress bars (weight loading) would drown ours; their warnings stay."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _fmt(summary: dict) -> str:
    keys = ["reward_mean", "reward_std", "loss", "approx_kl", "clipfrac", "ratio_mean", "grad_norm",
            "reward_queries", "epoch_time_s", "kl", "zero_spread_groups"]
    return " ".join(f"{k}={summary[k]:.4g}" for k in keys if k in summary and summary[k] is not None)


def _log_sizes(cfg, algo, accelerator, n_train, n_eval) -> None:
    s = cfg.algo.sample
    per_epoch = int(s.batch_size) * int(s.num_batches_per_epoch) * accelerator.num_processes
    per_epoch *= int(s.get("group_size", 1))  # GRPO: batch_size counts groups of group_size samples
    log.info("algo=%s model=%s reward=%s | %d processes, device %s | samples/epoch %d, train steps %d, "
             "backward calls per optimizer step %d | %d train prompts, %d eval prompts × %d seeds at steps %s",
             cfg.algo.name, cfg.model.name, cfg.reward.name, accelerator.num_processes, accelerator.device, per_epoch,
             cfg.steps.train, algo.gradient_accumulation_steps(cfg), n_train, n_eval, cfg.prompts.eval_seeds_per_prompt,
             list(cfg.steps.eval))


def _write_metrics(run_dir: Path, metrics: dict, cfg, t_start: float, ctx: RunContext) -> None:
    metrics["run"] = {
        "algo": cfg.algo.name, "model": cfg.model.name, "reward": cfg.reward.name, "seed": int(cfg.seed),
        "experiment": cfg.get("experiment"), "name": cfg.name,
        "wall_time_s": time.time() - t_start, **ctx.counters,
        "train_steps": int(cfg.steps.train), "eval_steps": [int(n) for n in cfg.steps.eval],
        "num_processes": ctx.accelerator.num_processes, "device": str(ctx.accelerator.device),
        "faults": {k: v for k, v in ctx.faults.items()}, "resumes": int(metrics["run"].get("resumes", 0)),
        "commit": _git_commit(), "versions": _versions(),
        # the training reward's scale (PickScore with or without logit_scale, ImageReward normalised or raw, ...)
        "reward_convention": getattr(ctx.reward_fn, "convention", cfg.reward.name),
    }
    _atomic_write(run_dir / "metrics.json", json.dumps(_finite_or_null(metrics), indent=2, allow_nan=False))


def _finite_or_null(value):
    """NaN/inf → null, so metrics.json is strict JSON whatever a faulty epoch logged."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def _atomic_write(path: Path, text: str) -> None:
    """Write `path` so that a kill at any instant leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_final_lora(model: DiffusionModel, directory: Path) -> None:
    """The final LoRA, swapped in whole (a kill while saving leaves the previous one or none, never a partial)."""
    import shutil

    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_lora(tmp)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict:
    import accelerate
    import diffusers
    import peft
    import transformers

    return {"align_bench": __version__, "python": platform.python_version(), "torch": str(torch.__version__),
            "diffusers": diffusers.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "accelerate": accelerate.__version__}
