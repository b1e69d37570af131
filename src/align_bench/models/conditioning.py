"""What the UNet is conditioned on, as one value that travels with a batch of samples.

The adapter (`models/diffusion.py`) fills it from the prompts and turns it into UNet keyword arguments; everything
else only selects, concatenates and moves it, so a new family (SDXL's pooled embeddings and time ids) needs no
change outside the adapter. The batch axis is dim 0 of every tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class Conditioning:
    """prompt_embeds  (B, L, D)  text-encoder hidden states the UNet cross-attends to
    pooled_embeds  (B, P) or None  pooled text embedding (SDXL's `text_embeds`)
    time_ids       (B, 6) or None  SDXL's size/crop conditioning (original h, w, crop top, left, target h, w)"""

    prompt_embeds: torch.Tensor
    pooled_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def _map(self, fn) -> "Conditioning":
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)
                                if getattr(self, f.name) is not None})

    def select(self, index: torch.Tensor) -> "Conditioning":
        """Sub-batch by a (B',) long index tensor."""
        return self._map(lambda v: v[index.to(v.device)])

    def expand(self, batch: int) -> "Conditioning":
        """A batch-1 conditioning broadcast to `batch` samples (a view, no copy)."""
        return self._map(lambda v: v.expand(batch, *v.shape[1:]))

    def detach(self) -> "Conditioning":
        return self._map(torch.Tensor.detach)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Conditioning":
        """Move every tensor; cast them to `dtype` if given."""
        return self._map(lambda v: v.to(device=device, dtype=dtype or v.dtype))

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        """Concatenate along the batch axis; every item must carry the same fields."""
        present = {f.name for f in fields(Conditioning) if getattr(items[0], f.name) is not None}
        for c in items[1:]:
            if {f.name for f in fields(Conditioning) if getattr(c, f.name) is not None} != present:
                raise ValueError("cannot concatenate conditionings with different fields")
        return Conditioning(**{name: torch.cat([getattr(c, name) for c in items]) for name in present})

    def state(self) -> dict[str, torch.Tensor]:
        """Plain dict of the tensors that are set (for files loaded with torch.load(weights_only=True))."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
