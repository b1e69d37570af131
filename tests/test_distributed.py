"""accelerate with two CPU processes (gloo): one run dir, gradients reach every rank (LoRA weights identical)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST_RUN

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_processes_share_a_run_dir_and_stay_in_sync(random_pipeline_dir, tmp_path):
    # torchrun is what `accelerate launch --multi_gpu` runs underneath; on CPU it forms a gloo group.
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
            str(ROOT / "train.py"), *FAST_RUN,
            f"model.path={random_pipeline_dir}", "algo.num_epochs=2", "algo.sample.batch_size=2",
            "algo.sample.num_batches_per_epoch=1", "algo.train.batch_size=1", "algo.train.learning_rate=3e-3",
            "prompts.eval_max_prompts=3", f"run_dir={run_dir}"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["run"]["num_processes"] == 2
    assert metrics["run"]["lora_in_sync"] is True
    # both processes sampled: 2 per process per epoch, gathered
    assert metrics["run"]["reward_queries"] == 2 * 2  # counters are per process: 2 samples × 2 epochs
    assert metrics["eval"]["final"]["jpeg_compressibility"]["1"]["n"] == 3  # eval shards gathered back together
    assert not list(tmp_path.glob("runs"))  # no stray per-rank output dirs
