"""The torch path: gather each row's pages, dequantize, attend.

The one reader that can report the attention every slot received (H2O-style
policies accumulate it) and that takes extra slots in front of a row (PoD).
"""

from __future__ import annotations

import torch

from vllm_kvcompress.decode.base import DecodeBatch, DecodeReader, DecodeResult
from vllm_kvcompress.kernels.paged_attention import decode_attention
from vllm_kvcompress.paging.store import PagedKVStore


class GatheredReader(DecodeReader):
    path = "torch"

    def __init__(self, store: PagedKVStore, attention_mass: bool = False) -> None:
        self.store = store
        self.attention_mass = attention_mass

    def read(self, batch: DecodeBatch) -> DecodeResult:
        keys, values = self.store.gather(batch.layer, batch.rows, scratch=True)
        return self.attend(batch, keys, values)

    def attend(self, batch: DecodeBatch, keys: torch.Tensor, values: torch.Tensor,
               visible: torch.Tensor | None = None, logits: torch.Tensor | None = None,
               extra_held: int = 0) -> DecodeResult:
        """Attention over gathered rows keys/values [B * H, T, D]; ``visible`` [B * H, T]
        replaces the rows' lengths, ``logits`` [B, Hq, T] are added (see ``decode_attention``)."""
        store, (num, heads) = self.store, batch.lens.shape
        counts = None
        if "count" in store.parts:
            counts = store.gather_slot_metadata(batch.layer, batch.rows, "count").view(num, heads, -1)
        if visible is not None:
            visible = visible.view(num, heads, -1)
        out, mass = decode_attention(
            batch.query, keys.view(num, heads, *keys.shape[1:]),
            values.view(num, heads, *values.shape[1:]), batch.lens, batch.scale,
            self.attention_mass, visible=visible, counts=counts, logits=logits,
            **batch.attention_extras,
        )
        held = int(batch.lens.sum()) + extra_held
        return DecodeResult(out, held, held, None if mass is None else mass.flatten(0, 1))
