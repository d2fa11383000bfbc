"""PoD's shared keys: a layer's distant tokens scored with its key-source layer's keys.

A shared-key layer stores only the values of its distant tokens (the kept prompt
tokens between the sinks and the observation window); the key-source layer,
earlier in the same group, holds their keys in the same order after its sinks.
Decode puts the distant tokens in front of the layer's own slots and scores them
as the source layer does (its query against its keys), in one softmax with the
layer's own logits. Rows with no distant tokens of their own are read densely.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vllm_kvcompress.decode.base import DecodeBatch, DecodeReader, DecodeResult
from vllm_kvcompress.decode.gathered import GatheredReader
from vllm_kvcompress.paging.store import PagedKVStore


class SharedKeysReader(DecodeReader):
    def __init__(self, store: PagedKVStore, dense: DecodeReader,
                 key_source: Callable[[int], int], sink_tokens: int) -> None:
        self.store = store
        self.dense = dense
        self.path = dense.path
        self.key_source = key_source
        self.sink_tokens = sink_tokens
        self._gathered = GatheredReader(store)
        num_layers = store.shape.num_layers
        self._sources = {key_source(i) for i in range(num_layers) if key_source(i) != i}
        self._queries: dict[int, torch.Tensor] = {}  # source layer -> this step's queries

    def observe(self, layer: int, query: torch.Tensor, decode_tokens: torch.Tensor) -> None:
        if layer in self._sources:
            self._queries[layer] = query[decode_tokens]

    def read(self, batch: DecodeBatch) -> DecodeResult:
        shared = self.store.shared_counts(batch.layer, batch.rows)
        if shared is None:
            return self.dense.read(batch)
        store, layer, rows = self.store, batch.layer, batch.rows
        count, start = int(shared.max()), self.sink_tokens
        source = self.key_source(layer)
        distant = store.gather(source, rows)[0][:, start:start + count]
        source_q = self._queries[source][torch.from_numpy(batch.decode_index)]  # [B, Hq, D]
        num, heads = batch.lens.shape
        scores = torch.einsum("bhgd,bhtd->bhgt", source_q.view(num, heads, -1, distant.shape[-1]),
                              distant.view(num, heads, count, -1)).reshape(num, -1, count)
        keys, values = store.gather(layer, rows, scratch=True)
        logits = torch.nn.functional.pad(scores * batch.scale, (0, keys.shape[1]))
        keys = torch.cat([keys.new_zeros(len(rows), count, keys.shape[-1]), keys], dim=1)
        values = torch.cat([store.gather_values(layer, rows)[:, :count], values], dim=1)
        slot = torch.arange(keys.shape[1], device=keys.device)
        lens = batch.lens.reshape(-1, 1)
        shared_t = torch.from_numpy(shared).to(keys.device).unsqueeze(1)
        visible = (slot < shared_t) | ((slot >= count) & (slot < count + lens))
        return self._gathered.attend(batch, keys, values, visible, logits,
                                     extra_held=int(shared.sum()))
