"""The tiny text-to-image world: align_bench's embedded default model, trained by the project on its own data.

Modules: ``scenes`` (renderer, caption grammar, pixel oracles, analytic aesthetic), ``tokenizer`` (word-level
``PreTrainedTokenizerFast``), ``models`` (architectures, loaders), ``train`` (CLIP, VAE, aesthetic head, UNet,
LCM distillation), ``build`` (``python -m align_bench.tiny.build --out assets/tiny-world``), ``evaluate``
(quality bars, model cards), ``prompts`` (prompt sets ``tiny_train`` / ``tiny_eval`` / …). Rewards live in
``align_bench.rewards.tiny``. Artifacts: ``assets/tiny-world/{tiny,tiny-lcm,clip,aesthetic}``.
"""
