"""Smoke build of the whole tiny world (the code path of `make tiny-world`) at a tiny budget."""

import json
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_smoke_build_writes_every_artifact(tmp_path):
    from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline

    from align_bench.tiny.build import main

    out = tmp_path / "tw"
    main(["--smoke", "--out", str(out), "--threads", "1"])
    for name in ("tiny", "tiny-lcm", "tiny-turbo", "clip", "aesthetic"):
        assert (out / name / "README.md").is_file(), name
    assert (out / "spm" / "README.md").is_file() and (out / "spm" / "model.safetensors").is_file()  # SPO's SPM
    assert (out / "build.log").read_text().count("stage") >= 6
    m = json.loads((out / "metrics.json").read_text())
    assert {"clip_ground_truth", "tiny", "tiny_lcm", "tiny_turbo", "headroom", "timings"} <= set(m)
    StableDiffusionPipeline.from_pretrained(str(out / "tiny"))
    LatentConsistencyModelPipeline.from_pretrained(str(out / "tiny-lcm"))
    turbo = StableDiffusionPipeline.from_pretrained(str(out / "tiny-turbo"))
    assert all((out / "tiny-turbo" / n).is_symlink() for n in ("vae", "text_encoder", "tokenizer"))
    assert not (out / "_stage_turbo_couplings.pt").exists()  # intermediate removed once the stage is done

    # --stages turbo rebuilds only tiny-turbo on the world just built: same seeds ⇒ the same UNet; the other
    # artifacts and metrics sections are left as they were.
    tiny_card = (out / "tiny" / "README.md").read_text()
    main(["--smoke", "--out", str(out), "--threads", "1", "--stages", "turbo"])
    again = StableDiffusionPipeline.from_pretrained(str(out / "tiny-turbo"))
    for a, b in zip(turbo.unet.parameters(), again.unet.parameters()):
        assert torch.equal(a, b)
    m2 = json.loads((out / "metrics.json").read_text())
    assert m2["tiny"] == m["tiny"] and m2["tiny_turbo"] == m["tiny_turbo"]
    assert (out / "tiny" / "README.md").read_text() == tiny_card
