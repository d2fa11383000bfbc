"""ChunkKV (Liu et al., 2025): keep whole chunks of text, and reuse the choice across layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from vllm_kvcompress.policies import register
from vllm_kvcompress.policies.base import LayerInputs, protect
from vllm_kvcompress.policies.scoring import window_votes
from vllm_kvcompress.policies.snapkv import SnapKV


@register
@dataclass
class ChunkKV(SnapKV):
    """SnapKV's window vote, summed over chunks of ``chunk_size`` tokens.

    A kept token keeps its neighbours: whole chunks are kept in the order of
    their summed votes (the last one cut by its tokens' own votes so that the
    budget holds exactly). One choice serves every KV head of the layer, and
    groups of ``reuse_layers`` adjacent layers keep the indices their first
    layer chose, which skips the scoring of the others: attention in adjacent
    layers picks largely the same chunks.
    """

    name: ClassVar[str] = "chunkkv"

    chunk_size: int = 10
    reuse_layers: int = 1  # adjacent layers sharing one selection; 1 disables reuse
    kernel_size: int = 1  # chunks already keep neighbourhoods together

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.reuse_layers < 1:
            raise ValueError(f"reuse_layers must be >= 1, got {self.reuse_layers}")

    def selection_source(self, layer: int) -> int:
        return layer - layer % self.reuse_layers

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        votes = window_votes(inputs, self.kernel_size, self.pooling).double().sum(dim=0)  # [T]
        num_tokens, size = votes.shape[0], self.chunk_size
        num_chunks = -(-num_tokens // size)
        chunk_votes = F.pad(votes, (0, num_chunks * size - num_tokens)).view(num_chunks, size).sum(-1)
        # Rank chunks first (integer part), then tokens inside a chunk (fraction in [0, 0.5]).
        chunk_rank = chunk_votes.argsort(stable=True).argsort().double()
        within = votes / (2 * votes.max().clamp_min(1e-30))
        scores = chunk_rank.repeat_interleave(size)[:num_tokens] + within
        scores = scores.expand(inputs.keys.shape[0], num_tokens)
        return protect(scores, self.sink_tokens, inputs.window_queries.shape[1])
