"""tiny-turbo's distillation (align_bench.tiny.train): the reflow line, its loss, the teacher's ODE solve, and a
short fit on a tiny random UNet. The committed artifact itself is checked in test_tiny_artifacts.py."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from align_bench.tiny import train  # noqa: E402


def _scheduler():
    from diffusers import DDIMScheduler

    from align_bench.tiny.models import ddim_scheduler

    return DDIMScheduler.from_config(ddim_scheduler().config)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 20, 50])
def test_trailing_timesteps_match_the_ddim_scheduler(n):
    sched = _scheduler()
    sched.set_timesteps(n)
    assert train.trailing_timesteps(n).tolist() == sched.timesteps.tolist()
    assert set(train.trailing_timesteps(4).tolist()) < set(train.trailing_timesteps(8).tolist())


def test_reflow_line_starts_at_x_T_and_ends_at_x0():
    acp = train._alphas_cumprod()
    gen = torch.Generator().manual_seed(0)
    x_T, x0 = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    at_999 = train.reflow_inputs(x_T, x0, torch.full((3,), 999), acp)
    assert torch.allclose(at_999, x_T, atol=1e-5)
    eps_star = (x_T - acp[999].sqrt() * x0) / (1 - acp[999]).sqrt()
    at_0 = train.reflow_inputs(x_T, x0, torch.zeros(3, dtype=torch.long), acp)
    assert torch.allclose(at_0, acp[0].sqrt() * x0 + (1 - acp[0]).sqrt() * eps_star, atol=1e-6)  # ᾱ_0 = 0.99915
    t = torch.tensor([999, 499, 0])
    assert train.reflow_eps_loss(eps_star, x_T, x0, t, acp).item() == pytest.approx(0.0, abs=1e-10)


def test_reflow_loss_is_truncated_snr_weighted():
    """ε̂ = ε* + 1 everywhere: per-sample loss = max(1, (1 − ᾱ_t)/ᾱ_t), by hand for t = 999 and t = 0."""
    acp = train._alphas_cumprod()
    x_T, x0 = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    eps_star = (x_T - acp[999].sqrt() * x0) / (1 - acp[999]).sqrt()
    t = torch.tensor([999, 0])
    a = acp[999].item()
    expected = ((1 - a) / a + 1.0) / 2  # t = 999: image-space error (×214); t = 0: ε-space error (weight 1)
    assert (1 - a) / a == pytest.approx(213.6, rel=1e-3)  # ᾱ_999 = 0.00466 on SD's schedule
    assert train.reflow_eps_loss(eps_star + 1, x_T, x0, t, acp).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_a_unet_predicting_the_coupled_noise_samples_x0_at_every_step_count(n):
    """The claim of the distillation: stock DDIM (η = 0, trailing) with ε̂ ≡ ε* returns x0 at 1, 2, 4 and 8 steps —
    every step lands on the same line, and its x̂0 is x0 at every step."""
    acp = train._alphas_cumprod()
    gen = torch.Generator().manual_seed(1)
    x_T, x0 = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    eps_star = (x_T - acp[999].sqrt() * x0) / (1 - acp[999]).sqrt()
    sched = _scheduler()
    sched.set_timesteps(n)
    x = x_T
    for t in sched.timesteps:
        assert torch.allclose(x, train.reflow_inputs(x_T, x0, torch.full((2,), int(t)), acp), atol=1e-4)
        out = sched.step(eps_star, t, x, eta=0.0)
        assert torch.allclose(out.pred_original_sample, x0, atol=1e-3)
        x = out.prev_sample
    assert torch.allclose(x, acp[0].sqrt() * x0 + (1 - acp[0]).sqrt() * eps_star, atol=1e-4)


def _random_parts(tmp_path):
    from diffusers import StableDiffusionPipeline

    from align_bench.models.testing import build_random_pipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(build_random_pipeline(tmp_path / "pipe")))
    return pipe.unet.eval(), pipe.text_encoder.eval(), pipe.tokenizer


def test_teacher_couplings_are_the_stock_ddim_cfg_solve(tmp_path):
    """x0 of each coupling = the last x̂0 of diffusers' DDIMScheduler (trailing, η = 0) driving the CFG teacher."""
    from align_bench.tiny.models import tokenize

    teacher, te, tok = _random_parts(tmp_path)
    captions = ["a red circle on a blue background", "two white squares on a green background"]
    x_T, x0, drawn = train.teacher_couplings(teacher, te, tok, captions, 3, guidance=4.0, steps=4, bs=2, seed=5)
    assert x_T.shape == x0.shape == (3, 4, 8, 8) and len(drawn) == 3 and set(drawn) <= set(captions)
    sched = _scheduler()
    sched.set_timesteps(4)  # 1000/4 integral: diffusers' t − 1000/N is the next grid entry
    with torch.no_grad():
        emb = te(tokenize(tok, drawn))[0]
        emb_u = te(tokenize(tok, [""] * 3))[0]
        x = x_T
        for t in sched.timesteps:
            eps_c = teacher(x, t, emb).sample
            eps_u = teacher(x, t, emb_u).sample
            out = sched.step(eps_u + 4.0 * (eps_c - eps_u), t, x, eta=0.0)
            x = out.prev_sample
    assert torch.allclose(x0, out.pred_original_sample, rtol=1e-4, atol=1e-4)
    again = train.teacher_couplings(teacher, te, tok, captions, 3, guidance=4.0, steps=4, bs=3, seed=5)
    assert torch.allclose(again[1], x0, rtol=1e-5, atol=1e-4) and again[2] == drawn  # batch size: same result


def test_distill_turbo_fits_its_couplings_in_one_step(tmp_path):
    """A short distillation on a tiny random UNet: the student's 1-step DDIM x̂0 (t = 999) moves to the couplings'
    x0 (error well below the teacher's), and the student is a plain UNet of the teacher's config."""
    teacher, te, tok = _random_parts(tmp_path)
    captions = ["a red circle on a blue background", "a green square on a white background"]
    gen = torch.Generator().manual_seed(3)
    x_T = torch.randn(8, 4, 8, 8, generator=gen)
    x0 = torch.stack([torch.full((4, 8, 8), 1.0), torch.full((4, 8, 8), -1.0)]).repeat(4, 1, 1, 1)
    drawn = [captions[i % 2] for i in range(8)]
    acp = train._alphas_cumprod()
    from align_bench.tiny.models import tokenize

    def one_step_error(unet):
        with torch.no_grad():
            eps = unet(x_T, torch.full((8,), 999), te(tokenize(tok, drawn))[0]).sample
        x0_hat = (x_T - (1 - acp[999]).sqrt() * eps) / acp[999].sqrt()
        return (x0_hat - x0).pow(2).mean().item()

    before = one_step_error(teacher)
    student = train.distill_turbo(teacher, te, tok, captions, steps=60, bs=8, lr=2e-3, ema_decay=0.9, seed=0,
                                  couplings=(x_T, x0, drawn))
    after = one_step_error(student)
    assert after < 0.25 * before, (before, after)
    assert student.config == teacher.config and student.config.time_cond_proj_dim is None
    assert one_step_error(teacher) == before  # the teacher is not modified
