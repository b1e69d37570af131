"""The toolkit the log-prob algorithms share: groups of trajectories (layout, selection, time shuffling, epochs of
several sampling calls), the counting seams of the run context, and the process helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from align_bench.algorithms.common import Groups, collect_groups, process_slice
from align_bench.core.rollout import Trajectory
from align_bench.models.conditioning import Conditioning

ROOT = Path(__file__).resolve().parents[1]


def _fake_traj(ids: torch.Tensor, steps: int = 3) -> Trajectory:
    """A trajectory whose every tensor encodes the sample id (and the step in the per-step ones)."""
    B = len(ids)
    per_step = ids[:, None] * 10 + torch.arange(steps)[None]  # (B, N): id·10 + step
    return Trajectory(prompts=[f"p{int(i)}" for i in ids], cond=Conditioning(ids.view(B, 1, 1).float()),
                      timesteps=per_step, prev_timesteps=per_step, latents=per_step.float()[..., None, None, None],
                      next_latents=per_step.float()[..., None, None, None], log_probs=per_step.float(),
                      final_latents=ids.float().view(B, 1, 1, 1), images=ids.float().view(B, 1, 1, 1))


def test_groups_are_member_major_and_keep_that_layout():
    # 3 groups of 2: member m of group g has id 100·m + g at index m·3 + g
    ids = torch.tensor([0, 1, 2, 100, 101, 102])
    g = Groups(_fake_traj(ids), 2)
    assert g.num_groups == 3 and g.prompts == ["p0", "p1", "p2"]
    assert g.member(1).final_latents.flatten().tolist() == [100, 101, 102]
    sub = g.select(torch.tensor([2, 0]))
    assert sub.traj.final_latents.flatten().tolist() == [2, 0, 102, 100]
    assert sub.by_group(sub.traj.final_latents.flatten()).tolist() == [[2, 102], [0, 100]]
    order = torch.tensor([[2, 0], [1, 2], [0, 1]])  # group g's steps, the same for both of its members
    shuffled = g.with_steps(order)
    assert shuffled.traj.timesteps.tolist() == [[2, 0], [11, 12], [20, 21], [1002, 1000], [1011, 1012], [1020, 1021]]
    with pytest.raises(ValueError, match="groups of 4"):
        Groups(_fake_traj(ids), 4)


def test_an_epoch_of_sampling_calls_keeps_group_p_at_index_p():
    """Groups.cat over calls stays member-major over the whole epoch; rewards (P, G) follow the same order."""
    calls = iter(range(100))

    def rollout(prompts, initial_noise):  # call c: group p, member m has id 1000·m + 10·c + p
        c, P = next(calls), len(prompts) // 2
        return _fake_traj(torch.tensor([1000 * m + 10 * c + p for m in range(2) for p in range(P)]))

    ctx = SimpleNamespace(progress=False, prompt_sampler=SimpleNamespace(sample=lambda n: ["x"] * n),
                          model=SimpleNamespace(initial_noise=lambda n, g: torch.zeros(n, 1, 1, 1)), generator=None,
                          rollout=rollout, score=lambda images, prompts: images.flatten() + 0.5)
    groups, rewards = collect_groups(ctx, num_batches=2, groups_per_batch=3, group_size=2, shared_x_T=True)
    first = [0, 1, 2, 10, 11, 12]
    assert groups.member(0).final_latents.flatten().tolist() == first
    assert groups.member(1).final_latents.flatten().tolist() == [1000 + i for i in first]
    assert rewards.tolist() == [[i + 0.5, 1000 + i + 0.5] for i in first]
    assert groups.traj.images is None  # dropped: training needs latents only


def test_shared_and_independent_initial_noise():
    from align_bench.algorithms.common import sample_groups

    seen = {}

    def rollout(prompts, initial_noise):
        seen.update(x=initial_noise, p=prompts)
        return _fake_traj(torch.arange(len(prompts)))

    model = SimpleNamespace(initial_noise=lambda n, g: torch.randn(n, 2, generator=g))
    ctx = SimpleNamespace(prompt_sampler=SimpleNamespace(sample=lambda n: [f"p{i}" for i in range(n)]), model=model,
                          generator=torch.Generator().manual_seed(0), rollout=rollout)
    sample_groups(ctx, 3, 4, shared_x_T=True)
    x = seen["x"].view(4, 3, 2)
    assert seen["p"] == ["p0", "p1", "p2"] * 4 and all(torch.equal(x[m], x[0]) for m in range(4))
    sample_groups(ctx, 3, 4, shared_x_T=False)
    assert len(torch.unique(seen["x"][:, 0])) == 12


def test_score_is_the_one_place_that_counts_reward_queries_and_passes_timesteps():
    from align_bench.rewards.base import Reward
    from align_bench.runner import RunContext

    class StepAware(Reward):
        name, step_aware = "fake", True

        def score(self, images, prompts, timesteps):
            return images.mean((1, 2, 3)) + (0 if timesteps is None else timesteps.float())

    class Plain(Reward):
        name = "plain"

        def score(self, images, prompts):
            return images.mean((1, 2, 3))

    images = torch.ones(2, 3, 4, 4)
    ctx = RunContext(cfg=None, accelerator=None, model=None, unet=None, optimizer=None, reward_fn=StepAware(),
                     prompt_sampler=None, generator=None, run_dir=None)
    assert ctx.score(images, ["a", "b"], torch.tensor([0, 500])).tolist() == [1.0, 501.0]
    assert ctx.score(images, ["a", "b"]).tolist() == [1.0, 1.0]
    ctx.reward_fn = Plain()
    assert ctx.score(images, ["a", "b"], torch.tensor([0, 500])).tolist() == [1.0, 1.0]  # plain: ignored
    assert ctx.counters["reward_queries"] == 6 and ctx.counters["images"] == 0


def test_process_slice_single_process():
    acc = SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"))
    assert process_slice(acc, [1.0, 2.0]).tolist() == [1.0, 2.0]


@pytest.mark.slow
def test_gather_of_unequal_lengths_over_two_processes(tmp_path):
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
            str(ROOT / "tests" / "scripts" / "gather_variable.py")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["unequal"] == [0.0, 1.0, 2.0, 10.0]
    assert out["one_empty"] == [[1.0, 1.0], [1.0, 1.0]] and out["all_empty"] == 0
    assert out["slices"] == [[0.0, 1.0], [2.0, 3.0]]
