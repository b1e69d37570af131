"""Scheduler kernels against closed forms and the references' values (DDIM σ at the reference grids, DDPM ᾱ)."""

import math

import pytest
import torch

from align_bench.core import scheduling as S

ALPHAS = S.alphas_cumprod_scaled_linear()


def test_alphas_cumprod_reference_values():
    for t, ref in [(0, 0.99915), (1, 0.998296), (981, 0.0057755), (999, 0.0046601)]:
        assert ALPHAS[t].item() == pytest.approx(ref, abs=2e-6)


@pytest.mark.parametrize("n, leading, trailing", [
    (1, [1], [999]),
    (2, [501, 1], [999, 499]),
    (4, [751, 501, 251, 1], [999, 749, 499, 249]),
    (8, [876, 751, 626, 501, 376, 251, 126, 1], [999, 874, 749, 624, 499, 374, 249, 124]),
])
def test_ddim_grids(n, leading, trailing):
    assert S.timestep_grid(n, "leading", steps_offset=1).tolist() == leading
    assert S.timestep_grid(n, "trailing").tolist() == trailing


def test_long_grids_endpoints():
    g = S.timestep_grid(20, "leading", steps_offset=1)
    assert g[:2].tolist() == [951, 901] and g[-1] == 1
    g = S.timestep_grid(50, "trailing")
    assert g[:2].tolist() == [999, 979] and g[-1] == 19


@pytest.mark.parametrize("n, grid", [
    (1, [999]), (2, [999, 499]), (4, [999, 759, 519, 279]), (8, [999, 879, 759, 639, 519, 399, 279, 159]),
])
def test_lcm_grids(n, grid):
    assert S.lcm_timestep_grid(n).tolist() == grid


def test_bad_spacing_and_steps_rejected():
    with pytest.raises(ValueError, match="spacing"):
        S.timestep_grid(4, "middle")
    with pytest.raises(ValueError, match="num_steps"):
        S.timestep_grid(0)


@pytest.mark.parametrize("n, spacing, offset, first, last", [
    (50, "leading", 1, 0.45446, 0.02065),
    (20, "leading", 1, 0.64439, 0.02065),
    (8, "trailing", 0, 0.85840, 0.02908),
    (4, "trailing", 0, 0.93263, 0.02913),
    (1, "trailing", 0, 0.02915, 0.02915),
])
def test_ddim_sigma_reference_values(n, spacing, offset, first, last):
    grid = S.timestep_grid(n, spacing, steps_offset=offset)
    prev = S.previous_timesteps(grid)
    x = torch.randn(2, 4, 4, 4)
    for k, ref in [(0, first), (n - 1, last)]:
        out = S.ddim_step(x, grid[k], prev[k], x, ALPHAS, eta=1.0, final_alpha_cumprod=ALPHAS[0].item())
        assert out.std[0].item() == pytest.approx(ref, abs=1e-4)


def test_gaussian_log_prob_closed_form():
    x = torch.tensor([[0.5, -1.0, 2.0, 0.0]])
    mean = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    std = torch.full((1, 1), 2.0)
    expected = sum(-(xi - mi) ** 2 / 8 - math.log(2.0) - 0.5 * math.log(2 * math.pi)
                   for xi, mi in zip([0.5, -1.0, 2.0, 0.0], [0.0, 0.0, 1.0, 0.0])) / 4
    assert S.gaussian_log_prob(x, mean, std).item() == pytest.approx(expected, abs=1e-6)
    # at x = μ, σ = 1: −½·log 2π
    assert S.gaussian_log_prob(mean, mean, torch.ones(1, 1)).item() == pytest.approx(-0.9189385, abs=1e-6)
    # equals torch.distributions.Normal averaged over elements
    xs, ms = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    ss = torch.rand(3, 1, 1, 1) + 0.1
    ref = torch.distributions.Normal(ms, ss).log_prob(xs).mean(dim=(1, 2, 3))
    torch.testing.assert_close(S.gaussian_log_prob(xs, ms, ss), ref)


def test_ddim_step_hand_computed():
    """One step on hand-picked tensors against the formula written out with scalars."""
    t, tp, eta = 501, 1, 0.7
    a, ap = ALPHAS[t].item(), ALPHAS[tp].item()
    x = torch.full((1, 1, 1, 2), 0.8)
    eps = torch.tensor([[[[0.3, -0.2]]]])
    x0 = (0.8 - math.sqrt(1 - a) * torch.tensor([0.3, -0.2])) / math.sqrt(a)
    sigma = eta * math.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
    mean = math.sqrt(ap) * x0 + math.sqrt(1 - ap - sigma**2) * torch.tensor([0.3, -0.2])
    prev = torch.tensor([[[[0.1, 0.4]]]])
    out = S.ddim_step(eps, t, tp, x, ALPHAS, eta=eta, final_alpha_cumprod=ALPHAS[0].item(), prev_sample=prev)
    torch.testing.assert_close(out.x0_pred.flatten(), x0, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.mean.flatten(), mean, atol=1e-6, rtol=1e-6)
    lp = (-(torch.tensor([0.1, 0.4]) - mean) ** 2 / (2 * sigma**2) - math.log(sigma) - 0.5 * math.log(2 * math.pi))
    assert out.log_prob.item() == pytest.approx(lp.mean().item(), rel=1e-6)


def test_ddim_per_sample_timesteps_match_scalar():
    x, eps = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t, tp = torch.tensor([999, 499, 249]), torch.tensor([499, 249, -1])
    batched = S.ddim_step(eps, t, tp, x, ALPHAS, eta=1.0, final_alpha_cumprod=ALPHAS[0].item(),
                          noise=torch.zeros_like(x))
    for i in range(3):
        single = S.ddim_step(eps[i:i + 1], t[i].item(), tp[i].item(), x[i:i + 1], ALPHAS, eta=1.0,
                             final_alpha_cumprod=ALPHAS[0].item(), noise=torch.zeros_like(x[i:i + 1]))
        torch.testing.assert_close(batched.prev_sample[i:i + 1], single.prev_sample)


def test_recomputed_log_prob_equals_stored():
    """Feeding the drawn sample back with the same model output reproduces its log-prob bit for bit."""
    x, eps = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    g = torch.Generator().manual_seed(0)
    drawn = S.ddim_step(eps, 749, 499, x, ALPHAS, eta=1.0, final_alpha_cumprod=ALPHAS[0].item(), generator=g)
    again = S.ddim_step(eps, 749, 499, x, ALPHAS, eta=1.0, final_alpha_cumprod=ALPHAS[0].item(),
                        prev_sample=drawn.prev_sample)
    assert torch.equal(drawn.log_prob, again.log_prob)
    drawn = S.lcm_step(eps, 759, 519, x, ALPHAS, generator=g)
    again = S.lcm_step(eps, 759, 519, x, ALPHAS, prev_sample=drawn.prev_sample)
    assert torch.equal(drawn.log_prob, again.log_prob)


def test_eta_zero_is_deterministic_and_has_no_log_prob():
    x, eps = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    a = S.ddim_step(eps, 749, 499, x, ALPHAS, eta=0.0, final_alpha_cumprod=ALPHAS[0].item())
    b = S.ddim_step(eps, 749, 499, x, ALPHAS, eta=0.0, final_alpha_cumprod=ALPHAS[0].item())
    assert torch.equal(a.prev_sample, b.prev_sample) and torch.isnan(a.log_prob).all()
    assert torch.equal(a.std, torch.zeros_like(a.std))


def test_lcm_step_boundary_and_last_step():
    x, eps = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    c_skip, c_out = S.lcm_boundary_scalings(torch.tensor(99.0))
    assert c_skip < 3e-7 and c_out > 0.9999998
    out = S.lcm_step(eps, 999, 999, x, ALPHAS, deterministic=True)
    a = ALPHAS[999]
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    torch.testing.assert_close(out.prev_sample, out.x0_pred)  # 1-step: d itself, no noise
    torch.testing.assert_close(out.x0_pred, x0, atol=1e-4, rtol=1e-4)
    noisy = S.lcm_step(eps, 519, 279, x, ALPHAS, noise=torch.zeros_like(x))
    torch.testing.assert_close(noisy.prev_sample, ALPHAS[279].sqrt() * noisy.x0_pred)
    assert noisy.std[0].item() == pytest.approx((1 - ALPHAS[279]).sqrt().item())


# ------------------------------------------------------------------------------------------------ SPO's children
@pytest.mark.parametrize("kernel", ["ddim", "lcm"])
def test_children_share_the_transition_and_differ_only_through_their_distance(kernel):
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t, t_prev = torch.tensor([999, 749, 499]), torch.tensor([749, 499, 249])

    def step(**kw):
        if kernel == "ddim":
            return S.ddim_step(eps, t, t_prev, x, ALPHAS, eta=1.0, final_alpha_cumprod=float(ALPHAS[0]), **kw)
        return S.lcm_step(eps, t, t_prev, x, ALPHAS, **kw)

    parent = step(draw=False)
    assert parent.prev_sample is None and parent.log_prob is None  # the transition only
    noise = torch.randn(4, 3, 4, 2, 2, generator=g)  # k = 4 children of each of 3 parents
    children, log_probs = S.draw_children(parent, noise, torch.float32)
    assert children.shape == (4, 3, 4, 2, 2) and log_probs.shape == (4, 3)
    for i in range(4):  # child i is what one ordinary step with the same noise draws, bit for bit
        one = step(noise=noise[i])
        assert torch.equal(children[i], one.prev_sample) and torch.equal(log_probs[i], one.log_prob)
    # shared μ and σ: log π(c_i) − log π(c_j) = −(‖c_i − μ‖² − ‖c_j − μ‖²) / (2σ²·D), D = C·h·w elements
    D, var = 16, parent.std.view(3) ** 2
    sq = ((children - parent.mean) ** 2).flatten(2).sum(-1)  # (k, B)
    torch.testing.assert_close(log_probs - log_probs[0], -(sq - sq[0]) / (2 * var * D), rtol=1e-4, atol=1e-6)


def test_children_need_a_stochastic_step():
    x = torch.randn(1, 4, 2, 2)
    parent = S.ddim_step(x, 999, 499, x, ALPHAS, eta=0.0, final_alpha_cumprod=float(ALPHAS[0]), draw=False)
    with pytest.raises(ValueError, match="stochastic"):
        S.draw_children(parent, torch.randn(2, 1, 4, 2, 2), torch.float32)
    with pytest.raises(ValueError, match="noise must be"):
        S.draw_children(S.ddim_step(x, 999, 499, x, ALPHAS, eta=1.0, final_alpha_cumprod=0.999, draw=False),
                        torch.randn(1, 4, 2, 2), torch.float32)
