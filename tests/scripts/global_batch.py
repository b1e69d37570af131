"""One global batch, two updates, through the runner's `RunContext.backward`: run alone, or under
`torch.distributed.run --nproc_per_node 2`, where each process takes its half of the same global batch.

    python global_batch.py <pipeline dir> <out dir> ddpo rebel

Each algorithm named picks the loss: `ddpo` (PPO on single trajectories) or `rebel` (REBEL's squared residual
on pairs, whose members must stay on one process). The optimizer is plain SGD with clipping off, so the update is
−lr · gradient: with Adam a summed gradient (2× too large) would give the same first step and hide the fault.
Rank 0 saves the LoRA parameters before and after the updates to <out dir>/<algo>.pt (read by
tests/test_reliability.py, which compares the two runs)."""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from align_bench.algorithms.ddpo import ppo_loss
from align_bench.algorithms.rebel import rebel_loss
from align_bench.core.rollout import Trajectory, rollout, step_log_prob
from align_bench.main import compose
from align_bench.models import DiffusionModel, ModelSpec
from align_bench.runner import RunContext

GLOBAL_BATCH, NUM_STEPS, UPDATES = 4, 2, 2
torch.set_num_threads(1)
acc = Accelerator(cpu=True)


def one_global_batch(pipe: str, algo: str) -> dict:
    unit = 2 if algo == "rebel" else 1  # a micro-batch: one trajectory, or one pair
    cfg = compose(["model=tiny", f"model.path={pipe}", f"algo={algo}", "algo.train.max_grad_norm=1e9",
                   "logger=quiet"])
    # Each process accumulates over its own micro-batches (one unit each) and steps: the same global batch whatever
    # the process count, as validate_minibatches requires of a real run.
    micro_batches = GLOBAL_BATCH // unit // acc.num_processes
    acc.gradient_accumulation_steps = micro_batches * NUM_STEPS
    torch.manual_seed(0)  # the same LoRA initialisation on every process and in every run
    model = DiffusionModel.from_pretrained(ModelSpec.from_config(cfg.model))
    model.add_lora(4, 4.0)
    initial = {k: v.detach().clone() for k, v in model.lora_state_dict().items()}
    optimizer = torch.optim.SGD(model.lora_parameters(), lr=5.0 if algo == "ddpo" else 0.01)  # steps ~0.05 and ~1
    unet, optimizer = acc.prepare(model.unet, optimizer)
    ctx = RunContext(cfg, acc, model, unet, optimizer, reward_fn=None, prompt_sampler=None, generator=None,
                     run_dir=None)

    # The global batch, identical on every process: B trajectories (REBEL: B/2 pairs, members adjacent).
    prompts = ["a red cat", "a blue dog", "a green bird", "a red fish"][:GLOBAL_BATCH]
    with torch.no_grad():
        traj = rollout(model, prompts, num_steps=NUM_STEPS, eta=1.0, guidance_scale=2.0, unet=unet,
                       generator=torch.Generator().manual_seed(0), decode=False)
    advantages = torch.linspace(-1.0, 1.5, GLOBAL_BATCH)
    per_process = GLOBAL_BATCH // acc.num_processes
    mine = slice(acc.process_index * per_process, (acc.process_index + 1) * per_process)
    traj: Trajectory = traj.select(mine)
    advantages = advantages[mine]

    unet.train()
    for _ in range(UPDATES):
        for m in range(micro_batches):
            mb, mb_adv = traj.select(slice(m * unit, (m + 1) * unit)), advantages[m * unit:(m + 1) * unit]
            for j in range(NUM_STEPS):
                with acc.accumulate(unet):
                    lp = step_log_prob(model, mb, j, eta=1.0, guidance_scale=2.0, unet=unet).log_prob
                    if algo == "ddpo":
                        loss, _ = ppo_loss(lp, mb.log_probs[:, j], mb_adv, 1e-4, 5.0)
                    else:  # pairs (0, 1), (2, 3), …: this micro-batch holds whole pairs
                        old = mb.log_probs[:, j]
                        loss = rebel_loss(lp[0::2], old[0::2], lp[1::2], old[1::2], mb_adv[0::2], mb_adv[1::2], 1.0)
                    ctx.backward(loss)
    return {"lora": {k: v.detach().clone() for k, v in model.lora_state_dict().items()}, "initial": initial,
            "optimizer_steps": ctx.counters["optimizer_steps"], "num_processes": acc.num_processes}


pipe, out = sys.argv[1], Path(sys.argv[2])
for algo in sys.argv[3:]:
    result = one_global_batch(pipe, algo)
    if acc.is_main_process:
        torch.save(result, out / f"{algo}.pt")
acc.wait_for_everyone()
if acc.num_processes > 1:  # see gather_variable.py: tear gloo down before the interpreter exits
    torch.distributed.destroy_process_group()
