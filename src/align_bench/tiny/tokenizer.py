"""Word-level tokenizer over the tiny grammar, as a stock ``transformers.PreTrainedTokenizerFast``.

Layout of ids: 0 ``<pad>``, 1 ``<unk>``, 2 ``<bos>``, 3 ``<eos>``, then the grammar's words in a fixed order.
(<eos> is deliberately not id 2: ``CLIPTextModel`` treats ``eos_token_id == 2`` as the legacy "argmax id is the
end" rule.) Every text becomes ``<bos> words… <eos>``; the empty string (CFG's unconditional prompt) is
``<bos> <eos>``. ``model_max_length`` is 16, so ``padding="max_length"`` gives (B, 16) ids.
"""

from __future__ import annotations

from pathlib import Path

from .scenes import COLOURS, COUNTS, SHAPES, SIZES

MAX_LENGTH = 16
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]


def grammar_words() -> list[str]:
    """Every word the grammar can produce, in a fixed order (ids are stable across builds)."""
    words = ["a", "on", "background"] + list(COLOURS) + list(SHAPES) + [s + "s" for s in SHAPES]
    words += list(SIZES) + list(COUNTS)
    return words


def build_tokenizer():
    """A fresh ``PreTrainedTokenizerFast`` (word level, lower-cased, whitespace/punctuation split)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + grammar_words())}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=MAX_LENGTH, pad_token="<pad>", unk_token="<unk>",
        bos_token="<bos>", eos_token="<eos>", padding_side="right", truncation_side="right")


def save_tokenizer(out_dir: str | Path):
    tok = build_tokenizer()
    tok.save_pretrained(str(out_dir))
    return tok
