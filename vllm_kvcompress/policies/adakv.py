"""Ada-KV (Feng et al., 2024): SnapKV scores, the layer's budget shared unevenly by its heads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm_kvcompress.policies import register
from vllm_kvcompress.policies.base import LayerInputs, protect, topk_mask
from vllm_kvcompress.policies.scoring import window_mass
from vllm_kvcompress.policies.snapkv import SnapKV


@register
@dataclass
class AdaKV(SnapKV):
    """SnapKV whose heads share the layer's ``H * budget`` tokens by one ranking.

    Heads that concentrate their attention on a few keys need few of them,
    heads that spread it need many: after every head has kept its protected
    tokens and its own top ``floor_ratio * budget`` (the safeguard), the rest
    of the layer's tokens go to the highest scores of all heads together.
    """

    name: ClassVar[str] = "adakv"
    uniform_heads: ClassVar[bool] = False

    floor_ratio: float = 0.2  # share of the budget every head keeps by its own ranking

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.floor_ratio <= 1:
            raise ValueError(f"floor_ratio must be in [0, 1], got {self.floor_ratio}")

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        mass = window_mass(inputs, self.kernel_size, self.pooling)
        return protect(mass, self.sink_tokens, inputs.window_queries.shape[1])

    def select(self, inputs: LayerInputs, budget: int) -> torch.Tensor:
        """Keep exactly ``H * min(budget, T)`` tokens in all; protected ones in every head.

        A budget below the protected count keeps ``budget`` protected tokens per head.
        """
        scores = self.score(inputs)
        num_heads, num_tokens = scores.shape
        budget = min(budget, num_tokens)
        protected = min(num_tokens, self.sink_tokens + inputs.window_queries.shape[1])
        first = min(budget, max(int(self.floor_ratio * budget), protected))
        keep = topk_mask(scores, first)
        rest = num_heads * (budget - first)
        if rest > 0:  # never more than the unkept tokens, all finite
            pool = scores.masked_fill(keep, float("-inf")).flatten()
            keep.view(-1)[pool.topk(rest).indices] = True
        return keep
