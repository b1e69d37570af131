"""Section 2, update cost: one training micro-step of each algorithm, written as the algorithm's inner loop body
(its own loss function over `core.rollout.step_log_prob`, through the accelerate-prepared UNet, `ctx.backward`
inside `accelerator.accumulate`, `record_step`'s scalar logs), against the floor: a bare forward + backward of the
same LoRA-UNet on the same batch with the same guidance (CFG by batch concat, LCM's guidance embedding, or none).

Per algorithm, at its tiny preset's model and minibatch size (experiment=tiny_<algo>):
  ddpo / grpo   one (minibatch, trained step): PPO (+ GRPO's KL term only when kl_beta > 0, its default is 0)
  d3po / spo    one (pair-minibatch, step): `clipped_dpo_loss` on 2·bs trajectories in one UNet call
  sdpo          one (time position, pair-minibatch): `sdpo_loss`
  rebel         one pair-minibatch / N: the no-grad residual pass (N steps, both members) and N per-step
                backward calls, divided by N (the cost of one of its micro-steps, the residual amortised)
  alignprop     one micro-batch per image: sampling with grad through the last K steps (checkpointed as
                configured), decode, reward, backward; its floor is N − K no-grad UNet calls + K forward +
                backward (+ the checkpoint's recompute) + decoder + reward forward + backward, bare.
The optimizer step is not part of a micro-step (accumulation never syncs here)."""

from __future__ import annotations

import torch

from bench_common import fmt_s, interleaved, markdown_table

ALGOS = ("ddpo", "grpo", "d3po", "rebel", "sdpo", "spo", "alignprop")


def make_ctx(experiment: str, overrides: list[str] = (), accumulation: int | None = None):
    """The run's objects as runner.run builds them (model + LoRA, AdamW, accelerate-prepared UNet, reward).
    `accumulation`: backward calls per optimizer step; None: so many that no micro-step here syncs (no optimizer
    step); 0: the algorithm's own."""
    from accelerate import Accelerator

    from align_bench.algorithms import get_algorithm
    from align_bench.main import compose
    from align_bench.models import DiffusionModel, ModelSpec
    from align_bench.prompts import PromptSampler, load_prompts
    from align_bench.rewards import build_reward
    from align_bench.runner import RunContext

    cfg = compose([f"experiment={experiment}", "logger=quiet", *overrides])
    algo = get_algorithm(cfg.algo.name)
    if accumulation == 0:
        accumulation = algo.gradient_accumulation_steps(cfg)
    acc = Accelerator(cpu=True, gradient_accumulation_steps=accumulation or 10**9)
    model = DiffusionModel.from_pretrained(ModelSpec.from_config(cfg.model))
    model.add_lora(int(cfg.model.lora.rank), float(cfg.model.lora.alpha))
    opt = torch.optim.AdamW(model.lora_parameters(), lr=1e-4)
    unet, opt = acc.prepare(model.unet, opt)
    reward = build_reward(cfg.reward.name, "cpu", **cfg.reward.kwargs)
    ctx = RunContext(cfg, acc, model, unet, opt, reward, PromptSampler(load_prompts(cfg.prompts.train), 0),
                     torch.Generator().manual_seed(0), None)
    return ctx, algo


def floor_fn(ctx, traj, guidance: float):
    """Bare forward + backward of the prepared LoRA-UNet on step 0 of `traj`'s samples, the guidance applied as the
    model family does (inputs prepared once, outside the timed call)."""
    model, unet = ctx.model, ctx.unet
    x, t, cond = traj.latents[:, 0], traj.timesteps[:, 0], traj.cond
    B = len(x)
    kwargs = model._unet_kwargs(cond)
    if model.is_lcm:
        args = (x, t)
        kwargs["timestep_cond"] = model.guidance_embedding(guidance, B)
    elif guidance > 1:
        from align_bench.models.conditioning import Conditioning

        both = Conditioning.cat([model.uncond(B), cond])
        args, kwargs = (torch.cat([x, x]), torch.cat([t, t])), model._unet_kwargs(both)
    else:
        args = (x, t)

    def run():
        out = unet(*args, **kwargs).sample
        if guidance > 1 and not model.is_lcm:
            u, c = out.chunk(2)
            out = u + guidance * (c - u)
        out.float().square().mean().backward()
        ctx.optimizer.zero_grad(set_to_none=True)

    return run


def _sample(ctx, n: int, **kw):
    with torch.no_grad():
        return ctx.rollout(ctx.prompt_sampler.sample(n), decode=False, **kw)


def micro_step(ctx, algo_name: str):
    """(micro-step callable, floor callable, batch of the UNet call, note) for `algo_name` on `ctx`."""
    from align_bench.algorithms.common import Groups, clipped_dpo_loss, record_step, training_guidance
    from align_bench.core.rollout import step_log_prob

    if algo_name == "alignprop":
        return _alignprop(ctx)
    cfg, acc = ctx.cfg.algo, ctx.accelerator
    guidance, eta = training_guidance(ctx), float(cfg.sample.eta)
    ctx.unet.train()
    logs = _Logs()

    def finish(loss, info):
        grad_norm = ctx.backward(loss)
        record_step(logs, loss, info, grad_norm)
        ctx.optimizer.zero_grad(set_to_none=True)

    if algo_name in ("ddpo", "grpo"):
        from align_bench.algorithms.ddpo import ppo_loss
        from align_bench.algorithms.grpo import gaussian_kl, grpo_loss

        bs = int(cfg.train.batch_size)
        mb = _sample(ctx, bs)
        adv = torch.randn(bs, generator=torch.Generator().manual_seed(1))
        beta = float(cfg.train.get("kl_beta", 0.0))

        def step():
            with acc.accumulate(ctx.unet):
                out = step_log_prob(ctx.model, mb, 0, eta=eta, guidance_scale=guidance, unet=ctx.unet)
                if algo_name == "ddpo":
                    loss, info = ppo_loss(out.log_prob, mb.log_probs[:, 0], adv, float(cfg.train.clip_range),
                                          float(cfg.train.adv_clip_max))
                else:
                    kl = None
                    if beta > 0:
                        with torch.no_grad(), ctx.model.lora_disabled(ctx.unet):
                            ref = step_log_prob(ctx.model, mb, 0, eta=eta, guidance_scale=guidance, unet=ctx.unet)
                        kl = gaussian_kl(out.mean, ref.mean, out.std)
                    loss, info = grpo_loss(out.log_prob, mb.log_probs[:, 0], adv, kl, float(cfg.train.clip_range),
                                           float(cfg.train.adv_clip_max), beta)
                finish(loss, info)

        note = "PPO" if algo_name == "ddpo" else f"PPO + KL (kl_beta={beta:g})"
        return step, floor_fn(ctx, mb, guidance), bs, note

    if algo_name in ("d3po", "spo", "sdpo"):
        bs = int(cfg.train.batch_size)
        x_T = ctx.model.initial_noise(bs, ctx.generator).repeat(2, 1, 1, 1)
        with torch.no_grad():
            traj = ctx.rollout(ctx.prompt_sampler.sample(bs) * 2, initial_noise=x_T, decode=False)
        mb = Groups(traj, 2)
        signs = torch.tensor([[1.0, -1.0]]).expand(bs, 2)
        if algo_name == "sdpo":
            from align_bench.algorithms.sdpo import sdpo_loss

            adv = torch.randn(bs, 2, generator=torch.Generator().manual_seed(1))
            w = torch.full((bs,), 1.0 / float(cfg.train.log_scale))

            def step():
                with acc.accumulate(ctx.unet):
                    out = step_log_prob(ctx.model, mb.traj, 0, eta=eta, guidance_scale=guidance, unet=ctx.unet)
                    loss, info = sdpo_loss(mb.by_group(out.log_prob), mb.by_group(mb.traj.log_probs[:, 0]), adv, w,
                                           float(cfg.train.clip_range), float(cfg.train.adv_clip_max))
                    finish(loss, info)
        else:
            mb.traj.ref_log_probs = mb.traj.log_probs.clone()

            def step():
                with acc.accumulate(ctx.unet):
                    out = step_log_prob(ctx.model, mb.traj, 0, eta=eta, guidance_scale=guidance, unet=ctx.unet)
                    loss, info = clipped_dpo_loss(mb.by_group(out.log_prob), mb.by_group(mb.traj.ref_log_probs[:, 0]),
                                                  signs, float(cfg.train.beta), float(cfg.train.eps))
                    finish(loss, info)

        note = {"d3po": "clipped DPO, pair in one call", "spo": "clipped DPO (one stored step per pair)",
                "sdpo": "clipped reward-difference regression"}[algo_name]
        if algo_name in ("d3po", "spo"):
            note += f"; + per-epoch reference pass ({'N' if algo_name == 'd3po' else '1'} no-grad calls per pair)"
        return step, floor_fn(ctx, mb.traj, guidance), 2 * bs, note

    if algo_name == "rebel":
        from align_bench.algorithms.rebel import _trajectory_log_probs, rebel_residual, rebel_step_surrogate

        bs = int(cfg.train.batch_size)
        with torch.no_grad():
            traj = ctx.rollout(ctx.prompt_sampler.sample(bs) * 2, decode=False)
        mb = Groups(traj, 2)
        N, c = traj.num_steps, float(cfg.train.rebel_lr)
        old, old_2 = mb.member(0).log_probs.sum(1), mb.member(1).log_probs.sum(1)
        adv, adv_2 = torch.randn(bs), torch.randn(bs)

        def step():  # one whole pair-minibatch: the residual pass + N backward calls (reported / N)
            lp, lp2 = mb.by_group(_trajectory_log_probs(ctx, mb.traj, guidance)).unbind(1)
            residual = rebel_residual(lp, old, lp2, old_2, adv, adv_2, c)
            for k in range(N):
                with acc.accumulate(ctx.unet):
                    out = step_log_prob(ctx.model, mb.traj, k, eta=eta, guidance_scale=guidance, unet=ctx.unet)
                    lp_k, lp2_k = mb.by_group(out.log_prob).unbind(1)
                    ctx.backward(rebel_step_surrogate(lp_k, lp2_k, residual, c, N))
                    ctx.optimizer.zero_grad(set_to_none=True)
            float(residual.pow(2).mean())

        step.per = N
        return step, floor_fn(ctx, traj, guidance), 2 * bs, f"residual pass amortised over the N={N} micro-steps"

    raise KeyError(algo_name)


def _alignprop(ctx):
    from torch.utils.checkpoint import checkpoint

    from align_bench.algorithms.alignprop import alignprop_loss, reward_input

    cfg, acc, model, unet = ctx.cfg.algo, ctx.accelerator, ctx.model, ctx.unet
    N, B = int(ctx.cfg.steps.train), int(cfg.sample.batch_size)
    K = int(cfg.backprop.k) if cfg.backprop.strategy == "fixed" else 1
    ckpt, guidance = bool(cfg.train.gradient_checkpointing), ctx.guidance_scale
    prompts = ctx.prompt_sampler.sample(B)

    def step():
        with acc.accumulate(unet):
            traj = ctx.rollout(prompts, grad_from_step=N - K, gradient_checkpointing=ckpt,
                               checkpoint_decode=bool(cfg.train.checkpoint_decoder))
            rewards = ctx.score(reward_input(traj.images, bool(cfg.reference_double_denormalize)), prompts)
            loss = alignprop_loss(rewards, cfg.loss.form, cfg.loss.target, float(cfg.loss.grad_scale),
                                  float(cfg.loss.coeff))
            ctx.backward(loss)
        loss.item()
        ctx.optimizer.zero_grad(set_to_none=True)

    cond = model.encode_prompts(prompts)
    from align_bench.models.conditioning import Conditioning

    both = Conditioning.cat([model.uncond(B), cond])
    kwargs = model._unet_kwargs(both)
    t = torch.full((2 * B,), 500, dtype=torch.long)
    x0 = model.initial_noise(B, torch.Generator().manual_seed(0))

    def call(x):
        out = unet(torch.cat([x, x]), t, **kwargs).sample
        u, c = out.chunk(2)
        return x - 0.01 * (u + guidance * (c - u))

    def floor():
        x = x0
        with torch.no_grad():
            for _ in range(N - K):
                x = call(x)
        for _ in range(K):
            x = checkpoint(call, x, use_reentrant=False) if ckpt else call(x)
        images = model.decode(x)
        ctx.reward_fn(images, prompts).mean().backward()
        ctx.optimizer.zero_grad(set_to_none=True)

    step.per = floor.per = B
    return step, floor, B, (f"per image: N={N}, K={K}{', checkpointed' if ckpt else ''}, decoder + "
                            f"{ctx.cfg.reward.name}")


class _Logs(dict):
    def __missing__(self, key):
        self[key] = []
        return self[key]


def measure(algos: list[str], repeats: int, budget_s: float | None = None) -> list[dict]:
    rows = []
    for name in algos:
        ctx, _ = make_ctx(f"tiny_{name}")
        step, floor, batch, note = micro_step(ctx, name)
        t = interleaved({"step": step, "floor": floor}, repeats, warmup=1, budget_s=budget_s)
        per_step, per_floor = getattr(step, "per", 1), getattr(floor, "per", 1)
        rows.append({"algo": name, "model": ctx.cfg.model.name, "batch": batch, "guidance": _guidance_desc(ctx),
                     "step_s": t["step"] / per_step, "floor_s": t["floor"] / per_floor,
                     "ratio": (t["step"] / per_step) / (t["floor"] / per_floor), "note": note})
        del ctx
    return rows


def _guidance_desc(ctx) -> str:
    from align_bench.algorithms.common import training_guidance

    g = training_guidance(ctx) if ctx.cfg.algo.name != "alignprop" else ctx.guidance_scale
    if ctx.model.is_lcm:
        return f"w-embedding {g:g}"
    return f"CFG {g:g}" if g > 1 else "none"


def table(rows: list[dict]) -> list[str]:
    return markdown_table(
        ["algorithm", "model", "UNet batch", "guidance", "**micro-step / floor**", "micro-step", "floor", "what"],
        [[r["algo"], r["model"], r["batch"], r["guidance"], f"**{r['ratio']:.3f}×**", fmt_s(r["step_s"]),
          fmt_s(r["floor_s"]), r["note"]] for r in rows])
