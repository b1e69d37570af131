"""The logging interface: CSV always, TensorBoard event files read back with TensorBoard's own reader, wandb in
offline mode writing its run directory (no network)."""

import csv

import pytest
from omegaconf import OmegaConf

from align_bench.loggers import build_logger, check_backends

EVAL = {"r": {"1": {"mean": 1.5, "std": 0.1, "n": 4}, "8": {"mean": 2.5, "std": 0.2, "n": 4}}}


def logger_cfg(*backends, wandb=None):
    return OmegaConf.create({"backends": list(backends), "wandb": wandb})


def grid(path):
    from PIL import Image

    Image.new("RGB", (8, 6), (255, 0, 0)).save(path)
    return path


def test_csv_rows_union_of_keys(tmp_path):
    lg = build_logger(logger_cfg("csv"), tmp_path, {}, "x", main=True)
    lg.train(0, {"epoch": 0, "reward_mean": 1.0, "lora_in_sync": True, "note": "s"})
    lg.train(1, {"epoch": 1, "reward_mean": 2.0, "clipfrac": 0.5})  # an algorithm adds a key later
    lg.close()
    rows = list(csv.DictReader(open(tmp_path / "train.csv")))
    assert [r["reward_mean"] for r in rows] == ["1.0", "2.0"]
    assert rows[0]["clipfrac"] == "" and rows[1]["clipfrac"] == "0.5"
    assert "lora_in_sync" not in rows[0] and "note" not in rows[0]  # not numeric curves


def test_non_main_process_writes_nothing(tmp_path):
    lg = build_logger(logger_cfg("csv", "tensorboard"), tmp_path, {}, "x", main=False)
    lg.train(0, {"reward_mean": 1.0})
    lg.close()
    assert list(tmp_path.iterdir()) == []


def test_unknown_backend_is_one_line():
    with pytest.raises(ValueError, match=r"logger.backends: unknown \['tensorbord'\]; valid"):
        check_backends(["csv", "tensorbord"])


def test_tensorboard_events_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lg = build_logger(logger_cfg("tensorboard"), tmp_path, {}, "x", main=True)
    lg.train(0, {"reward_mean": 1.0})
    lg.train(1, {"reward_mean": 3.0})
    lg.eval(2, "final", EVAL)
    lg.image(2, "samples_final", grid(tmp_path / "g.png"))
    lg.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/reward_mean")] == [(0, 1.0), (1, 3.0)]
    assert acc.Scalars("eval/r/8steps/final")[0].value == 2.5
    img = acc.Images("samples_final")[0]
    assert (img.width, img.height) == (8, 6)


def test_wandb_offline_writes_its_run_dir(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    lg = build_logger(logger_cfg("wandb", wandb={"mode": "offline", "project": "p", "entity": None}), tmp_path,
                      {"algo": {"name": "ddpo"}}, "ddpo-tiny", main=True)
    lg.train(0, {"reward_mean": 1.0})
    lg.eval(1, "final", EVAL)
    lg.image(1, "samples_final", grid(tmp_path / "g.png"))
    lg.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), list((tmp_path / "wandb").iterdir())


def test_wandb_mode_checked(tmp_path):
    pytest.importorskip("wandb")
    with pytest.raises(ValueError, match="logger.wandb.mode must be offline, online or disabled"):
        build_logger(logger_cfg("wandb", wandb={"mode": "of", "project": "p", "entity": None}), tmp_path, {}, "x",
                     main=True)
