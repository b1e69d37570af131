"""AlignProp (docs/algos/alignprop.md): truncated reward backprop, loss forms, reward input mapping, config-time and
memory refusals, determinism, and a real improvement on the tiny world."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import compose, tiny_world_missing

from align_bench.algorithms import alignprop as ap
from align_bench.core.rollout import rollout
from align_bench.rewards import build_reward


def _lora_model(load_model, path, seed=0):
    """Random pipeline with a LoRA whose up-projections are non-zero (at init they are 0 ⇒ no grad to `down`)."""
    model = load_model(path)
    model.add_lora(4, 4)
    g = torch.Generator().manual_seed(seed)
    for p in model.lora_parameters():
        p.data = 0.1 * torch.randn(p.shape, generator=g)
    return model


def _lora_grads(model, b, N=4, checkpointing=False, seed=0):
    """Roll out with grad from step b, loss = −brightness; returns ({name: grad or None}, images, step outputs)."""
    outs = []
    predict = model.predict

    def recording_predict(*args, **kwargs):
        out = predict(*args, **kwargs)
        if out.requires_grad:
            out.retain_grad()
        outs.append(out)
        return out

    model.predict = recording_predict
    try:
        for p in model.lora_parameters():
            p.grad = None
        traj = rollout(model, ["a cat", "a dog"], num_steps=N, eta=1.0, guidance_scale=5.0,
                       generator=torch.Generator().manual_seed(seed), grad_from_step=b,
                       gradient_checkpointing=checkpointing)
        if traj.images.requires_grad:
            (-traj.images.mean()).backward()
    finally:
        del model.predict
    names = [n for n, p in model.unet.named_parameters() if p.requires_grad]
    grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in zip(names, model.lora_parameters())}
    return grads, traj.images.detach(), outs


def _flat(grads):
    return torch.cat([(torch.zeros(1) if g is None else g.flatten()) for g in grads.values()])


# ------------------------------------------------------------------------------------------- truncation
def test_gradients_reach_lora_only_through_the_last_k_steps(random_pipeline_dir, load_model):
    model = _lora_model(load_model, random_pipeline_dir)
    N = 4
    g_last, img_last, outs = _lora_grads(model, b=N - 1, N=N)  # K = 1
    # UNet outputs of steps before b carry no graph; from b on they receive a non-zero gradient.
    assert [o.requires_grad for o in outs] == [False, False, False, True]
    assert outs[-1].grad is not None and outs[-1].grad.abs().sum() > 0
    g_two, img_two, outs = _lora_grads(model, b=N - 2, N=N)  # K = 2
    assert [o.requires_grad for o in outs] == [False, False, True, True]
    assert all(o.grad.abs().sum() > 0 for o in outs[2:])
    # The truncation changes the gradient, never the sample.
    torch.testing.assert_close(img_last, img_two, rtol=0, atol=0)
    assert _flat(g_last).abs().sum() > 0
    assert (_flat(g_two) - _flat(g_last)).abs().sum() > 0  # step N−2 contributes once included...
    g_none, _, outs = _lora_grads(model, b=N, N=N)  # ...and with no trained step nothing reaches the LoRA
    assert all(g is None for g in g_none.values()) and not any(o.requires_grad for o in outs)


def test_checkpointing_does_not_change_gradients(random_pipeline_dir, load_model):
    model = _lora_model(load_model, random_pipeline_dir)
    g_plain, img_plain, _ = _lora_grads(model, b=1, N=3, checkpointing=False)
    g_ckpt, img_ckpt, _ = _lora_grads(model, b=1, N=3, checkpointing=True)
    torch.testing.assert_close(img_plain, img_ckpt, rtol=0, atol=0)
    torch.testing.assert_close(_flat(g_plain), _flat(g_ckpt), rtol=1e-5, atol=1e-8)


def test_checkpointed_decode_does_not_change_gradients(random_pipeline_dir, load_model):
    model = _lora_model(load_model, random_pipeline_dir)
    grads = []
    for ckpt_dec in (False, True):
        for p in model.lora_parameters():
            p.grad = None
        traj = rollout(model, ["a cat"], num_steps=2, eta=1.0, guidance_scale=5.0,
                       generator=torch.Generator().manual_seed(0), grad_from_step=1, gradient_checkpointing=True,
                       checkpoint_decode=ckpt_dec)
        traj.images.mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.lora_parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-8)


def test_truncation_draws():
    g = torch.Generator().manual_seed(0)
    assert ap.draw_backprop_steps(50, "fixed", g, k=1) == 1
    assert ap.draw_backprop_steps(8, "fixed", g, k=8) == 8  # full backprop
    with pytest.raises(ValueError):
        ap.draw_backprop_steps(8, "fixed", g, k=9)
    ks = [ap.draw_backprop_steps(50, "gaussian", g) for _ in range(4000)]
    assert min(ks) >= 1 and max(ks) <= 49
    # The reference's law: b = int(g), g ~ N(42, 5), redrawn until 1 ≤ b ≤ 49, K = 50 − b.
    cdf = lambda v: 0.5 * (1 + math.erf((v - 42) / (5 * math.sqrt(2))))  # noqa: E731
    pmf = {50 - b: cdf(b + 1) - cdf(b) for b in range(1, 50)}
    ref_mean = sum(k * p for k, p in pmf.items()) / sum(pmf.values())
    assert abs(sum(ks) / len(ks) - ref_mean) < 0.25, ref_mean
    ks = [ap.draw_backprop_steps(8, "uniform", g) for _ in range(2000)]
    assert set(ks) == set(range(1, 8))
    assert ap.max_backprop_steps(50, _ns(strategy="gaussian")) == 49
    assert ap.max_backprop_steps(50, _ns(strategy="fixed", k=1)) == 1


def _ns(**kw):
    from types import SimpleNamespace

    base = dict(strategy="gaussian", k_mean=8.0, k_std=5.0, k_min=1, k_max=None, k=1)
    return SimpleNamespace(**{**base, **kw})


# ------------------------------------------------------------------------------------------- loss and inputs
def test_loss_equals_the_formula_on_hand_made_rewards():
    r = torch.tensor([2.0, 7.0, 12.0])
    assert ap.alignprop_loss(r, "target_l1", 10.0, 1.0, 0.01).item() == pytest.approx(0.01 * (8 + 3 + 2) / 3)
    assert ap.alignprop_loss(r, "target_l1", 10.0, 2.0, 0.01).item() == pytest.approx(0.02 * (8 + 3 + 2) / 3)
    assert ap.alignprop_loss(r, "negative", None, 1.0, 0.01).item() == pytest.approx(-0.01 * 7.0)
    hps = torch.tensor([0.25, 0.30])
    assert ap.alignprop_loss(hps, "one_minus", None, 1.0, 0.01).item() == pytest.approx(0.01 * (0.75 + 0.70) / 2)
    # The gradient w.r.t. each reward is −coeff/B below the target (maximisation).
    r = torch.tensor([2.0, 7.0], requires_grad=True)
    ap.alignprop_loss(r, "target_l1", 10.0, 1.0, 0.01).backward()
    torch.testing.assert_close(r.grad, torch.tensor([-0.005, -0.005]))
    with pytest.raises(ValueError):
        ap.alignprop_loss(r, "l2", 10.0)


def test_reward_input_mapping():
    x = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(ap.reward_input(x), x)  # correct: the decode already maps to [0, 1]
    torch.testing.assert_close(ap.reward_input(x, reference_double_denormalize=True),
                               torch.tensor([0.5, 0.75, 1.0]).view(1, 3, 1, 1))


# ------------------------------------------------------------------------------------------- refusals
def test_non_differentiable_reward_is_refused_before_any_model_loads(monkeypatch, tmp_path):
    from align_bench.models.diffusion import DiffusionModel
    from align_bench.runner import run

    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(DiffusionModel, "from_pretrained", boom)
    with pytest.raises(ValueError) as e:
        run(compose(["algo=alignprop", "reward=jpeg_compressibility"]), tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "not differentiable" in msg and "jpeg_compressibility" in msg
    assert "differentiable rewards: [" in msg and "'brightness'" in msg


def test_memory_estimate_is_independent_of_steps_with_k1_and_checkpointing():
    per = {"unet": 1000, "unet_ckpt": 10, "tail": 500}
    assert ap.estimate_activation_bytes(2, 1, True, per) == 2 * (500 + 10 + 1000)
    assert ap.estimate_activation_bytes(2, 8, False, per) == 2 * (500 + 8 * 1000)
    # grows with K only through the small per-step inputs when checkpointing
    assert ap.estimate_activation_bytes(1, 49, True, per) < ap.estimate_activation_bytes(1, 2, False, per)


def test_probe_and_refusal_of_full_backprop_without_checkpointing(random_pipeline_dir, load_model):
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    model = load_model(random_pipeline_dir)
    model.add_lora(4, 4)
    reward = build_reward("brightness")
    per = ap.probe_per_sample_bytes(model, reward, "a cat", guidance_scale=5.0, eta=1.0)
    assert per["unet"] > 10 * per["unet_ckpt"] > 0 and per["tail"] > 0
    full = ap.estimate_activation_bytes(4, 50, False, per)
    k1 = ap.estimate_activation_bytes(4, 1, True, per)
    budget_gb = math.sqrt(full * k1) / 0.9 / 2**30  # between the two
    cfg = compose(["algo=alignprop", "steps.train=50", "algo.sample.batch_size=4", "algo.backprop.strategy=fixed",
                   "algo.backprop.k=50", "algo.train.gradient_checkpointing=false",
                   f"algo.train.memory_limit_gb={budget_gb}"])
    ctx = SimpleNamespace(cfg=cfg, model=model, reward_fn=reward, prompt_sampler=SimpleNamespace(prompts=["a cat"]),
                          guidance_scale=5.0, unet=None)
    with pytest.raises(MemoryError) as e:
        ap.check_memory(ctx)
    assert "\n" not in str(e.value) and "without gradient checkpointing" in str(e.value)
    ctx.cfg = OmegaConf.merge(cfg, {"algo": {"backprop": {"k": 1}, "train": {"gradient_checkpointing": True}}})
    info = ap.check_memory(ctx)  # K = 1 with checkpointing fits the same budget
    assert info["K_max"] == 1


def test_validate_rejects_bad_truncation_settings():
    from align_bench.runner import validate

    with pytest.raises(ValueError, match="almost never"):
        validate(compose(["algo=alignprop", "steps.train=8", "algo.backprop.k_mean=42"]))
    with pytest.raises(ValueError, match="backprop.k"):
        validate(compose(["algo=alignprop", "steps.train=8", "algo.backprop.strategy=fixed", "algo.backprop.k=9"]))
    validate(compose(["algo=alignprop", "steps.train=8", "algo.backprop.strategy=fixed", "algo.backprop.k=8"]))


# ------------------------------------------------------------------------------------------- end to end
def _fast_overrides(path, tmp):
    return ["algo=alignprop", f"model.path={path}", "reward=brightness",
            "prompts=simple_animals", "prompts.eval_max_prompts=2", "prompts.eval_seeds_per_prompt=1",
            "steps.train=2", "steps.eval=[1]", "eval.base=false", "logger=quiet", "logger.save_images=false",
            "logger.plots=false",
            "algo.num_epochs=2", "algo.sample.batch_size=2", "algo.sample.num_batches_per_epoch=2",
            "algo.backprop.strategy=uniform", "device=cpu", f"run_dir={tmp}"]


def test_short_run_is_deterministic_and_counts_reward_queries(random_pipeline_dir, tmp_path):
    from align_bench.runner import run

    results = []
    for i in range(2):
        m = run(compose(_fast_overrides(random_pipeline_dir, tmp_path / f"r{i}")), tmp_path / f"r{i}")
        results.append(m)
    a, b = results
    assert [e["loss"] for e in a["train"]] == [e["loss"] for e in b["train"]]
    assert [e["backprop_steps"] for e in a["train"]] == [e["backprop_steps"] for e in b["train"]]
    assert a["eval"]["final"] == b["eval"]["final"]
    last = a["train"][-1]
    assert last["optimizer_steps"] == 2 and last["reward_queries"] == 2 * 2 * 2  # 1 step per epoch
    saved = json.loads((tmp_path / "r0" / "metrics.json").read_text())
    assert saved["run"]["reward_queries"] == 8


@pytest.mark.skipif(tiny_world_missing("tiny", "clip", "aesthetic"), reason="tiny world not built (make tiny-world)")
def test_tiny_run_raises_eval_reward(tmp_path):
    from align_bench.runner import run

    # The whole preset (40 optimizer steps of 8 images; on the committed world the reward stays flat for ~20 of
    # them, so a shortened run does not show the gain), paired eval (same prompts and seeds) at 8 steps.
    cfg = compose(["experiment=tiny_alignprop", "logger=quiet", "logger.save_images=false", "logger.plots=false",
                   "steps.eval=[8]", "prompts.eval_max_prompts=8", f"run_dir={tmp_path}"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine, 2 OpenMP threads run ~10× slower than 1 (spin-waits)
    try:
        m = run(cfg, tmp_path)
    finally:
        torch.set_num_threads(threads)
    base = m["eval"]["base"]["tiny_aesthetic"]
    final = m["eval"]["final"]["tiny_aesthetic"]
    n = max(base, key=lambda k: int(k))
    assert final[n]["mean"] > base[n]["mean"] + 0.1, (base, final)


@pytest.mark.parametrize("preset,k,epochs,form", [("alignprop_sd15_aesthetic", None, 20, "target_l1"),
                                                  ("alignprop_sd15_aesthetic_k1", 1, 20, "target_l1"),
                                                  ("alignprop_sd15_hps", None, 25, "one_minus"),
                                                  ("alignprop_sd15_hps_k1", 1, 20, "one_minus")])
def test_reference_presets_compose(preset, k, epochs, form):
    from align_bench.runner import validate

    cfg = compose([f"experiment={preset}"])
    a = cfg.algo
    assert (a.name, cfg.model.name, int(cfg.steps.train), a.num_epochs) == ("alignprop", "sd15", 50, epochs)
    assert (a.sample.batch_size, a.sample.num_batches_per_epoch, a.train.learning_rate) == (8, 4, 1e-3)
    assert a.loss.form == form and a.loss.coeff == 0.01
    assert (a.backprop.strategy, a.backprop.k) == ("fixed", 1) if k else (a.backprop.k_mean, a.backprop.k_std) == (8, 5)
    with pytest.raises(ValueError, match="mixed_precision=fp16 needs a CUDA GPU"):
        validate(cfg)  # the reference's GPU settings are refused on a CPU, before anything loads
    cpu = compose([f"experiment={preset}", "mixed_precision=no", "model.dtype=fp32"])
    if "hps" in preset:  # its prompt file comes from the reference repo (the preset's comment says so)
        with pytest.raises(ValueError, match="hps_v2_all.txt"):
            validate(cpu)
    else:
        validate(cpu)


@pytest.mark.slow
def test_two_processes_keep_lora_in_sync(random_pipeline_dir, tmp_path):
    """The reference samples through the unwrapped UNet, so under DDP its gradients are not all-reduced. Here the
    forward (and the checkpoint's recompute) goes through the prepared UNet: after training both ranks hold the
    same LoRA weights."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
            str(root / "train.py"), *_fast_overrides(random_pipeline_dir, run_dir), "device=auto",
            "algo.backprop.strategy=fixed", "algo.backprop.k=2", "algo.train.learning_rate=3e-3"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["run"]["num_processes"] == 2 and metrics["run"]["lora_in_sync"] is True
    assert metrics["run"]["optimizer_steps"] == 2
