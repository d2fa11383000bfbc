"""SpindleKV (Tang et al., 2025): evict in deep layers, merge similar tokens in shallow ones."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm_kvcompress.policies import register
from vllm_kvcompress.policies.base import LayerInputs
from vllm_kvcompress.policies.snapkv import SnapKV


@register
@dataclass
class SpindleKV(SnapKV):
    """SnapKV's choice of tokens everywhere; in the shallow layers nothing is simply lost.

    Shallow layers spread their attention and hold many near-duplicate keys,
    so an attention score is a poor reason to drop a token there. In the
    first ``shallow_layers`` of the model each evicted token instead joins the
    kept token whose key is most similar (cosine >= ``similarity``), as in a
    codebook: the entry's key and value become the mean of its members and it
    counts them, so that attention weighs it ``count * exp(q . k)``, as its
    members would have together. One decision per KV head, from the votes of
    its whole query group; sinks and the window are kept exact and absorb
    nothing. Deep layers evict as SnapKV. Memory is SnapKV's at the same
    budget, plus a count per kept token.
    """

    name: ClassVar[str] = "spindlekv"
    needs_counts: ClassVar[bool] = True

    shallow_layers: float = 0.5  # share of the layers, from the bottom, that merge
    similarity: float = 0.8  # least key cosine for an evicted token to merge

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.shallow_layers <= 1:
            raise ValueError(f"shallow_layers must be in [0, 1], got {self.shallow_layers}")
        if not -1 <= self.similarity <= 1:
            raise ValueError(f"similarity must be in [-1, 1], got {self.similarity}")

    def merges(self, layer: int, num_layers: int) -> bool:
        return layer < math.floor(self.shallow_layers * num_layers + 0.5)

    @staticmethod
    def _nearest(unit: torch.Tensor, absorbs: torch.Tensor, block: int = 1024
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosine to, and index of, the most similar absorbing token of every token: [H, T] each.

        Compared in blocks of tokens against the absorbing ones only, so a long
        prompt never builds a [T, T] matrix.
        """
        num_heads, num_tokens, dim = unit.shape
        best = torch.full((num_heads, num_tokens), float("-inf"), device=unit.device)
        target = torch.zeros((num_heads, num_tokens), dtype=torch.long, device=unit.device)
        width = int(absorbs.sum(dim=1).max())
        if width == 0:
            return best, target
        candidates = absorbs.float().topk(width, dim=1).indices  # [H, W]
        valid = absorbs.gather(1, candidates)
        bank = unit.gather(1, candidates.unsqueeze(-1).expand(-1, -1, dim)).transpose(1, 2)
        for start in range(0, num_tokens, block):
            similar = (unit[:, start:start + block] @ bank).masked_fill(~valid.unsqueeze(1),
                                                                         float("-inf"))
            value, column = similar.max(dim=-1)
            best[:, start:start + block] = value
            target[:, start:start + block] = candidates.gather(1, column)
        return best, target

    def merge(self, inputs: LayerInputs, keep: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Kept tokens after merging: keys, values [H, K, D] and counts [H, K], in token order.

        ``None`` in deep layers (plain eviction). Every head keeps the same
        number K of tokens (``keep`` comes from :meth:`select`).
        """
        if not self.merges(inputs.layer, inputs.num_layers):
            return None
        keys, values = inputs.keys.float(), inputs.values.float()
        num_heads, num_tokens, dim = keys.shape
        observed = inputs.window_queries.shape[1]
        position = torch.arange(num_tokens, device=keys.device)
        exact = (position < self.sink_tokens) | (position >= num_tokens - observed)
        unit = torch.nn.functional.normalize(keys, dim=-1)
        best, target = self._nearest(unit, keep & ~exact)
        joins = ~keep & (best >= self.similarity)
        target = torch.where(joins, target, position.expand_as(target))  # non-members: themselves
        member = joins | keep
        counts = torch.zeros(num_heads, num_tokens, device=keys.device)
        counts.scatter_add_(1, target, member.float())
        merged_k = torch.zeros_like(keys).scatter_add_(
            1, target.unsqueeze(-1).expand(-1, -1, dim), keys * member.unsqueeze(-1))
        merged_v = torch.zeros_like(values).scatter_add_(
            1, target.unsqueeze(-1).expand(-1, -1, dim), values * member.unsqueeze(-1))
        kept = keep.sum(dim=1)[0]
        index = keep.nonzero()[:, 1].view(num_heads, int(kept))  # token order per head
        counts = counts.gather(1, index)
        gather = index.unsqueeze(-1).expand(-1, -1, dim)
        scale = counts.unsqueeze(-1)
        return ((merged_k.gather(1, gather) / scale).to(inputs.keys.dtype),
                (merged_v.gather(1, gather) / scale).to(inputs.values.dtype), counts)
