"""Run under `torch.distributed.run --nproc_per_node 2`: gather_variable with unequal (and empty) shares, and
process_slice; rank 0 prints the results as JSON (read by tests/test_common.py)."""

import json

import torch
from accelerate import Accelerator

from align_bench.algorithms.common import gather_variable, process_slice

acc = Accelerator(cpu=True)
rank = acc.process_index
out = {
    "unequal": gather_variable(acc, torch.arange(3.0) if rank == 0 else torch.tensor([10.0])).tolist(),
    "one_empty": gather_variable(acc, torch.zeros(0, 2) if rank == 0 else torch.ones(2, 2)).tolist(),
    "all_empty": gather_variable(acc, torch.zeros(0, 2)).shape[0],
    "slice": process_slice(acc, [0.0, 1.0, 2.0, 3.0]).tolist(),
}
everyone = acc.gather(torch.tensor(out["slice"])[None]).tolist()
if rank == 0:
    print(json.dumps({**out, "slices": everyone}))
# Tear the gloo group down before the interpreter exits: left to atexit, its threads are sometimes destroyed while
# still joinable and rank 0 aborts ("terminate called without an active exception"), failing a correct run.
acc.wait_for_everyone()
torch.distributed.destroy_process_group()
