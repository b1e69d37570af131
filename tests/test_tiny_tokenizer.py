"""Tiny world tokenizer: offline round trip, empty prompt, fixed-length padding."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from align_bench.tiny.tokenizer import MAX_LENGTH, save_tokenizer  # noqa: E402


def test_tokenizer_round_trip_offline(tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.model_max_length == MAX_LENGTH == 16
    text = "three purple triangles on a orange background"
    enc = tok([text, ""], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt")
    assert enc.input_ids.shape == (2, 16)
    assert tok.decode(enc.input_ids[0], skip_special_tokens=True) == text
    assert enc.input_ids[1, :2].tolist() == [tok.bos_token_id, tok.eos_token_id]
    assert tok.unk_token_id not in enc.input_ids[0].tolist()
    assert tok.eos_token_id != 2  # CLIPTextModel's legacy pooling rule would misfire


def test_committed_tokenizer_matches_fresh_one():
    from transformers import AutoTokenizer

    from align_bench import resolve_path

    committed = AutoTokenizer.from_pretrained(str(resolve_path("assets/tiny-world/clip")))
    from align_bench.tiny.tokenizer import build_tokenizer

    fresh = build_tokenizer()
    s = ["a large white square on a black background", ""]
    assert committed(s, padding="max_length").input_ids == fresh(s, padding="max_length").input_ids
