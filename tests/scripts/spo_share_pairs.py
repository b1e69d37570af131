"""Run under `torch.distributed.run --nproc_per_node 2`: SPO's share of pairs whose counts differ between processes
(rank 0: 3 pairs, rank 1: none), and a round with fewer pairs than processes; rank 0 prints JSON (tests/test_spo.py)."""

import json

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from align_bench.algorithms.common import Groups
from align_bench.algorithms.spo import share_pairs
from align_bench.core.rollout import Trajectory
from align_bench.models.conditioning import Conditioning

acc = Accelerator(cpu=True)
rank = acc.process_index


def pairs(n: int) -> Groups:
    """n pairs whose winner carries id i in its timestep and whose loser carries 100 + i."""
    ids = torch.cat([torch.arange(n), 100 + torch.arange(n)])[:, None]
    return Groups(Trajectory(prompts=[f"p{i}" for i in range(n)] * 2, cond=Conditioning(torch.zeros(2 * n, 3, 2)),
                             timesteps=ids, prev_timesteps=ids - 1, latents=ids.float().view(-1, 1, 1, 1, 1),
                             next_latents=torch.zeros(2 * n, 1, 1, 1, 1), log_probs=torch.zeros(2 * n, 1),
                             final_latents=torch.zeros(2 * n, 1, 1, 1)), 2)


mine = share_pairs(acc, pairs(3 if rank == 0 else 0), permutation_seed=7)
ids = mine.member(0).timesteps[:, 0].tolist()
losers_follow = mine.member(1).timesteps[:, 0].tolist() == [100 + i for i in ids] and \
    mine.member(0).latents.flatten().tolist() == [float(i) for i in ids] and mine.prompts == [f"p{i}" for i in ids]
few = share_pairs(acc, pairs(1 if rank == 0 else 0), permutation_seed=7).num_groups
everything = gather_object([{"ids": ids, "losers_follow": losers_follow, "few": few}])
if rank == 0:
    print(json.dumps({"ids": [e["ids"] for e in everything],
                      "losers_follow": all(e["losers_follow"] for e in everything),
                      "few": [e["few"] for e in everything]}))
acc.wait_for_everyone()
torch.distributed.destroy_process_group()
