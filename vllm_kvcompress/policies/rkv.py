"""R-KV (Cai et al., 2025): important and non-redundant tokens, for long reasoning traces."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from vllm_kvcompress.policies import register
from vllm_kvcompress.policies.base import LayerInputs, Policy, protect
from vllm_kvcompress.policies.scoring import POOLINGS, window_mass


@register
@dataclass
class RKV(Policy):
    """Rank prompt tokens by ``mix * importance - (1 - mix) * redundancy``, per KV head.

    * importance ``I[h, t]``: SnapKV's window attention as a mean: the softmax
      of each window query, averaged over the W window queries and the G query
      heads of KV head h, max-pooled over the prefix (``kernel_size``, 7 as in
      the paper). Sums to at most 1 over t before pooling.
    * redundancy ``R[h, t]``: with ``S[i, j] = cos(k_i, k_j)`` over the head's
      prompt keys and ``S[i, i] = 0``, each row i also zeroes ``S[i, r(i)]``,
      ``r(i)`` the last token j with ``S[i, j] > similarity_threshold`` (the
      newest of a set of near-duplicates is spared: redundancy falls on the
      older copies). Then ``R[h, :] = softmax_t(mean_i S[i, t])``, which sums
      to 1 like the importance, so the two mix on one scale.

    This is the authors' reference implementation (R-KV repository,
    ``R1KV`` with ``retain_direction="last"``, threshold 0.5; ``mix_lambda``
    0.1, the paper's setting). Differences: GQA heads are folded by averaging
    their probabilities (the reference takes the max of the group's logits
    before one softmax), the window queries attend causally to the window's
    own keys too (the reference's softmax covers the prefix only), and a row
    without a similar token zeroes nothing (the reference zeroes its column
    0). The similarity runs in blocks of rows, never a [T, T] matrix, but costs
    O(T^2 D) a KV head: the paper scores decode buffers of a few thousand
    tokens, and a long prompt takes a while. Sinks
    and the window are always kept. R-KV compresses during decoding in the
    paper; this is its scorer, applied at the end of prefill.
    """

    name: ClassVar[str] = "rkv"

    mix_lambda: float = 0.1  # weight of importance; 1 - mix_lambda weighs redundancy
    similarity_threshold: float = 0.5  # cosine above which a later token is a near-duplicate
    kernel_size: int = 7  # odd max-pooling width of the importance; 1 disables pooling
    pooling: str = "max"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.mix_lambda <= 1:
            raise ValueError(f"mix_lambda must be in [0, 1], got {self.mix_lambda}")
        if not -1 <= self.similarity_threshold <= 1:
            raise ValueError(
                f"similarity_threshold must be in [-1, 1], got {self.similarity_threshold}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd integer >= 1, got {self.kernel_size}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")

    def redundancy(self, keys: torch.Tensor, block: int | None = None) -> torch.Tensor:
        """[H, T] softmax over tokens of their mean cosine to the other keys (see the class).

        O(T^2 D) a head, in blocks of ``block`` rows (by default about 4M entries a head).
        """
        unit = F.normalize(keys.float(), dim=-1)  # [H, T, D]; a zero key stays zero
        num_heads, num_tokens, _ = unit.shape
        block = block or max(1, (1 << 22) // num_tokens)
        # Column sums of S without its diagonal: k_t . sum_i k_i - k_t . k_t.
        column_sums = (unit @ unit.sum(dim=1, keepdim=True).transpose(1, 2)).squeeze(-1)
        column_sums -= unit.square().sum(dim=-1)
        position = torch.arange(num_tokens, device=unit.device, dtype=torch.int32)
        for start in range(0, num_tokens, block):
            rows = torch.arange(start, min(start + block, num_tokens), device=unit.device)
            similar = unit[:, rows] @ unit.transpose(1, 2)  # [H, B, T]
            similar[:, rows - start, rows] = float("-inf")  # never its own duplicate
            near = similar > self.similarity_threshold
            last = torch.where(near, position, -1).amax(dim=-1, keepdim=True).long()  # [H, B, 1]
            spared = similar.gather(-1, last.clamp(min=0)).masked_fill(last < 0, 0.0)
            column_sums.scatter_add_(1, last.clamp(min=0).squeeze(-1), -spared.squeeze(-1))
        return (column_sums / num_tokens).softmax(dim=-1)

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        group = inputs.window_queries.shape[0] // inputs.keys.shape[0]
        importance = window_mass(inputs, self.kernel_size, self.pooling) / group
        redundancy = self.redundancy(inputs.keys)
        scores = self.mix_lambda * importance - (1 - self.mix_lambda) * redundancy
        return protect(scores, self.sink_tokens, inputs.window_queries.shape[1])
